"""BM25 sparse vectors for Qdrant, with IDF left to the engine.

The collection's ``bm25`` sparse vector is created with ``Modifier.IDF``: Qdrant multiplies each
query term by an IDF it keeps up to date from the collection itself. So the encoder writes only
the parts of BM25 that depend on one text:

- a document stores, per term, the saturated term frequency
  ``tf * (k1 + 1) / (tf + k1 * (1 - b + b * len / avg_len))``;
- a query stores ``1.0`` per distinct term.

The dot product Qdrant computes, ``sum(idf(t) * 1.0 * doc_value(t))``, is then the BM25 score.

Analysis, in order:

1. Unicode NFKC normalization (full-width digits, ligatures) and lower-casing.
2. Tokens are maximal runs of letters and digits (``[^\\W_]+``): every other character,
   including ``_``, ``.``, ``-`` and apostrophes, separates tokens. ``a100``, ``h100`` and
   ``k8s`` stay whole; ``1g.10gb`` becomes ``1g`` and ``10gb``; ``gpt-4o`` becomes ``gpt`` and
   ``4o``. Splitting identically on both sides is what matters for matching.
3. A token that is one ASCII letter is dropped (the ``s`` of ``GPU's``, the ``t`` of ``don't``,
   list markers); one digit is kept (``python 3``), and so is one non-Latin character (a CJK
   character is a word).
4. Stop words are dropped (a built-in list, English only; other languages keep every token).
5. Snowball stemming in ``SparseConfig.language``: ``running`` and ``runs`` both become ``run``.

Term indices are the first four bytes of ``blake2b(stem)`` masked to 31 bits: stable across
processes and machines (Python's ``hash()`` is salted per process), and below ``2**31`` so both
Qdrant Edge and the server accept them whatever their integer type. Stems that collide share an
index and are counted as one term, which is also how Qdrant's IDF sees them.

Changing any of the above changes the indices of already-written vectors: bump
:data:`ANALYZER_VERSION` then, so stored collections can be recognised as stale.
"""

from __future__ import annotations

import hashlib
import re
import threading
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache

import snowballstemmer

from ragops.config import SparseConfig
from ragops.errors import ConfigError
from ragops.vectorstore.base import SparseVector

#: Version of the analysis (tokenizer, stop words, stemmer use, hashing). Part of
#: :attr:`BM25Encoder.identity`; bump it whenever a change would move term indices.
ANALYZER_VERSION = 1

#: Indices are masked to 31 bits (see the module docstring).
INDEX_MASK = 0x7FFF_FFFF

# Runs of letters and digits; `_` is a word character for `\w`, so it is excluded explicitly.
_TOKEN_RE = re.compile(r"[^\W_]+")

# The NLTK English list, plus the fragments left by splitting contractions on the apostrophe
# ("couldn't" -> "couldn", "t"). Matched on the lower-cased surface form, before stemming.
ENGLISH_STOP_WORDS: frozenset[str] = frozenset(
    """
    a about above after again against ain all am an and any are aren as at be because been
    before being below between both but by can couldn d did didn do does doesn doing don down
    during each few for from further had hadn has hasn have haven having he her here hers
    herself him himself his how i if in into is isn it its itself just ll m ma me mightn more
    most mustn my myself needn no nor not now o of off on once only or other our ours ourselves
    out over own re s same shan she should shouldn so some such t than that the their theirs
    them themselves then there these they this those through to too under until up ve very was
    wasn we were weren what when where which while who whom why will with won wouldn y you your
    yours yourself yourselves would could also
    """.split()
)

_STOP_WORDS: dict[str, frozenset[str]] = {"english": ENGLISH_STOP_WORDS, "porter": ENGLISH_STOP_WORDS}

# Snowball stemmers keep per-call state on the object, so each thread gets its own
# (Ray Serve replicas may call the encoder from several threads).
_local = threading.local()


def _stemmer(language: str) -> snowballstemmer.stemmer:
    stemmers: dict[str, snowballstemmer.stemmer] | None = getattr(_local, "stemmers", None)
    if stemmers is None:
        stemmers = _local.stemmers = {}
    stemmer = stemmers.get(language)
    if stemmer is None:
        stemmer = stemmers[language] = snowballstemmer.stemmer(language)
    return stemmer


def term_index(stem: str) -> int:
    """Stable 31-bit index of a stem (the sparse-vector dimension it occupies).

    Args:
        stem: An analysed term, as :meth:`BM25Encoder.tokenize` returns it.

    Returns:
        ``int.from_bytes(blake2b(stem, digest_size=4), "little") & 0x7FFFFFFF``.
    """
    digest = hashlib.blake2b(stem.encode("utf-8"), digest_size=4).digest()
    return int.from_bytes(digest, "little") & INDEX_MASK


@lru_cache(maxsize=1 << 18)
def _analyze(language: str, token: str) -> tuple[str, int] | None:
    """(stem, index) of a lower-cased surface token, or None when the token is dropped.

    Cached because stemming is pure Python and dominates the cost; natural text reuses a
    small vocabulary, so after warm-up nearly every token is one cache hit.
    """
    if len(token) == 1 and token.isascii() and token.isalpha():
        return None
    if token in _STOP_WORDS.get(language, frozenset()):
        return None
    stem = _stemmer(language).stemWord(token)
    return stem, term_index(stem)


class BM25Encoder:
    """Text to BM25 sparse vectors (document side: saturated tf; query side: 1.0 per term).

    Plain and picklable (no model, no state beyond the config), so it can be built on the
    driver and shipped to Ray workers.

    Args:
        cfg: BM25 parameters and language; defaults to :class:`SparseConfig`'s defaults.

    Raises:
        ConfigError: ``cfg.language`` has no Snowball stemmer.

    Example:
        >>> enc = BM25Encoder()
        >>> enc.tokenize("Running the k8s jobs on an A100")
        ['run', 'k8s', 'job', 'a100']
    """

    def __init__(self, cfg: SparseConfig | None = None) -> None:
        self.cfg = cfg if cfg is not None else SparseConfig()
        language = self.cfg.language.lower()
        if language not in snowballstemmer.algorithms():
            raise ConfigError(
                f"config key 'ingest.sparse.language': no Snowball stemmer for '{self.cfg.language}' "
                f"(available: {', '.join(sorted(snowballstemmer.algorithms()))})"
            )
        self.language = language

    @property
    def identity(self) -> str:
        """What decides the indices and values written, e.g. ``bm25-v1-english-k1=1.2-b=0.75-avg=120``.

        Store it with a collection: vectors written under another identity are not comparable.
        """
        c = self.cfg
        return f"bm25-v{ANALYZER_VERSION}-{self.language}-k1={c.k1:g}-b={c.b:g}-avg={c.avg_doc_tokens:g}"

    def _surface_counts(self, text: str) -> Counter[str]:
        # NFKC folds full-width and compatibility characters before lower-casing, so "Ａ１００"
        # and "A100" meet; it is a fast no-op on text that is already normalized.
        return Counter(_TOKEN_RE.findall(unicodedata.normalize("NFKC", text).lower()))

    def _term_counts(self, text: str) -> tuple[dict[int, int], int]:
        """Term frequency per index, and the document length in kept tokens."""
        counts: dict[int, int] = {}
        length = 0
        language = self.language
        # Analysing each distinct surface token once (not each occurrence) keeps the cost
        # per document close to its vocabulary size.
        for token, n in self._surface_counts(text).items():
            analysed = _analyze(language, token)
            if analysed is None:
                continue
            index = analysed[1]
            counts[index] = counts.get(index, 0) + n
            length += n
        return counts, length

    def tokenize(self, text: str) -> list[str]:
        """Analysed terms of ``text`` in order, stop words and one-letter tokens removed.

        Args:
            text: Any text.

        Returns:
            Stems, e.g. ``"The runner runs"`` → ``['runner', 'run']``.
        """
        language = self.language
        out = []
        for token in _TOKEN_RE.findall(unicodedata.normalize("NFKC", text).lower()):
            analysed = _analyze(language, token)
            if analysed is not None:
                out.append(analysed[0])
        return out

    def encode_document(self, text: str) -> SparseVector:
        """BM25 document vector of one text (see :meth:`encode_documents`)."""
        counts, length = self._term_counts(text)
        if not counts:
            return SparseVector(indices=[], values=[])
        k1 = self.cfg.k1
        # The length normalisation is shared by every term of the document.
        norm = k1 * (1.0 - self.cfg.b + self.cfg.b * length / self.cfg.avg_doc_tokens)
        indices = sorted(counts)
        values = [counts[i] * (k1 + 1.0) / (counts[i] + norm) for i in indices]
        return SparseVector(indices=indices, values=values)

    def encode_documents(self, texts: Sequence[str]) -> list[SparseVector]:
        """BM25 document vectors: per term ``tf*(k1+1) / (tf + k1*(1 - b + b*len/avg_len))``.

        ``len`` is the number of kept tokens (after stop-word and one-letter removal) and
        ``avg_len`` is ``cfg.avg_doc_tokens``. Indices are unique and sorted; an empty text (or
        one made only of stop words) gives an empty vector.

        Args:
            texts: Chunk texts.

        Returns:
            One :class:`SparseVector` per text, in order.
        """
        return [self.encode_document(t) for t in texts]

    def encode_query(self, text: str) -> SparseVector:
        """Query vector: ``1.0`` per distinct term (Qdrant's IDF supplies the weights).

        Repeating a word in a query does not weigh it more, as in BM25 proper.

        Args:
            text: The query.

        Returns:
            A :class:`SparseVector` with sorted unique indices; empty when no term is left.
        """
        counts, _ = self._term_counts(text)
        indices = sorted(counts)
        return SparseVector(indices=indices, values=[1.0] * len(indices))

    def encode_queries(self, texts: Iterable[str]) -> list[SparseVector]:
        """:meth:`encode_query` for each text, in order."""
        return [self.encode_query(t) for t in texts]

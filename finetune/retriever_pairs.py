"""Training pairs for the retriever's models: (query, positive passage, hard negatives).

``ragops train embedder`` and ``ragops train reranker`` learn from the same pairs, which come
from any mix of three sources:

* **files** of ``{"query", "positive"}`` records (optional ``doc_id``, ``negatives``);
* **feedback**: the chat endpoint's up-rated answers, the question paired with the passages
  the answer cited (all its passages when it cited none);
* **synthesis** from the indexed corpus (:mod:`ragops.finetune.retriever_synth`).

Negatives are mined from the current index the way the retriever will fail: the chunks it
ranks high for the query that belong to another document (a few top ones are skipped, since
near the top an unlabeled positive is likelier than a true negative). The held-out split is
by document, so no document's passages are seen in training and evaluated at once.

Passages are always the text the embedder sees at ingest: the heading label, a blank line, the
chunk text (:func:`ragops.ingest.chunkers.heading_label`).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ragops.config import Settings
from ragops.errors import InputError
from ragops.retrieval.evaluate import read_numbered_jsonl


@dataclass
class Pair:
    """One training example.

    Attributes:
        query: What a user would type.
        positive: The passage that answers it (as embedded: heading label + text).
        doc_id: Document of the positive ('' when unknown): the unit of the held-out split.
        chunk_id: Indexed chunk of the positive, when it is one.
        source: ``file``, ``feedback``, ``synthetic-structural`` or ``synthetic-generated``.
        negatives: Hard negatives (passages of other documents).
    """

    query: str
    positive: str
    doc_id: str = ""
    chunk_id: str | None = None
    source: str = "file"
    negatives: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Chunk:
    """An indexed chunk as the trainers need it."""

    chunk_id: str
    doc_id: str
    text: str  # as embedded: heading label + text
    body: str  # the chunk text alone
    label: str  # the heading label


def embedded_text(payload: Mapping[str, Any]) -> tuple[str, str, str]:
    """``(embedded text, heading label, body)`` of a stored chunk payload, as ingest embedded it."""
    from ragops.ingest.chunkers import heading_label

    body = str(payload.get("text") or "")
    label = heading_label(str(payload.get("title") or ""), [str(h) for h in payload.get("heading_path") or []])
    return (f"{label}\n\n{body}" if label else body), label, body


def load_corpus(settings: Settings, collection: str | None = None, exclude_docs: set[str] | None = None) -> list[Chunk]:
    """Every chunk of the collection (minus ``exclude_docs``), in a stable order.

    Raises:
        InputError: the collection does not exist or is empty.
    """
    from ragops.vectorstore import open_store

    store = open_store(settings.vectorstore, settings.data_dir, collection)
    try:
        if store.get_spec() is None:
            raise InputError(
                f"collection '{store.collection}' does not exist under {settings.data_dir}: ingest documents first "
                "(ragops ingest ./docs); pairs are mined and synthesized from the index"
            )
        out: list[Chunk] = []
        for r in store.scroll(fields=("doc_id", "chunk_id", "text", "title", "heading_path")):
            p = r.payload or {}
            if exclude_docs and str(p.get("doc_id")) in exclude_docs:
                continue
            text, label, body = embedded_text(p)
            out.append(Chunk(chunk_id=str(p.get("chunk_id") or r.id), doc_id=str(p.get("doc_id", "")), text=text, body=body, label=label))
    finally:
        store.close()
    if not out:
        raise InputError(f"collection '{collection or settings.vectorstore.collection}' holds no chunks to train from")
    out.sort(key=lambda c: c.chunk_id)
    return out


# -- sources -------------------------------------------------------------------------------


def _jsonl_files(spec: str) -> list[Path]:
    p = Path(spec).expanduser()
    if p.is_dir():
        files = sorted(p.glob("*.jsonl"))
    elif any(ch in spec for ch in "*?["):
        files = sorted(Path().glob(spec)) if not p.is_absolute() else sorted(Path(p.anchor).glob(str(p.relative_to(p.anchor))))
    else:
        files = [p]
    missing = [f for f in files if not f.is_file()]
    if not files or missing:
        raise InputError(f"no pair file at '{spec}'" if not files else f"pair file not found: {missing[0]}")
    return files


def read_pair_files(specs: Sequence[str]) -> list[Pair]:
    """Pairs from JSONL files of ``{"query", "positive"}`` (``doc_id``, ``negatives`` optional).

    Raises:
        InputError: unreadable JSON, a missing or empty field, or a wrong type (file and line named).
    """
    pairs: list[Pair] = []
    for spec in specs:
        for path in _jsonl_files(spec):
            for n, rec in read_numbered_jsonl(path, ("query", "positive")):
                where = f"{path}:{n}"
                for key in ("query", "positive"):
                    if not isinstance(rec[key], str) or not rec[key].strip():
                        raise InputError(f"{where}: \"{key}\" must be a non-empty string")
                negs = rec.get("negatives", [rec["negative"]] if "negative" in rec else [])
                if not isinstance(negs, list) or not all(isinstance(x, str) for x in negs):
                    raise InputError(f"{where}: \"negatives\" must be a list of strings")
                doc = rec.get("doc_id", "")
                pairs.append(Pair(query=rec["query"].strip(), positive=rec["positive"].strip(), doc_id=str(doc or ""),
                                  source="file", negatives=[x for x in negs if x.strip()]))  # fmt: skip
    return pairs


_CITE = re.compile(r"\[(\d{1,2})\]")


def feedback_pairs(settings: Settings) -> list[Pair]:
    """Pairs from up-rated chat answers: the question and each passage the answer cited.

    An answer that cites nothing pairs its question with its first passage (the one the
    retriever ranked best), since the user found the answer right. Unreadable lines (a record
    cut by a crash) are skipped: feedback is appended by a live server.
    """
    from ragops.serve.feedback import FEEDBACK_FILE, feedback_dir

    path = feedback_dir(settings) / FEEDBACK_FILE
    if not path.is_file():
        raise InputError(f"--feedback: no feedback at {path} yet (the chat endpoint writes it: POST /v1/feedback)")
    pairs: list[Pair] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or rec.get("rating") != "up" or not rec.get("question") or not rec.get("passages"):
            continue
        passages = {int(p.get("n", i + 1)): p for i, p in enumerate(rec["passages"])}
        cited = [int(m) for m in _CITE.findall(str(rec.get("answer") or ""))]
        chosen = [passages[c] for c in dict.fromkeys(cited) if c in passages] or [rec["passages"][0]]
        for p in chosen:
            text, _, _ = embedded_text(p)
            if text.strip():
                pairs.append(Pair(query=str(rec["question"]).strip(), positive=text, doc_id=str(p.get("doc_id", "")),
                                  chunk_id=p.get("chunk_id"), source="feedback"))  # fmt: skip
    return pairs


# -- negatives, splits -----------------------------------------------------------------------


def mine_negatives(
    settings: Settings,
    pairs: list[Pair],
    corpus: Sequence[Chunk],
    *,
    k: int,
    mode: str,
    skip: int,
    depth: int,
    seed: int,
    collection: str | None = None,
    exclude_docs: set[str] | None = None,
) -> dict[str, int]:
    """Fill each pair's ``negatives`` up to ``k`` with chunks the current index ranks high for it.

    Hits of the positive's own document (or with the positive's text) are never negatives, nor
    are chunks of ``exclude_docs``. A pair the search finds too few for is topped up with
    random chunks of other documents, so every example has ``k`` negatives (the trainers need
    a fixed number of columns).

    Returns:
        ``{"mined": n, "random": n}``: negatives of each origin.
    """
    from ragops.retrieval.rerank import pair_text
    from ragops.retrieval.search import Retriever

    stats = {"mined": 0, "random": 0}
    if k == 0 or not pairs:
        return stats
    rng = random.Random(seed)
    excluded = exclude_docs or set()
    todo = [p for p in pairs if len(p.negatives) < k]
    with Retriever(settings, collection=collection) as retriever:
        for start in range(0, len(todo), 64):
            batch = todo[start : start + 64]
            results = retriever.search_batch([p.query for p in batch], k=depth, mode=mode)
            for pair, hits in zip(batch, results, strict=True):
                foreign = [h for h in hits.hits if h.doc_id != pair.doc_id and h.doc_id not in excluded and h.chunk_id != pair.chunk_id]
                texts = [t for t in (pair_text(h) for h in foreign[skip:]) if t != pair.positive]
                for t in texts[: k - len(pair.negatives)]:
                    pair.negatives.append(t)
                    stats["mined"] += 1
    others = [c for c in corpus if c.doc_id not in excluded]
    for pair in pairs:
        guard = 0
        while len(pair.negatives) < k and others and guard < 10 * k:
            guard += 1
            c = rng.choice(others)
            if c.doc_id != pair.doc_id and c.text != pair.positive and c.text not in pair.negatives:
                pair.negatives.append(c.text)
                stats["random"] += 1
    return stats


def split_by_document(pairs: Sequence[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Hold out ``fraction`` of the documents (all of their pairs); pairs without a document are
    grouped by their positive's text."""
    if fraction <= 0 or len(pairs) < 2:
        return list(pairs), []
    groups = sorted({_group(p) for p in pairs})
    rng = random.Random(seed)
    rng.shuffle(groups)
    n_held = max(1, round(len(groups) * fraction)) if len(groups) > 1 else 0
    held_groups = set(groups[:n_held])
    train = [p for p in pairs if _group(p) not in held_groups]
    held = [p for p in pairs if _group(p) in held_groups]
    return train, held


def _group(p: Pair) -> str:
    return p.doc_id or "text:" + hashlib.sha256(p.positive.encode()).hexdigest()[:16]


def check_no_leak(train: Iterable[Pair], held: Iterable[Pair], excluded: set[str] | None = None) -> None:
    """Refuse an evaluation split that shares documents with training (or training on excluded documents).

    Raises:
        InputError: names the first shared documents.
    """
    train_docs = {_group(p) for p in train}
    shared = sorted(train_docs & {_group(p) for p in held})
    if shared:
        raise InputError(
            f"the evaluation split leaks into training: {len(shared)} document(s) have pairs in both "
            f"(e.g. {', '.join(shared[:3])}); hold out whole documents"
        )
    if excluded:
        bad = sorted(d for d in train_docs if d in excluded)
        if bad:
            raise InputError(
                f"{len(bad)} training pair(s) come from excluded documents (e.g. {', '.join(bad[:3])}); "
                "remove them from the pair files or from --exclude-docs"
            )


def read_doc_ids(path: str) -> set[str]:
    """Document ids from a JSONL file of ``{"doc_id"}`` records (a qrels file works) or plain lines.

    Raises:
        InputError: the file is missing or holds no ids.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"--exclude-docs: no file at {p}")
    ids: set[str] = set()
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"--exclude-docs {p}: not JSON ({exc.msg})") from None
            if "doc_id" in rec:
                ids.add(str(rec["doc_id"]))
        else:
            ids.add(line)
    if not ids:
        raise InputError(f"--exclude-docs {p}: no document ids in it")
    return ids


def data_hash(pairs: Sequence[Pair], held: Sequence[Pair]) -> str:
    """Identity of the training data (what ``--resume auto`` matches on)."""
    h = hashlib.sha256()
    for part, items in (("train", pairs), ("eval", held)):
        h.update(part.encode())
        for p in items:
            h.update(json.dumps([p.query, p.positive, p.negatives, p.doc_id], ensure_ascii=False).encode())
    return h.hexdigest()

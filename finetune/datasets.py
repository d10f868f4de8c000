"""Training data: JSON Lines files → validated, formatted examples (Ray Data or in-process).

SFT records (one JSON object per line), mixed freely in one file:

* chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`` — every
  assistant turn becomes one example whose prompt is the conversation before it, so the loss
  covers the assistant's turns only;
* RAG triple: ``{"question", "answer", "contexts": [str | {"text", "title"?, "source"?}, ...]}``
  or ``{"question", "answer", "retrieve": true}`` (passages are retrieved from the index when
  the dataset is built). The prompt is exactly the one the stuff reader builds
  (:func:`ragops.retrieval.prompts.build_stuff_messages`: numbered passages, question last), and
  the target answer gets ``[n]`` citations for the passages that contain it (unless it already
  cites, or ``"citations": [n, ...]`` says which).

Preference records (reward model):

* pair: ``{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}``;
* chat feedback (stored by the chat endpoint under ``<data_dir>/feedback/*.jsonl``)::

      {"request_id": "...", "question": "...", "passages": [{"n": 1, "text": ...}, ...],
       "answer": "...", "rating": "up" | "down", "preferred_answer": "..."?}

  A record with a ``preferred_answer`` gives the pair (chosen = preferred_answer, rejected =
  answer); otherwise every up-rated and down-rated answer to the same question pair up
  (chosen = up, rejected = down). The prompt is the stuff prompt over the chosen record's
  passages, so the reward model scores answers in the context they were given.

The stages are plain callables (:class:`ParseRecord`, :class:`RetrieveContexts`,
:class:`FormatSFT`, :class:`FormatPreference`); :func:`build_sft_examples` and
:func:`build_preference_examples` run them with Ray Data (``from_items`` + ``map``) or in
process. Malformed lines are collected and reported together as ``file:line: problem``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragops.retrieval.prompts import (
    Passage,
    as_passages,
    build_stuff_messages,
    parse_citations,
)

from ragops.errors import InputError
from ragops.retrieval.support import content_words, normalize
from ragops.uris import expand_files, read_bytes, read_text

if TYPE_CHECKING:
    from ragops.config import Settings

ROLES = ("system", "user", "assistant")
RATINGS = ("up", "down")
#: Errors listed in one InputError before the rest are counted.
MAX_REPORTED_ERRORS = 10

Example = dict[str, Any]


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------


def expand_data_paths(data: str | Path | Sequence[str | Path]) -> list[str]:
    """Files named by paths or URIs, folders (their ``*.jsonl``) or globs, sorted.

    Remote locations (``s3://...``) go through pyarrow filesystems, so training runs as a
    cluster job read their data where it lives.

    Raises:
        InputError: a location does not exist, or nothing matches.
    """
    items = [data] if isinstance(data, (str, Path)) else list(data)
    out: list[str] = []
    for item in items:
        try:
            out.extend(expand_files(item, ".jsonl"))
        except InputError:
            raise InputError(f"training data '{item}' not found") from None
    if not out:
        raise InputError(f"training data {', '.join(map(str, items))}: no .jsonl files found")
    return sorted(dict.fromkeys(out))


def data_hash(paths: Iterable[str | Path]) -> str:
    """SHA-256 over the files' bytes (in path order): identifies "the same data" for resume."""
    h = hashlib.sha256()
    for p in sorted(str(p) for p in paths):
        h.update(p.rsplit("/", 1)[-1].encode())
        h.update(b"\0")
        h.update(read_bytes(p))
        h.update(b"\0")
    return h.hexdigest()


def read_lines(paths: Iterable[str | Path], max_records: int | None = None) -> list[dict[str, Any]]:
    """``{"file", "line", "text"}`` for each non-blank line (1-based line numbers)."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        text = read_text(path)
        for i, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                rows.append({"file": str(path), "line": i, "text": line})
                if max_records is not None and len(rows) >= max_records:
                    return rows
    return rows


# ---------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------


class RecordError(ValueError):
    """A record is malformed (the stage turns it into ``file:line: message``)."""


def _str(rec: Mapping[str, Any], key: str, *, required: bool = True) -> str | None:
    value = rec.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"'{key}' must be a non-empty string")
    return value


def _messages(value: Any, key: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise RecordError(f"'{key}' must be a non-empty list of {{'role', 'content'}} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise RecordError(f"'{key}[{i}]' must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise RecordError(f"'{key}[{i}].role' is '{m['role']}'; allowed: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise RecordError(f"'{key}[{i}].content' must be a string")
        out.append({"role": str(m["role"]), "content": m["content"]})
    return out


def _passages(value: Any, key: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise RecordError(f"'{key}' must be a list of strings or {{'text', ...}} objects")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            out.append({"text": item})
        elif isinstance(item, Mapping) and isinstance(item.get("text"), str):
            out.append({k: item[k] for k in ("text", "title", "source", "doc_id", "chunk_id", "score") if k in item})
        else:
            raise RecordError(f"'{key}[{i}]' must be a string or an object with a 'text' string")
    return out


def record_kind(rec: Mapping[str, Any]) -> str:
    """``chat``, ``rag``, ``pair`` or ``feedback``, from the record's keys."""
    if "messages" in rec:
        return "chat"
    if "rating" in rec:
        return "feedback"
    if "chosen" in rec or "rejected" in rec:
        return "pair"
    if "question" in rec or "answer" in rec:
        return "rag"
    raise RecordError(
        "unrecognised record: expected 'messages' (chat), 'question'+'answer' (RAG), "
        "'prompt'+'chosen'+'rejected' (preference) or a feedback record with 'rating'; "
        f"got keys {sorted(rec)}"
    )


# ---------------------------------------------------------------------------------------
# Citations
# ---------------------------------------------------------------------------------------

_norm = normalize
_content_words = content_words


def supporting_passages(answer: str, passages: Sequence[Passage], *, min_overlap: float = 0.6) -> list[int]:
    """Numbers of the passages that contain the answer, when that is identifiable.

    A passage containing the whole (normalised) answer wins; otherwise the passages sharing the
    largest share of the answer's content words, if that share reaches ``min_overlap``.
    """
    target = _norm(answer)
    if not target:
        return []
    exact = [p.n for p in passages if target in _norm(p.text)]
    if exact:
        return exact
    words = _content_words(answer)
    if not words:
        return []
    scores = {p.n: len(words & _content_words(p.text)) / len(words) for p in passages}
    best = max(scores.values(), default=0.0)
    if best < min_overlap:
        return []
    return [n for n, s in scores.items() if s == best]


def cite_answer(answer: str, passages: Sequence[Passage], citations: Sequence[int] | None = None) -> str:
    """The answer with ``[n]`` citations appended (before a final full stop), when identifiable.

    An answer that already cites a passage is returned unchanged.
    """
    if parse_citations(answer, len(passages)):
        return answer
    cited = [n for n in (citations or []) if 1 <= n <= len(passages)] or supporting_passages(answer, passages)
    if not cited:
        return answer
    marks = "".join(f"[{n}]" for n in cited)
    text = answer.rstrip()
    if text and text[-1] in ".!?" and not text.endswith("..."):
        return f"{text[:-1]} {marks}{text[-1]}"
    return f"{text} {marks}"


# ---------------------------------------------------------------------------------------
# Stages (plain callables; Ray Data maps them)
# ---------------------------------------------------------------------------------------


def _where(row: Mapping[str, Any]) -> str:
    return f"{row['file']}:{row['line']}"


class ParseRecord:
    """Raw line → ``{"file", "line", "kind", "record"}`` (record as JSON text) or ``{"error"}``.

    Records travel as JSON text between stages: Arrow would otherwise have to unify the
    schemas of heterogeneous records (strings vs objects in ``contexts``, optional keys).
    """

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        base = {"file": row["file"], "line": row["line"]}
        try:
            rec = json.loads(row["text"])
        except ValueError as exc:
            return {**base, "kind": "", "record": "", "error": f"{_where(row)}: not valid JSON ({exc})"}
        try:
            if not isinstance(rec, dict):
                raise RecordError(f"expected a JSON object, got {type(rec).__name__}")
            kind = record_kind(rec)
        except RecordError as exc:
            return {**base, "kind": "", "record": "", "error": f"{_where(row)}: {exc}"}
        return {**base, "kind": kind, "record": json.dumps(rec), "error": ""}


class RetrieveContexts:
    """Fill ``contexts`` of ``"retrieve": true`` records from the index (a Ray Data batch stage).

    Passages are assembled exactly as the RAG pipeline does (same retriever, dedupe and token
    budget, counted with the base model's tokenizer), so training prompts match serving ones.
    Only one instance should open an embedded (Edge) index: run it with ``concurrency=1``.

    Args:
        settings: Full settings (embedder, vectorstore, retrieval, generator.context_tokens).
        k: Passages per question.
        tokenizer_dir: Folder (and GGUF file) of the tokenizer that counts passage tokens.
    """

    def __init__(self, settings: Settings, k: int, tokenizer_dir: str | None = None, gguf_file: str | None = None) -> None:
        self.settings = settings
        self.k = k
        self.tokenizer_dir = tokenizer_dir
        self.gguf_file = gguf_file
        self._retriever: Any = None
        self._count: Callable[[str], int] | None = None

    def warm_up(self) -> None:
        from ragops.retrieval.search import Retriever

        if self._retriever is None:
            self._retriever = Retriever(self.settings)
            self._retriever.warm_up()
        if self._count is None:
            if self.tokenizer_dir:
                from transformers import AutoTokenizer

                extra = {"gguf_file": self.gguf_file} if self.gguf_file else {}
                tok = AutoTokenizer.from_pretrained(self.tokenizer_dir, **extra)
                self._count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])
            else:
                self._count = lambda text: len(text.split())

    def close(self) -> None:
        if self._retriever is not None:
            self._retriever.close()
            self._retriever = None

    def retrieve(self, question: str) -> list[dict[str, Any]]:
        """Numbered passages for one question, as dicts."""
        from ragops.retrieval.context import assemble_context

        self.warm_up()
        result = self._retriever.search(question, k=self.k)
        passages = assemble_context(result.hits, store=self._retriever.store, settings=self.settings, count_tokens=self._count)  # type: ignore[arg-type]
        return [
            {"text": p.text, "title": p.title, "source": p.source, "doc_id": p.doc_id, "chunk_id": p.chunk_id, "score": p.score}
            for p in passages
        ]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        records = list(batch["record"])
        errors = list(batch["error"])
        for i, (text, err) in enumerate(zip(records, errors)):
            if err or not text:
                continue
            rec = json.loads(text)
            if rec.get("retrieve") is True and "contexts" not in rec and isinstance(rec.get("question"), str):
                try:
                    rec["contexts"] = self.retrieve(rec["question"])
                except Exception as exc:  # noqa: BLE001 - reported per record, with its line
                    errors[i] = f"{batch['file'][i]}:{batch['line'][i]}: retrieval failed: {exc}"
                    continue
                records[i] = json.dumps(rec)
        return {**batch, "record": records, "error": errors}


def format_rag(rec: Mapping[str, Any], *, cite: bool) -> Example:
    """A RAG triple → prompt (stuff reader messages) + completion (cited answer)."""
    question = _str(rec, "question")
    answer = _str(rec, "answer")
    if "contexts" not in rec:
        if rec.get("retrieve") is True:
            raise RecordError("'retrieve' is true but no passages were retrieved (is the index empty?)")
        raise RecordError("a RAG record needs 'contexts' (a list of passages) or \"retrieve\": true")
    passages = as_passages(_passages(rec["contexts"], "contexts"))
    citations = rec.get("citations")
    if citations is not None and not (isinstance(citations, list) and all(isinstance(c, int) for c in citations)):
        raise RecordError("'citations' must be a list of passage numbers")
    target = cite_answer(answer, passages, citations) if cite else answer  # type: ignore[arg-type]
    return {
        "prompt": build_stuff_messages(question, passages),  # type: ignore[arg-type]
        "completion": [{"role": "assistant", "content": target}],
    }


def format_chat(rec: Mapping[str, Any]) -> list[Example]:
    """A conversation → one example per assistant turn (prompt = everything before it)."""
    msgs = _messages(rec.get("messages"), "messages")
    out = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        if not any(p["role"] != "system" for p in msgs[:i]):
            raise RecordError(f"'messages[{i}]' is an assistant turn with no user turn before it")
        if not m["content"].strip():
            raise RecordError(f"'messages[{i}]' is an empty assistant turn")
        out.append({"prompt": msgs[:i], "completion": [m]})
    if not out:
        raise RecordError("'messages' has no assistant turn to learn from")
    return out


class FormatSFT:
    """Parsed record → ``{"examples": JSON list of {"prompt", "completion"}}`` or ``{"error"}``.

    Args:
        cite: Append ``[n]`` citations to RAG answers (see :func:`cite_answer`).
    """

    def __init__(self, cite: bool = True) -> None:
        self.cite = cite

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        base = {"file": row["file"], "line": row["line"]}
        if row["error"]:
            return {**base, "examples": "", "error": row["error"]}
        try:
            rec = json.loads(row["record"])
            if row["kind"] == "chat":
                examples = format_chat(rec)
            elif row["kind"] == "rag":
                examples = [format_rag(rec, cite=self.cite)]
            else:
                raise RecordError(
                    f"a {row['kind']} (preference) record in SFT data: train a reward model with `ragops train reward`"
                )
        except RecordError as exc:
            return {**base, "examples": "", "error": f"{_where(row)}: {exc}"}
        return {**base, "examples": json.dumps(examples), "error": ""}


def _as_prompt(value: Any, key: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise RecordError(f"'{key}' must not be empty")
        return [{"role": "user", "content": value}]
    return _messages(value, key)


def _as_reply(value: Any, key: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise RecordError(f"'{key}' must not be empty")
        return [{"role": "assistant", "content": value}]
    msgs = _messages(value, key)
    if msgs[-1]["role"] != "assistant":
        raise RecordError(f"'{key}' must end with an assistant message")
    return msgs


def format_pair(rec: Mapping[str, Any]) -> Example:
    """``{"prompt", "chosen", "rejected"}`` → conversational preference example."""
    for key in ("prompt", "chosen", "rejected"):
        if key not in rec:
            raise RecordError(f"a preference record needs 'prompt', 'chosen' and 'rejected'; '{key}' is missing")
    chosen, rejected = _as_reply(rec["chosen"], "chosen"), _as_reply(rec["rejected"], "rejected")
    if chosen == rejected:
        raise RecordError("'chosen' and 'rejected' are identical")
    return {"prompt": _as_prompt(rec["prompt"], "prompt"), "chosen": chosen, "rejected": rejected}


def check_feedback(rec: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a chat feedback record; return it normalised."""
    question = _str(rec, "question")
    answer = _str(rec, "answer")
    if rec.get("rating") not in RATINGS:
        raise RecordError(f"'rating' must be one of {', '.join(RATINGS)} (got {rec.get('rating')!r})")
    preferred = _str(rec, "preferred_answer", required=False)
    passages = _passages(rec.get("passages", []), "passages")
    return {
        "request_id": rec.get("request_id"),
        "question": question,
        "answer": answer,
        "rating": rec["rating"],
        "preferred_answer": preferred,
        "passages": passages,
    }


class FormatPreference:
    """Parsed record → ``{"examples": JSON list}`` (pairs) or ``{"feedback": JSON}`` or ``{"error"}``.

    Feedback records are only validated here; they are paired across records by
    :func:`pair_feedback` once all are read.
    """

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        base = {"file": row["file"], "line": row["line"], "examples": "", "feedback": ""}
        if row["error"]:
            return {**base, "error": row["error"]}
        try:
            rec = json.loads(row["record"])
            if row["kind"] == "pair":
                return {**base, "examples": json.dumps([format_pair(rec)]), "error": ""}
            if row["kind"] == "feedback":
                fb = check_feedback(rec)
                return {**base, "feedback": json.dumps({**fb, "where": _where(row)}), "error": ""}
            raise RecordError(
                f"a {row['kind']} record in preference data: expected 'prompt'+'chosen'+'rejected' or feedback "
                "records (train SFT with `ragops train sft`)"
            )
        except RecordError as exc:
            return {**base, "error": f"{_where(row)}: {exc}"}


def _feedback_prompt(fb: Mapping[str, Any]) -> list[dict[str, str]]:
    return build_stuff_messages(fb["question"], as_passages(fb["passages"]))


def pair_feedback(records: Sequence[Mapping[str, Any]]) -> list[Example]:
    """Chat feedback records → preference pairs (see the module docstring)."""
    pairs: list[Example] = []
    seen: set[tuple[str, str, str]] = set()

    def add(fb: Mapping[str, Any], chosen: str, rejected: str) -> None:
        key = (_norm(fb["question"]), chosen.strip(), rejected.strip())
        if chosen.strip() == rejected.strip() or key in seen:
            return
        seen.add(key)
        pairs.append({
            "prompt": _feedback_prompt(fb),
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        })  # fmt: skip

    by_question: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for fb in records:
        if fb.get("preferred_answer"):
            add(fb, fb["preferred_answer"], fb["answer"])
        by_question.setdefault(_norm(fb["question"]), {"up": [], "down": []})[fb["rating"]].append(fb)
    for group in by_question.values():
        for up in group["up"]:
            for down in group["down"]:
                add(up, up["answer"], down["answer"])
    return pairs


# ---------------------------------------------------------------------------------------
# Building datasets
# ---------------------------------------------------------------------------------------


@dataclass
class BuiltDataset:
    """Examples built from the training files.

    Attributes:
        examples: Formatted examples (``prompt``/``completion`` or ``prompt``/``chosen``/``rejected``).
        files: The input files.
        hash: :func:`data_hash` of the files.
        records: Non-blank input lines read.
        retrieved: Records whose passages were retrieved from the index.
    """

    examples: list[Example]
    files: list[str]
    hash: str
    records: int
    retrieved: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def split(self, eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
        """Deterministic train / held-out split (see :func:`split_examples`)."""
        return split_examples(self.examples, eval_fraction, seed)


def split_examples(examples: Sequence[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Shuffle with ``seed`` and hold out ``eval_fraction`` (at least one example when > 0).

    Raises:
        InputError: fewer than two examples while an eval split is asked for.
    """
    items = list(examples)
    if eval_fraction <= 0:
        return items, []
    if len(items) < 2:
        raise InputError(
            f"{len(items)} example(s): too few to hold out an eval split; add data or set "
            "finetune.<sft|reward>.eval_fraction=0"
        )
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(len(items) * eval_fraction)), len(items) - 1)
    held = set(order[:n_eval])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def _raise_errors(errors: list[str]) -> None:
    if not errors:
        return
    shown = "\n  ".join(errors[:MAX_REPORTED_ERRORS])
    more = f"\n  ... and {len(errors) - MAX_REPORTED_ERRORS} more" if len(errors) > MAX_REPORTED_ERRORS else ""
    raise InputError(f"{len(errors)} malformed training record(s):\n  {shown}{more}")


def _run_stages(
    lines: list[dict[str, Any]],
    stages: list[tuple[str, Any]],
    runner: str,
    settings: Settings | None,
) -> list[dict[str, Any]]:
    """Apply ``("map"|"batch", fn)`` stages with Ray Data or in-process; rows in input order."""
    if runner == "local":
        rows = lines
        for how, fn in stages:
            if how == "map":
                rows = [fn(r) for r in rows]
            else:
                if not rows:
                    continue
                cols = {k: [r[k] for r in rows] for k in rows[0]}
                out = fn(cols)
                rows = [{k: out[k][i] for k in out} for i in range(len(rows))]
                close = getattr(fn, "close", None)
                if close:
                    close()
        return rows
    import ray

    from ragops.raylocal import ensure_ray

    ensure_ray(settings.ray if settings is not None else None)
    ds = ray.data.from_items(lines)
    for how, fn in stages:
        if how == "map":
            ds = ds.map(fn)
        else:
            # One actor: an embedded (Edge) index admits a single opener.
            ds = ds.map_batches(
                type(fn), fn_constructor_args=(fn.settings, fn.k, fn.tokenizer_dir, fn.gguf_file),
                batch_size=16, concurrency=1, num_cpus=1, batch_format="numpy",
            )  # fmt: skip
    rows = [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in ds.take_all()]
    # Ray Data may reorder blocks; the split and hashes need the file order.
    return sorted(rows, key=lambda r: (r["file"], int(r["line"])))


def _needs_retrieval(lines: Iterable[Mapping[str, Any]]) -> bool:
    # A cheap textual pre-scan: a false positive only opens the index for nothing.
    return any('"retrieve"' in row["text"] for row in lines)


def build_sft_examples(
    data: str | Path | Sequence[str | Path],
    settings: Settings,
    *,
    runner: str | None = None,
    tokenizer_dir: str | None = None,
    gguf_file: str | None = None,
) -> BuiltDataset:
    """Read, validate and format SFT records (chat and RAG triples).

    Args:
        data: A file, folder of ``*.jsonl`` or glob.
        settings: Full settings (``finetune.data`` and, for ``retrieve`` records, the index).
        runner: ``'ray'`` (Ray Data) or ``'local'``; default ``finetune.data.runner``.
        tokenizer_dir, gguf_file: Tokenizer that counts retrieved passages' tokens.

    Raises:
        InputError: missing files, malformed records (all listed with file:line), no examples.
    """
    cfg = settings.finetune.data
    paths = expand_data_paths(data)
    lines = read_lines(paths, cfg.max_examples)
    if not lines:
        raise InputError(f"training data {', '.join(map(str, paths))} is empty: no records")
    stages: list[tuple[str, Any]] = [("map", ParseRecord())]
    retrieve = _needs_retrieval(lines)
    if retrieve:
        stages.append(("batch", RetrieveContexts(settings, cfg.retrieve_k, tokenizer_dir, gguf_file)))
    stages.append(("map", FormatSFT(cite=cfg.cite)))
    rows = _run_stages(lines, stages, runner or cfg.runner, settings)
    _raise_errors([r["error"] for r in rows if r["error"]])
    examples = [ex for r in rows for ex in json.loads(r["examples"])]
    if not examples:
        raise InputError(f"training data {', '.join(map(str, paths))}: no examples")
    n_retrieved = sum(1 for row in lines if '"retrieve"' in row["text"]) if retrieve else 0
    return BuiltDataset(examples, [str(p) for p in paths], data_hash(paths), len(lines), n_retrieved)


def build_preference_examples(
    data: str | Path | Sequence[str | Path],
    settings: Settings,
    *,
    runner: str | None = None,
) -> BuiltDataset:
    """Read, validate and pair preference records (pairs and chat feedback).

    Raises:
        InputError: missing files, malformed records (file:line), or no pairs at all (e.g.
            feedback with only up-votes and no preferred answers).
    """
    cfg = settings.finetune.data
    paths = expand_data_paths(data)
    lines = read_lines(paths, cfg.max_examples)
    if not lines:
        raise InputError(f"preference data {', '.join(map(str, paths))} is empty: no records")
    rows = _run_stages(lines, [("map", ParseRecord()), ("map", FormatPreference())], runner or cfg.runner, settings)
    _raise_errors([r["error"] for r in rows if r["error"]])
    examples = [ex for r in rows if r["examples"] for ex in json.loads(r["examples"])]
    feedback = [json.loads(r["feedback"]) for r in rows if r["feedback"]]
    examples += pair_feedback(feedback)
    if not examples:
        hint = " (feedback needs a preferred_answer or an up- and a down-rated answer to the same question)" if feedback else ""
        raise InputError(f"preference data {', '.join(map(str, paths))}: no preference pairs{hint}")
    return BuiltDataset(examples, [str(p) for p in paths], data_hash(paths), len(lines), extra={"feedback_records": len(feedback)})


def to_language_modeling(examples: Iterable[Example]) -> list[Example]:
    """``prompt``/``completion`` → ``messages`` (loss on every token, ``sft.loss_on: all``)."""
    return [{"messages": ex["prompt"] + ex["completion"]} for ex in examples]

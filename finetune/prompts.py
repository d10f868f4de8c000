"""PPO prompts: JSON Lines (or the chat endpoint's feedback) → chat prompts with their passages.

One record per line, any of:

* ``{"prompt": "text" | [messages]}`` — a plain prompt (no passages);
* ``{"prompt" | "question": "text", "contexts": [str | {"text", "title"?, ...}, ...]}`` — a RAG
  prompt over the given passages;
* ``{"question": "text", "retrieve": true}`` — a RAG prompt over passages retrieved from the
  index when the prompts are built (exactly as for SFT: :class:`~ragops.finetune.datasets.RetrieveContexts`);
* a chat feedback record (``{"question", "passages", "answer", "rating", ...}``, as stored by
  the chat endpoint) — a RAG prompt over the passages that request was answered with.

``--prompts feedback`` reads ``<serve.feedback_dir or data_dir/feedback>/feedback.jsonl``; a
question asked several times is used once (its latest passages win).

RAG prompts are built with the stuff reader's :func:`~ragops.retrieval.prompts.build_stuff_messages`,
so the policy is trained on exactly the prompts serving sends it, and the ``rag`` reward sees
the same numbered passages the answer cites.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragops.finetune.datasets import (
    BuiltDataset,
    RecordError,
    RetrieveContexts,
    _messages,
    _norm,
    _passages,
    _raise_errors,
    _run_stages,
    _where,
    data_hash,
    expand_data_paths,
    read_lines,
)
from ragops.retrieval.prompts import as_passages, build_stuff_messages
from ragops.serve.feedback import FEEDBACK_FILE, feedback_dir

from ragops.errors import InputError

if TYPE_CHECKING:
    from ragops.config import Settings

#: ``--prompts feedback``: the chat endpoint's feedback records.
FEEDBACK_SOURCE = "feedback"


class ParsePrompt:
    """Raw line → ``{"file", "line", "kind", "record", "error"}`` (the row shape RetrieveContexts reads)."""

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        base = {"file": row["file"], "line": row["line"]}
        try:
            rec = json.loads(row["text"])
        except ValueError as exc:
            return {**base, "kind": "", "record": "", "error": f"{_where(row)}: not valid JSON ({exc})"}
        if not isinstance(rec, dict):
            return {**base, "kind": "", "record": "", "error": f"{_where(row)}: expected a JSON object, got {type(rec).__name__}"}
        if "rating" in rec:
            kind = "feedback"
        elif "prompt" in rec or "question" in rec:
            kind = "prompt"
        else:
            return {
                **base, "kind": "", "record": "",
                "error": f"{_where(row)}: expected 'prompt', 'question' (+ 'contexts' or \"retrieve\": true) or a feedback "
                f"record; got keys {sorted(rec)}",
            }  # fmt: skip
        return {**base, "kind": kind, "record": json.dumps(rec), "error": ""}


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"'{key}' must be a non-empty string")
    return value


def format_prompt(kind: str, rec: Mapping[str, Any]) -> dict[str, Any]:
    """A parsed record → ``{"prompt": messages, "question": str, "passages": [{"n", "text", ...}]}``.

    Raises:
        RecordError: a malformed record.
    """
    if kind == "feedback":
        question = _text(rec.get("question"), "question")
        passages = _passages(rec.get("passages", []), "passages")
    elif "contexts" in rec or rec.get("retrieve") is True:
        key = "question" if "question" in rec else "prompt"
        question = _text(rec.get(key), key)
        if "contexts" not in rec:
            raise RecordError("'retrieve' is true but no passages were retrieved (is the index empty?)")
        passages = _passages(rec["contexts"], "contexts")
    else:
        key = "prompt" if "prompt" in rec else "question"
        value = rec[key]
        messages = [{"role": "user", "content": _text(value, key)}] if isinstance(value, str) else _messages(value, key)
        if messages[-1]["role"] != "user":
            raise RecordError(f"'{key}' must end with a user message (the turn to answer)")
        return {"prompt": messages, "question": messages[-1]["content"], "passages": []}
    numbered = as_passages(passages)
    return {
        "prompt": build_stuff_messages(question, numbered),
        "question": question,
        "passages": [{"n": p.n, "text": p.text, **({"title": p.title} if p.title else {})} for p in numbered],
    }


class FormatPrompt:
    """Parsed row → ``{"example": JSON}`` or ``{"error"}``."""

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        base = {"file": row["file"], "line": row["line"], "kind": row["kind"]}
        if row["error"]:
            return {**base, "example": "", "error": row["error"]}
        try:
            example = format_prompt(row["kind"], json.loads(row["record"]))
        except RecordError as exc:
            return {**base, "example": "", "error": f"{_where(row)}: {exc}"}
        return {**base, "example": json.dumps(example), "error": ""}


def feedback_file(settings: Settings) -> Path:
    """Where the chat endpoint stores feedback records (the serving layer's own answer)."""
    return feedback_dir(settings) / FEEDBACK_FILE


def build_ppo_prompts(
    source: str | Path | Sequence[str | Path],
    settings: Settings,
    *,
    runner: str | None = None,
    tokenizer_dir: str | None = None,
    gguf_file: str | None = None,
) -> BuiltDataset:
    """Read, validate and format PPO prompts (see the module docstring).

    Args:
        source: ``"feedback"``, a file, a folder of ``*.jsonl`` or a glob.
        settings: Full settings (``finetune.data``; the index for ``retrieve`` records).
        runner: ``'ray'`` (Ray Data) or ``'local'``; default ``finetune.data.runner``.
        tokenizer_dir, gguf_file: Tokenizer that counts retrieved passages' tokens.

    Raises:
        InputError: no such file, no feedback yet, malformed records (file:line), no prompts.
    """
    cfg = settings.finetune.data
    if isinstance(source, (str, Path)) and str(source) == FEEDBACK_SOURCE:
        path = feedback_file(settings)
        if not path.is_file():
            raise InputError(
                f"--prompts feedback: no feedback yet ({path} does not exist); rate answers in the chat endpoint "
                "or pass a prompts file"
            )
        paths = [path]
    else:
        paths = expand_data_paths(source)
    lines = read_lines(paths, cfg.max_examples)
    if not lines:
        raise InputError(f"prompts {', '.join(map(str, paths))} hold no records")
    stages: list[tuple[str, Any]] = [("map", ParsePrompt())]
    retrieve = any('"retrieve"' in row["text"] for row in lines)
    if retrieve:
        stages.append(("batch", RetrieveContexts(settings, cfg.retrieve_k, tokenizer_dir, gguf_file)))
    stages.append(("map", FormatPrompt()))
    rows = _run_stages(lines, stages, runner or cfg.runner, settings)
    errors = [r["error"] for r in rows if r["error"]]
    if errors:
        try:
            _raise_errors(errors)
        except InputError as exc:
            raise InputError(str(exc).replace("training record", "prompt record")) from None
    examples = [json.loads(r["example"]) for r in rows]
    if any(r["kind"] == "feedback" for r in rows):
        # A question rated several times is one prompt; the latest record's passages win.
        latest: dict[str, dict[str, Any]] = {}
        for ex in examples:
            latest.pop(_norm(ex["question"]), None)
            latest[_norm(ex["question"])] = ex
        examples = list(latest.values())
    if not examples:
        raise InputError(f"prompts {', '.join(map(str, paths))}: no prompts")
    n_retrieved = sum(1 for row in lines if '"retrieve"' in row["text"]) if retrieve else 0
    with_passages = sum(1 for ex in examples if ex["passages"])
    return BuiltDataset(
        examples, [str(p) for p in paths], data_hash(paths), len(lines), n_retrieved,
        extra={"prompts": len(examples), "with_passages": with_passages},
    )  # fmt: skip

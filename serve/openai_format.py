"""OpenAI response objects: chat completions (whole and streamed), embeddings, model lists.

Extensions ride along as extra top-level fields, which OpenAI clients keep and ignore:
``citations`` (``[{n, doc_id, chunk_id, source, score}]``, extractive answers add ``start``,
``end`` and ``quote``) and ``grounded`` (the grounding check's verdict, null when it is off) on
the completion and on the last streamed chunk, and ``ragops`` (timings, reader, whether the
query was truncated, ``abstained``, ``grounding`` with per-sentence support scores,
``flagged_passages`` that carried instruction-like text, and for whole answers the size of the
batch they were decoded in).
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Sequence
from typing import Any

DONE = "data: [DONE]\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """An OpenAI ``usage`` object."""
    return {
        "prompt_tokens": int(prompt_tokens),
        "completion_tokens": int(completion_tokens),
        "total_tokens": int(prompt_tokens) + int(completion_tokens),
    }


def _extension(answer: dict[str, Any]) -> dict[str, Any]:
    ext = {
        "timings": answer.get("timings", {}),
        "reader": answer.get("reader"),
        "query_truncated": bool(answer.get("query_truncated", False)),
        "abstained": bool(answer.get("abstained", False)),
        "grounding": answer.get("grounding"),
        "flagged_passages": answer.get("flagged_passages", []),
    }
    if "batch_size" in answer:  # whole answers: how many were decoded in the same batch
        ext["batch_size"] = answer["batch_size"]
    return ext


def chat_completion(request_id: str, model: str, created: int, answer: dict[str, Any], *, variant: str | None = None) -> dict[str, Any]:
    """A ``chat.completion`` object from a generator answer (``Answer.to_dict`` plus extras).

    ``variant`` (the traffic split's pick, or what answered) goes next to ``citations``.
    """
    u = answer.get("usage") or {}
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer["answer"], "refusal": None},
                "logprobs": None,
                "finish_reason": answer.get("finish_reason", "stop"),
            }
        ],
        "usage": usage(u.get("prompt_tokens", 0), u.get("completion_tokens", 0)),
        "citations": answer.get("citations", []),
        "variant": variant,
        "grounded": answer.get("grounded"),
        "ragops": _extension(answer),
    }


def chunk(
    request_id: str,
    model: str,
    created: int,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A ``chat.completion.chunk`` with one choice."""
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        **extra,
    }


def final_chunk(request_id: str, model: str, created: int, answer: dict[str, Any], *, variant: str | None = None) -> dict[str, Any]:
    """The last content chunk: empty delta, finish reason, citations, variant."""
    return chunk(request_id, model, created, {}, answer.get("finish_reason", "stop"),
                 citations=answer.get("citations", []), variant=variant, grounded=answer.get("grounded"),
                 ragops=_extension(answer))  # fmt: skip


def usage_chunk(request_id: str, model: str, created: int, answer: dict[str, Any]) -> dict[str, Any]:
    """``stream_options.include_usage``: a chunk with no choices and the usage."""
    u = answer.get("usage") or {}
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [],
        "usage": usage(u.get("prompt_tokens", 0), u.get("completion_tokens", 0)),
    }


def sse(data: dict[str, Any]) -> str:
    """One server-sent event carrying JSON."""
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def embeddings(vectors: Sequence[Sequence[float]], model: str, tokens: int, encoding_format: str) -> dict[str, Any]:
    """An embeddings ``list``; ``base64`` packs little-endian float32 like OpenAI's API."""
    data = []
    for i, vec in enumerate(vectors):
        if encoding_format == "base64":
            emb: Any = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
        else:
            emb = [float(x) for x in vec]
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def model_card(model_id: str, created: int, *, owned_by: str = "ragops", root: str | None = None,
               parent: str | None = None, kind: str = "chat") -> dict[str, Any]:  # fmt: skip
    """One entry of ``GET /v1/models`` (``root``/``parent``/``kind`` are extensions, as in vLLM)."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by,
            "root": root or model_id, "parent": parent, "kind": kind}  # fmt: skip

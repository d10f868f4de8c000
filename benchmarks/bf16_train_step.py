"""Time one embedder training step on CPU in fp32 and under bf16 autocast, alternately.

The step is what ``ragops train embedder`` does per batch with one hard negative: the packaged
MiniLM encodes 32 queries and 64 passages (``--passage-words`` words each), in-batch softmax
loss, backward, AdamW. bf16 pays off only on CPUs with bf16 units (``avx512_bf16``/AMX).

Usage::

    python benchmarks/bf16_train_step.py --repeats 3
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="steps per precision per round (two rounds)")
    ap.add_argument("--passage-words", type=int, default=190)
    args = ap.parse_args()
    from ragops.config import load_settings
    from ragops.model_registry import resolve_model
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(resolve_model(load_settings([], []).embedder.model).locate()), device="cpu")
    model.train()
    queries = ["return the absolute value of a number"] * 32
    passages = ["word " * args.passage_words] * 64
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(bf16: bool) -> float:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            q = model(model.preprocess(queries))["sentence_embedding"]
            p = model(model.preprocess(passages))["sentence_embedding"]
            loss = torch.nn.functional.cross_entropy((q @ p.T).float() * 20, torch.arange(len(queries)))
        loss.backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - started

    for bf16 in (False, True, False, True):  # alternate, so drift in machine load hits both
        print("bf16" if bf16 else "fp32", [round(step(bf16), 2) for _ in range(args.repeats)], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

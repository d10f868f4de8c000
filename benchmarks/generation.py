"""Generation speed: our Generator and readers against a bare ``model.generate``.

Measures, on one fixed RAG prompt (a question and 5 passages, the stuff reader's prompt):

* tokens/s of bare ``model.generate`` (greedy, ``max_new_tokens == min_new_tokens`` so every
  variant produces exactly the same number of tokens), of ``model.generate`` with a
  ``TextIteratorStreamer`` thread (the usual way to stream), of ``Generator.generate``,
  ``Generator.stream`` and ``StuffReader.read`` (what ``ragops ask`` runs), each as a ratio to
  the bare baseline. Tokens/s is end to end: generated tokens / wall time of the call, prompt
  prefill included (our variants also pay chat templating and tokenization; bare gets ids);
* time to first token of the stuff reader (one prompt of 5 passages) and of the FiD reader
  (5 per-passage prompts, prefilled as one batch), with FiD's decode speed.

Variants run round-robin, ``--repeats`` times each after one warm-up call, and the medians are
reported with the best run of each (the least disturbed by other processes on a shared
machine), so background load hits them all alike. Greedy outputs are checked to be identical.

Usage::

    python benchmarks/generation.py [--model smollm2-135m-instruct] [--new-tokens 64] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from collections.abc import Callable

import torch

from ragops.config import GeneratorConfig
from ragops.retrieval.generation import Generator
from ragops.retrieval.prompts import Passage, build_stuff_messages
from ragops.retrieval.readers import FiDReader, StuffReader

QUESTION = "When was the Eiffel Tower built, and how tall is it?"
PASSAGES = [
    Passage(
        n=1,
        title="Eiffel Tower",
        text=(
            "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
            "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. "
            "It was the entrance arch to the 1889 World's Fair and was initially criticised by some of France's "
            "leading artists and intellectuals for its design."
        ),
    ),
    Passage(
        n=2,
        title="Eiffel Tower dimensions",
        text=(
            "The tower is 330 metres tall, about the same height as an 81-storey building, and the tallest "
            "structure in Paris. Its base is square, measuring 125 metres on each side. During its construction "
            "it surpassed the Washington Monument to become the tallest human-made structure in the world, a "
            "title it held for 41 years until the Chrysler Building in New York City was finished in 1930."
        ),
    ),
    Passage(
        n=3,
        title="Paris",
        text=(
            "Paris is the capital and most populous city of France. Since the 17th century Paris has been one "
            "of the world's major centres of finance, diplomacy, commerce, culture, fashion and gastronomy. "
            "The city is a major railway, highway and air-transport hub served by two international airports."
        ),
    ),
    Passage(
        n=4,
        title="Statue of Liberty",
        text=(
            "The Statue of Liberty is a colossal neoclassical sculpture on Liberty Island in New York Harbor. "
            "The copper statue, a gift from the people of France, was designed by Frederic Auguste Bartholdi and "
            "its metal framework was built by Gustave Eiffel. The statue was dedicated on October 28, 1886."
        ),
    ),
    Passage(
        n=5,
        title="World's Fair 1889",
        text=(
            "The Exposition Universelle of 1889 was a world's fair held in Paris from 6 May to 31 October 1889. "
            "It was held during the year of the 100th anniversary of the storming of the Bastille. The fair "
            "included a reconstruction of the Bastille and attracted more than 32 million visitors."
        ),
    ),
]


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run(model: str, new_tokens: int, repeats: int) -> dict[str, object]:
    gen = Generator(GeneratorConfig(model=model, max_new_tokens=new_tokens))
    started = time.perf_counter()
    gen.warm_up()
    load_s = time.perf_counter() - started
    hf_model, tok = gen.model, gen.tokenizer
    messages = build_stuff_messages(QUESTION, PASSAGES)
    ids = torch.tensor([gen.apply_chat_template(messages, tokenize=True)], device=gen.device)
    mask = torch.ones_like(ids)
    greedy = {"max_new_tokens": new_tokens, "temperature": 0.0, "min_new_tokens": new_tokens}
    hf_kwargs = {
        "attention_mask": mask, "do_sample": False, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens,
        "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    }
    stuff, fid = StuffReader(gen), FiDReader(gen)
    texts: dict[str, str] = {}

    def bare() -> tuple[int, float | None]:
        with torch.inference_mode():
            out = hf_model.generate(ids, **hf_kwargs)
        texts["bare"] = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        return out.shape[1] - ids.shape[1], None

    def bare_streamer() -> tuple[int, float | None]:
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)

        def work() -> None:
            with torch.inference_mode():
                hf_model.generate(ids, streamer=streamer, **hf_kwargs)

        t0 = time.perf_counter()
        thread = threading.Thread(target=work)
        thread.start()
        first, parts = None, []
        for part in streamer:
            if first is None and part:
                first = time.perf_counter() - t0
            parts.append(part)
        thread.join()
        texts["bare+streamer"] = "".join(parts)
        return new_tokens, first

    def ours_generate() -> tuple[int, float | None]:
        res = gen.generate(messages, **greedy)
        texts["Generator.generate"] = res.text
        return res.completion_tokens, res.timings.time_to_first_token_s

    def ours_stream() -> tuple[int, float | None]:
        stream = gen.stream(messages, **greedy)
        texts["Generator.stream"] = "".join(stream)
        return stream.result.completion_tokens, stream.result.timings.time_to_first_token_s

    def stuff_read() -> tuple[int, float | None]:
        res = stuff.read(QUESTION, PASSAGES, **greedy)
        texts["StuffReader.read"] = res.answer
        return res.completion_tokens, res.timings.time_to_first_token_s

    def fid_read() -> tuple[int, float | None]:
        res = fid.read(QUESTION, PASSAGES, **greedy)
        texts["FiDReader.read"] = res.answer
        return res.completion_tokens, res.timings.time_to_first_token_s

    variants: dict[str, Callable[[], tuple[int, float | None]]] = {
        "bare model.generate": bare,
        "model.generate + TextIteratorStreamer": bare_streamer,
        "Generator.generate": ours_generate,
        "Generator.stream": ours_stream,
        "StuffReader.read (ragops ask)": stuff_read,
        "FiDReader.read (5 passages)": fid_read,
    }
    samples: dict[str, dict[str, list[float]]] = {k: {"tps": [], "ttft": []} for k in variants}
    for fn in variants.values():  # warm-up: first-call allocations and kernel selection
        fn()
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            n, ttft = fn()
            wall = time.perf_counter() - t0
            samples[name]["tps"].append(n / wall)
            if ttft is not None:
                samples[name]["ttft"].append(ttft)

    base = _median(samples["bare model.generate"]["tps"])
    base_best = max(samples["bare model.generate"]["tps"])
    rows = []
    for name, s in samples.items():
        tps, best = _median(s["tps"]), max(s["tps"])
        rows.append({
            "variant": name,
            "tokens_per_s": tps,
            "ratio_to_bare": tps / base,
            "best_tokens_per_s": best,
            "best_ratio_to_bare": best / base_best,
            "ttft_s": _median(s["ttft"]),
            "best_ttft_s": min(s["ttft"]) if s["ttft"] else float("nan"),
        })
    same = texts["bare"] == texts["Generator.generate"] == texts["Generator.stream"] == texts["StuffReader.read"]
    return {
        "model": model,
        "device": gen.device,
        "torch_threads": torch.get_num_threads(),
        "prompt_tokens_stuff": int(ids.shape[1]),
        "fid_prompt_tokens": [len(gen.apply_chat_template(m, tokenize=True)) for m in _fid_prompts()],
        "new_tokens": new_tokens,
        "repeats": repeats,
        "load_s": load_s,
        "identical_greedy_text": same,
        "rows": rows,
        "answers": {"stuff": texts["StuffReader.read"], "fid": texts["FiDReader.read"]},
    }


def _fid_prompts() -> list[list[dict[str, str]]]:
    from ragops.retrieval.prompts import build_fid_messages

    return [build_fid_messages(QUESTION, p) for p in PASSAGES]


def render(report: dict[str, object]) -> str:
    lines = [
        f"model {report['model']} on {report['device']} ({report['torch_threads']} torch threads), "
        f"{report['new_tokens']} new tokens (greedy, min_new_tokens = max_new_tokens), "
        f"{report['repeats']} interleaved runs per variant; load {report['load_s']:.1f} s",
        f"stuff prompt: {report['prompt_tokens_stuff']} tokens; FiD prompts: {report['fid_prompt_tokens']} tokens",
        f"greedy text identical (bare / Generator.generate / stream / StuffReader): {report['identical_greedy_text']}",
        "",
        "| variant | tokens/s median | ratio to bare (median) | tokens/s best | ratio to bare (best) "
        "| TTFT median (s) | TTFT best (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def secs(x: float) -> str:
        return "-" if x != x else f"{x:.3f}"  # NaN: the variant has no first-token time

    for r in report["rows"]:  # type: ignore[union-attr]
        lines.append(
            f"| {r['variant']} | {r['tokens_per_s']:.1f} | {r['ratio_to_bare']:.2f} | {r['best_tokens_per_s']:.1f} "
            f"| {r['best_ratio_to_bare']:.2f} | {secs(r['ttft_s'])} | {secs(r['best_ttft_s'])} |"
        )
    answers = report["answers"]
    lines += ["", f"stuff answer: {answers['stuff']!r}", f"fid answer:   {answers['fid']!r}"]  # type: ignore[index]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="generator: registry name or local path")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per call")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (after one warm-up)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()
    report = run(args.model, args.new_tokens, args.repeats)
    report["machine"] = platform.processor() or platform.machine()
    print(json.dumps(report, indent=2) if args.json else render(report))


if __name__ == "__main__":
    main()

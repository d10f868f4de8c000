"""Answer quality per reader on the sample corpus: right answers, right citations, right silences.

Ingests ``samples/docs`` into a scratch data directory (or uses ``--data-dir``), retrieves once
per question (hybrid, ``--k`` passages, the same passages for every reader) and answers with:

* ``extractive`` — the passages' best sentences (no generator);
* ``stuff`` — the generator over numbered passages, as generated (grounding off, no abstention);
* ``stuff+fallback`` — the same generations through the grounding check in ``fallback`` mode
  with abstention (what ``generator.reader: stuff`` serves by default); replaying ``stuff``'s
  answers keeps the comparison exact and halves the run time;
* ``fid`` — fusion in decoding, as generated.

For each: share of answerable questions whose answer contains the key (whole words, SQuAD
normalisation), exact match and token F1 to the key, citation precision (of the (sentence,
cited passage) pairs, the share where the passage supports the sentence by the shared support
measure at ``generator.min_support``), abstention precision/recall on the unanswerable set and
the abstention rate on the answerable set ("abstains" = says the documents do not cover it, or
a generated "I don't know"), and p50/p90 latency (retrieval plus reading).

It also calibrates ``generator.abstain_below``: the extractive evidence score of every question
is recorded, and the largest threshold that abstains on at most ``--max-false-abstain`` of the
answerable questions is chosen on the even-numbered questions and checked on the odd ones.

Usage::

    python benchmarks/answer_quality.py [--readers extractive,stuff,stuff+fallback,fid] [--k 5]
        [--limit N] [--out benchmarks/out/answer_quality.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ragops.config import load_settings
from ragops.retrieval.decoding import ResultStream
from ragops.retrieval.grounding import GroundedReader, is_dont_know
from ragops.retrieval.metrics import answer_contains, exact_match, token_f1
from ragops.retrieval.rag import RAGPipeline, reader_for
from ragops.retrieval.support import claim_spans, cited_numbers, strip_citations, support

ROOT = Path(__file__).resolve().parent.parent
READERS = ("extractive", "stuff", "stuff+fallback", "fid")


class Replay:
    """A reader that returns a stored result: grounding applied to answers already generated."""

    def __init__(self, result: Any) -> None:
        self.result = result
        self.name = result.reader

    def stream(self, question: str, passages: Any, **_: Any) -> ResultStream[Any]:
        def run() -> Any:
            if self.result.answer:
                yield self.result.answer
            return self.result

        return ResultStream(run())


def cited_pairs(answer: str, passages: list[Any], min_support: float) -> tuple[int, int]:
    """(supported, total) over the answer's (sentence, cited passage) pairs."""
    texts = {p.n: p.text for p in passages}
    ok = total = 0
    for s, e in claim_spans(answer):
        sentence = answer[s:e]
        for n in cited_numbers(sentence):
            total += 1
            ok += n in texts and support(sentence, texts[n]) >= min_support
    return ok, total


def score(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate metrics of one reader's rows."""
    ans = [r for r in rows if r["answerable"]]
    una = [r for r in rows if not r["answerable"]]
    abstained = [r for r in rows if r["abstained"]]
    ok = sum(r["cite_ok"] for r in rows)
    total = sum(r["cite_total"] for r in rows)
    lat = sorted(r["latency_s"] for r in rows)

    def mean(xs: list[float]) -> float:
        return round(sum(xs) / len(xs), 4) if xs else 0.0

    return {
        "answerable": len(ans),
        "unanswerable": len(una),
        "contains_key": mean([r["contains"] for r in ans]),
        "contains_key_when_answered": mean([r["contains"] for r in ans if not r["abstained"]]),
        "exact_match": mean([r["em"] for r in ans]),
        "f1": mean([r["f1"] for r in ans]),
        "citation_precision": round(ok / total, 4) if total else None,
        "citations": total,
        "abstain_precision": round(sum(not r["answerable"] for r in abstained) / len(abstained), 4) if abstained else None,
        "abstain_recall": mean([float(r["abstained"]) for r in una]),
        "abstain_rate_answerable": mean([float(r["abstained"]) for r in ans]),
        "p50_latency_s": round(statistics.median(lat), 3) if lat else None,
        "p90_latency_s": round(lat[int(0.9 * (len(lat) - 1))], 3) if lat else None,
    }


def calibrate(evidence: list[tuple[int, bool, float]], max_false: float) -> dict[str, Any]:
    """Pick ``abstain_below`` on the even questions, check it on the odd ones."""

    def rates(items: list[tuple[int, bool, float]], t: float) -> tuple[float, float]:
        a = [e for _, ok, e in items if ok]
        u = [e for _, ok, e in items if not ok]
        return (sum(e < t for e in a) / max(len(a), 1), sum(e < t for e in u) / max(len(u), 1))

    fit = [x for x in evidence if x[0] % 2 == 0]
    test = [x for x in evidence if x[0] % 2 == 1]
    candidates = sorted({round(e + 1e-4, 4) for _, _, e in fit})
    best = 0.0
    for t in candidates:
        if rates(fit, t)[0] <= max_false:
            best = t
    out: dict[str, Any] = {"threshold": best}
    for name, items in (("fit", fit), ("test", test), ("all", evidence)):
        fa, rec = rates(items, best)
        out[name] = {"false_abstain": round(fa, 4), "abstain_recall": round(rec, 4), "n": len(items)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", default=str(ROOT / "samples/eval/answer_quality.jsonl"))
    ap.add_argument("--docs", default=str(ROOT / "samples/docs"))
    ap.add_argument("--data-dir", default=None, help="Use this data dir (ingested if empty); default: a scratch one.")
    ap.add_argument("--readers", default=",".join(READERS))
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--limit", type=int, default=None, help="Only the first N questions (smoke runs).")
    ap.add_argument("--max-false-abstain", type=float, default=0.05)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="Settings override (dotted.key=value).")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/out/answer_quality.json"))
    args = ap.parse_args()
    readers = [r for r in args.readers.split(",") if r]
    unknown = set(readers) - set(READERS)
    if unknown:
        sys.exit(f"unknown reader(s): {', '.join(sorted(unknown))}; allowed: {', '.join(READERS)}")

    questions = [json.loads(line) for line in Path(args.questions).read_text().splitlines() if line.strip()]
    questions = questions[: args.limit] if args.limit else questions
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="ragops-aq-")
    settings = load_settings(overrides=args.overrides, data_dir=data_dir)
    if not any(Path(data_dir).iterdir()):
        print(f"ingesting {args.docs} into {data_dir} ...", file=sys.stderr)
        subprocess.run(["ragops", "ingest", args.docs, "--data-dir", data_dir, *sum((["--set", o] for o in args.overrides), [])],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    g = settings.generator
    raw = settings.model_copy(update={"generator": g.model_copy(update={"grounding": "off", "abstain_below": 0.0})})
    rows: dict[str, list[dict[str, Any]]] = {r: [] for r in readers}
    evidence: list[tuple[int, bool, float]] = []
    with RAGPipeline(settings) as rag:
        rag.warm_up()
        embedder = rag.retriever.encoder.embedder
        for i, q in enumerate(questions):
            t0 = time.perf_counter()
            search, passages = rag.retrieve(q["question"], k=args.k)
            retrieve_s = time.perf_counter() - t0
            grounded_ext = reader_for(settings, rag.generator, "extractive", embedder=embedder)
            results: dict[str, tuple[Any, float]] = {}
            for name in readers:
                t1 = time.perf_counter()
                if name == "extractive":
                    res = grounded_ext.read(q["question"], passages)
                elif name == "stuff+fallback":
                    base, base_s = results.get("stuff") or (None, 0.0)
                    if base is None:
                        base = reader_for(raw, rag.generator, "stuff", embedder=embedder).read(q["question"], passages)
                        base_s = time.perf_counter() - t1
                    check = reader_for(settings, rag.generator, "stuff", embedder=embedder)
                    t1 = time.perf_counter() - base_s  # the generation's time counts
                    res = GroundedReader(Replay(base), check.extractive, mode=g.grounding, min_support=g.min_support,
                                         abstain_below=g.abstain_below).read(q["question"], passages)  # fmt: skip
                    if res.abstained:  # the real reader abstains before generating
                        t1 = time.perf_counter() - (res.timings.total_s)
                else:
                    res = reader_for(raw, rag.generator, name, embedder=embedder).read(q["question"], passages)
                results[name] = (res, time.perf_counter() - t1)
            ev = grounded_ext.extractive.extract(q["question"], [replace(p) for p in passages]).best_score
            evidence.append((i, bool(q.get("answerable", True)), ev))
            for name, (res, read_s) in results.items():
                answer = res.answer
                ok, total = cited_pairs(answer, list(res.passages), g.min_support)
                plain = strip_citations(answer)
                rows[name].append({
                    "id": q.get("id", str(i)), "answerable": bool(q.get("answerable", True)),
                    "contains": answer_contains(plain, q["answers"]) if q["answers"] else 0.0,
                    "em": exact_match(plain, q["answers"]) if q["answers"] else 0.0,
                    "f1": token_f1(plain, q["answers"]) if q["answers"] else 0.0,
                    "cite_ok": ok, "cite_total": total,
                    "abstained": bool(res.abstained or is_dont_know(answer)),
                    "latency_s": retrieve_s + read_s, "answer": answer, "evidence": round(ev, 4),
                    "gold_retrieved": bool(set(q.get("gold_doc_ids", [])) & {p.doc_id for p in passages}),
                })
            print(f"[{i + 1}/{len(questions)}] {q['question'][:60]!r} evidence={ev:.3f} "
                  + " ".join(f"{n}={'✓' if rows[n][-1]['contains'] else ('∅' if rows[n][-1]['abstained'] else '✗')}"
                             for n in readers), file=sys.stderr, flush=True)  # fmt: skip
    report = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": __import__("os").cpu_count()},
        "command": " ".join(sys.argv),
        "settings": {"k": args.k, "abstain_below": g.abstain_below, "min_support": g.min_support,
                     "generator": g.model, "max_new_tokens": g.max_new_tokens},  # fmt: skip
        "retrieval_gold_in_top_k": round(sum(r["gold_retrieved"] for r in rows[readers[0]] if r["answerable"])
                                         / max(1, sum(r["answerable"] for r in rows[readers[0]])), 4),  # fmt: skip
        "readers": {name: score(rs) for name, rs in rows.items()},
        "calibration": calibrate(evidence, args.max_false_abstain),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()

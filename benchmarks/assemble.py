"""Assemble BENCHMARKS.md from the per-area result files (benchmarks/RESULTS-*.md)."""

from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["ingest", "embedder", "reembed", "vectorstore", "quality", "retriever-train", "latency", "answers", "engines", "generation", "serve", "llmops", "train", "ppo", "tracking"]

HEADER = """# Benchmarks

Every figure comes from a script under `benchmarks/`, with the command and the machine next
to it. Speed claims are ratios to a baseline measured in the same run on the same machine.
This file is assembled from `benchmarks/RESULTS-*.md` by `python benchmarks/assemble.py`.
"""


def main() -> None:
    files = sorted(HERE.glob("RESULTS-*.md"), key=lambda p: (ORDER.index(p.stem[8:]) if p.stem[8:] in ORDER else 99, p.name))
    parts = [HEADER]
    for f in files:
        text = f.read_text().strip()
        # Demote headings one level so each file is a section of this one.
        parts.append("\n".join("#" + line if line.startswith("#") else line for line in text.splitlines()))
    (HERE.parent / "BENCHMARKS.md").write_text("\n\n".join(parts) + "\n")


if __name__ == "__main__":
    main()

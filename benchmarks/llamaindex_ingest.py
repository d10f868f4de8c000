"""Peer baseline for ``embedder_int8.py``: a LlamaIndex ``IngestionPipeline`` on the same pages.

Runs in its own virtualenv (not the project's), e.g.::

    python -m venv benchmarks/out/li-venv
    benchmarks/out/li-venv/bin/pip install torch==2.13.0
    benchmarks/out/li-venv/bin/pip install llama-index-core llama-index-embeddings-huggingface
    benchmarks/out/li-venv/bin/python benchmarks/llamaindex_ingest.py --model PATH SLICE_DIR...

Reads the pydocs JSONL pages (one document per line: ``id``, ``title``, ``text``), splits them
with ``SentenceSplitter(chunk_size=200, chunk_overlap=32)`` (LlamaIndex counts tokens with its
own tokenizer, so chunk counts differ from ragops': compare chunks/s, and documents/s) and
embeds them with ``HuggingFaceEmbedding`` of the same float32 model folder. No vector store is
attached (the pipeline returns the nodes), so it does less than the ragops arms, which also
compute BM25 vectors and write to Qdrant. Prints one JSON line per slice.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("roots", nargs="+", type=Path)
    ap.add_argument("--model", required=True, help="the sentence-transformers model folder")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()

    from llama_index.core import Document
    from llama_index.core.ingestion import IngestionPipeline
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    embed = HuggingFaceEmbedding(model_name=args.model, device="cpu", embed_batch_size=args.batch_size)
    embed.get_text_embedding("warm-up")
    for root in args.roots:
        t0 = time.perf_counter()
        docs = []
        for page in sorted(root.rglob("*.jsonl")):
            for line in page.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    rec = json.loads(line)
                    docs.append(Document(text=f"{rec.get('title', '')}\n\n{rec['text']}", id_=str(rec["id"])))
        pipeline = IngestionPipeline(transformations=[SentenceSplitter(chunk_size=200, chunk_overlap=32), embed])
        nodes = pipeline.run(documents=docs)
        wall = time.perf_counter() - t0
        print(json.dumps({"root": str(root), "documents": len(docs), "chunks": len(nodes), "wall_s": wall}), flush=True)


if __name__ == "__main__":
    main()

"""Fine-tuning on Ray Train: datasets, SFT with LoRA, reward models, checkpoints, publishing.

Modules (heavy libraries are imported inside functions, so importing any of these is cheap):

* :mod:`.config` — the ``finetune`` settings section (pydantic only);
* :mod:`.datasets` — JSON Lines → chat / RAG / preference examples (Ray Data or in-process);
* :mod:`.models` — base model resolution, GGUF caching, LoRA / QLoRA, precision;
* :mod:`.session`, :mod:`.callbacks`, :mod:`.runner` — the Ray Train wiring shared by every
  trainer (``run_on_ray``), the in-process runner, checkpoints and run records;
* :mod:`.hf`, :mod:`.sft`, :mod:`.reward` — the TRL-based train loops;
* :mod:`.train` — ``ragops train sft|reward``: data → run → publish;
* :mod:`.gate` — the evaluation gate of ``ragops models promote``.
"""

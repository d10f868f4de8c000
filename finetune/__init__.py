"""Fine-tuning on Ray Train: datasets, SFT with LoRA, reward models, PPO, checkpoints, publishing.

Modules (heavy libraries are imported inside functions, so importing any of these is cheap):

* :mod:`.config` — the ``finetune`` settings section (pydantic only);
* :mod:`.datasets` — JSON Lines → chat / RAG / preference examples (Ray Data or in-process);
* :mod:`.models` — base model resolution, GGUF caching, LoRA / QLoRA, precision;
* :mod:`.session`, :mod:`.callbacks`, :mod:`.runner` — the Ray Train wiring shared by every
  trainer (``run_on_ray``), the in-process runner, checkpoints and run records;
* :mod:`.hf`, :mod:`.sft`, :mod:`.reward` — the TRL-based train loops;
* :mod:`.train` — ``ragops train sft|reward``: data → run → publish (:func:`~.train._execute`
  is shared with PPO);
* PPO (our own loop: TRL 1.x has no PPO trainer): :mod:`.ppo_math` (GAE, clipped losses, KL
  estimates, whitening), :mod:`.kl` (fixed / adaptive KL controllers), :mod:`.rewards` (reward
  functions: reward model, ``rag``, ``mix``, plugins), :mod:`.prompts` (prompt files and chat
  feedback), :mod:`.ppo` (the train loop), :mod:`.rollout` (the optional rollout actor pool),
  :mod:`.ppo_train` (``ragops train ppo``: prompts → run → publish);
* :mod:`.gate` — the evaluation gate of ``ragops models promote``.
"""

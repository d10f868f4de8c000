"""The closed LLMOps loop: A/B reports over served variants and the resumable ``ragops loop``.

* :mod:`ragops.llmops.abtest` — per-variant statistics from the request log and feedback
  (Wilson intervals, a fixed-horizon two-proportion test, the sample size it needs);
* :mod:`ragops.llmops.loop_state` — loop runs recorded in the registry (one record per run);
* :mod:`ragops.llmops.loop` — the steps from feedback to a decided canary.
"""

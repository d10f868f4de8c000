"""``ragops loop``: one resumable pass from real feedback to a decided canary, for one alias.

Steps (state in the registry, :mod:`ragops.llmops.loop_state`)::

    collect  feedback since the previous loop → a snapshot next to the loop record
    reward   a reward model on the snapshot's preference pairs (skipped below loop.min_pairs:
             PPO then uses loop.reward_fallback, the grounded-answer reward by default)
    ppo      PPO from the alias' current target (the control), on the snapshot's questions
    eval     `eval answers` for the candidate and the control on loop.eval_data (recorded)
    gate     the candidate must not be worse on loop.gate_metric (else the loop ends: rejected)
    canary   `<alias>-candidate` → the candidate, and the split {control: 1-c, candidate: c}
             on the route (the alias' own name by default); status becomes ``canary``

``ragops loop ALIAS --decide`` then reads the A/B report of the split since it started: ``B
better`` moves the alias to the candidate and removes the split (promoted); ``B worse`` or
``no clear difference`` removes the split and leaves the alias (rolled back); ``not enough
data`` changes nothing and says how many more ratings are needed.

Each step is a plain function of the record; the trainers it calls start Ray themselves, so
the loop runs in-process, under ``ragops job submit -- ragops loop ...``, or as a RayJob.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ragops.config import Settings
from ragops.errors import InputError
from ragops.llmops import loop_state as ls
from ragops.llmops.loop_state import LoopRecord, LoopStore

log = logging.getLogger(__name__)

#: ``on_event(step, info)``: a step started (``info["status"] == "running"``) or ended.
LoopEvents = Callable[[str, dict[str, Any]], None]


class LoopRunner:
    """Runs (or continues) the loop of one alias.

    Args:
        settings: Full settings (``loop``, ``finetune``, ``serve`` sections).
        alias: The registry alias to improve.
        route: The served name to split (default: the alias).
        on_event: Progress callback (step, info).
        progress: Per-step metric rows of the trainers (as ``ragops train`` shows them).
        api_key: Chat key for evaluating through ``loop.server_url``.
    """

    def __init__(
        self,
        settings: Settings,
        alias: str,
        *,
        route: str | None = None,
        on_event: LoopEvents | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
        api_key: str | None = None,
    ) -> None:
        from ragops.artifacts import Registry

        self.settings = settings
        self.alias = alias
        self.route = route or alias
        self.registry = Registry.from_settings(settings)
        self.store = LoopStore(self.registry.storage)
        self.on_event = on_event or (lambda step, info: None)
        self.progress = progress
        self.api_key = api_key

    # -- entry points --------------------------------------------------------------------

    def run(self) -> LoopRecord:
        """Start a loop, or continue the alias' unfinished one, up to the canary (or rejection).

        Raises:
            InputError: the alias is unknown, a canary is waiting for ``--decide``, no feedback
                since the last loop, or no eval data configured. Nothing is written then.
        """
        rec = self.store.latest(self.alias)
        if rec is not None and rec.status == ls.CANARY:
            raise InputError(
                f"loop {rec.id} of '{self.alias}' has its canary running on '{rec.route}'; "
                f"decide it first: ragops loop {self.alias} --decide"
            )
        if rec is None or rec.status in ls.FINISHED:
            rec = self._start(previous=rec)
        else:
            self.on_event("resume", {"loop": rec.id, "next": rec.next_step()})
        steps: dict[str, Callable[[LoopRecord], dict[str, Any]]] = {
            "reward": self._reward, "ppo": self._ppo, "eval": self._eval, "gate": self._gate, "canary": self._canary,
        }  # fmt: skip
        while rec.status == ls.RUNNING and (step := rec.next_step()) is not None:
            self.on_event(step, {"status": "running", "loop": rec.id})
            entry = rec.steps.setdefault(step, {})
            entry.setdefault("started_at", ls._now())
            entry["status"] = "running"
            self.store.save(rec)
            outcome = steps[step](rec)
            entry.update({**outcome, "status": outcome.get("status", "done")})
            entry["finished_at"] = ls._now()
            self.store.save(rec)
            self.on_event(step, entry)
        return rec

    def decide(self) -> LoopRecord:
        """Read the canary's A/B report and promote or roll back (or wait for more ratings).

        Raises:
            InputError: no loop of this alias has a canary running.
        """
        from ragops.llmops.abtest import ab_report
        from ragops.serve.feedback import feedback_dir

        rec = self.store.latest(self.alias)
        if rec is None or rec.status != ls.CANARY:
            state = "no loop yet" if rec is None else f"its latest loop {rec.id} is {rec.status}"
            raise InputError(f"nothing to decide for '{self.alias}': {state} (start one with `ragops loop {self.alias}`)")
        canary = rec.steps["canary"]
        ab = self.settings.loop.ab
        report = ab_report(feedback_dir(self.settings), rec.route, since=canary["started_unix"], control=rec.control,
                           weights=canary["weights"], min_effect=ab.min_effect, alpha=ab.alpha, power=ab.power,
                           confidence=ab.confidence)  # fmt: skip
        comparison = next((c for c in report["comparisons"] if c["variant"] == rec.candidate), None)
        if comparison is None:
            raise InputError(f"the A/B report of '{rec.route}' has no data on the candidate {rec.candidate} yet")
        verdict = comparison["verdict"]
        summary = {"verdict": verdict, "at": ls._now(), "comparison": comparison, "variants": report["variants"]}
        if verdict == "not enough data":
            self.on_event("decide", summary)
            rec.decision = summary
            return self.store.save(rec)
        catalog = _catalog(self.settings)
        if verdict == "B better":
            self.registry.set_alias(self.alias, rec.candidate, action="promote", note=f"{rec.id}: A/B {verdict}")
            rec.status = ls.PROMOTED
        else:
            rec.status = ls.ROLLED_BACK
        catalog.set_route(rec.route, None, by="loop", note=f"{rec.id}: {verdict}")
        rec.decision = summary
        self.on_event("decide", summary)
        return self.store.save(rec)

    # -- steps ---------------------------------------------------------------------------

    def _start(self, previous: LoopRecord | None) -> LoopRecord:
        """The collect step: take the feedback since the previous loop; write the new record."""
        from ragops.finetune.prompts import feedback_file

        control = self.registry.resolve(self.alias)  # an unknown alias fails here, before anything is written
        if not self.settings.loop.eval_data:
            raise InputError("the loop's gate needs questions with answers: pass --eval-data FILE (or set loop.eval_data)")
        since = previous.cutoff if previous is not None else 0.0
        path = feedback_file(self.settings)
        lines, newest = [], since
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a torn last line after a crash
                created = float(rec.get("created", 0)) if isinstance(rec, dict) else 0.0
                if created > since and rec.get("rating") in ("up", "down"):
                    lines.append(line + "\n")
                    newest = max(newest, created)
        need = self.settings.loop.min_feedback
        if len(lines) < need:
            when = "ever" if not since else f"since the last loop ({previous.id if previous else '-'})"
            raise InputError(
                f"no loop for '{self.alias}': {len(lines)} feedback record(s) {when} in {path}, {need} needed "
                "(rate answers with POST /v1/feedback or the chat page)"
            )
        rec = LoopRecord(id=ls.new_loop_id(), alias=self.alias, route=self.route, control=control, since=since, cutoff=newest)
        self.store.write_snapshot(rec, lines)
        rec.steps["collect"] = {"status": "done", "records": len(lines), "started_at": ls._now(), "finished_at": ls._now()}
        self.store.save(rec)
        self.on_event("collect", {**rec.steps["collect"], "loop": rec.id, "control": control})
        return rec

    def _snapshot(self, rec: LoopRecord) -> Path:
        return self.store.snapshot_path(rec, Path(self.settings.data_dir) / "cache" / "loops")

    def _training_events(self, rec: LoopRecord, step: str) -> Callable[[str, dict[str, Any]], None]:
        """Record the run id as soon as the run exists: a killed loop resumes that run."""

        def on_event(stage: str, info: dict[str, Any]) -> None:
            if stage == "run" and info.get("run_id"):
                rec.steps[step]["run_id"] = info["run_id"]
                self.store.save(rec)
            self.on_event(f"{step}.{stage}", info)

        return on_event

    def _finished(self, rec: LoopRecord, step: str) -> dict[str, Any] | None:
        """The outcome of a step's run that finished before the loop was killed (None: none did)."""
        from ragops.runs import RunStore

        run_id = rec.steps[step].get("run_id")
        if not run_id:
            return None
        try:
            run = RunStore.from_settings(self.settings).get(run_id)
        except InputError:
            return None
        if run.status != "finished" or not run.artifact or not self.registry.has(run.artifact):
            return None
        return {"artifact": run.artifact, "run_id": run_id, "metrics": _headline(self.registry.get(run.artifact).metrics)}

    def _reward(self, rec: LoopRecord) -> dict[str, Any]:
        from ragops.finetune.datasets import check_feedback, pair_feedback
        from ragops.finetune.train import train

        records = []
        for line in self._snapshot(rec).read_text(encoding="utf-8").splitlines():
            try:
                records.append(check_feedback(json.loads(line)))
            except (ValueError, InputError):
                continue  # the trainer reports malformed records; counting skips them
        pairs = len(pair_feedback(records))
        if pairs < self.settings.loop.min_pairs:
            return {"status": "skipped", "pairs": pairs,
                    "reason": f"{pairs} preference pair(s) < loop.min_pairs {self.settings.loop.min_pairs}: "
                              f"PPO uses reward '{self.settings.loop.reward_fallback}'"}  # fmt: skip
        if (done := self._finished(rec, "reward")) is not None:
            return {**done, "pairs": pairs}
        result = train(self.settings, "reward", [self._snapshot(rec)], max_steps=self.settings.loop.reward_max_steps,
                       resume=rec.steps["reward"].get("run_id"), tags={"ragops.loop": rec.id}, progress=self.progress,
                       on_event=self._training_events(rec, "reward"))  # fmt: skip
        return {"artifact": result.artifact.name, "run_id": result.run.run_id, "pairs": pairs,
                "metrics": _headline(result.run.metrics)}  # fmt: skip

    def _ppo(self, rec: LoopRecord) -> dict[str, Any]:
        from ragops.finetune.ppo_train import train_ppo

        reward_step = rec.steps.get("reward", {})
        reward = reward_step.get("artifact") or self.settings.loop.reward_fallback
        if (done := self._finished(rec, "ppo")) is not None:
            rec.candidate = done["artifact"]
            return {**done, "reward": reward}
        result = train_ppo(self.settings, str(self._snapshot(rec)), init=rec.control, reward=reward,
                           max_steps=self.settings.loop.ppo_max_steps, resume=rec.steps["ppo"].get("run_id"),
                           tags={"ragops.loop": rec.id}, progress=self.progress,
                           on_event=self._training_events(rec, "ppo"))  # fmt: skip
        rec.candidate = result.artifact.name
        return {"artifact": result.artifact.name, "run_id": result.run.run_id, "reward": reward,
                "metrics": _headline(result.run.metrics)}  # fmt: skip

    def _eval(self, rec: LoopRecord) -> dict[str, Any]:
        from ragops.llmops.evaluation import evaluate_and_record

        data = str(self.settings.loop.eval_data)
        out = {}
        for role, ref in (("control", rec.control), ("candidate", rec.candidate)):
            assert ref is not None  # the ppo step set the candidate
            out[role] = evaluate_and_record(self.settings, ref, data, k=self.settings.loop.eval_k,
                                            server_url=self.settings.loop.server_url, api_key=self.api_key,
                                            on_progress=lambda d, t, r=role: self.on_event("eval.progress", {"role": r, "done": d, "total": t}))  # fmt: skip
        return {"data": data, **out}

    def _gate(self, rec: LoopRecord) -> dict[str, Any]:
        metric = self.settings.loop.gate_metric
        assert rec.candidate is not None
        try:
            gate = self.registry.check_gate(rec.candidate, self.alias, require_metric=metric, baseline=rec.control,
                                            tolerance=self.settings.loop.gate_tolerance)  # fmt: skip
        except InputError as exc:
            rec.status, rec.reason = ls.REJECTED, str(exc)
            return {"passed": False, "metric": metric, "reason": str(exc)}
        self.registry.set_alias(f"{self.alias}-candidate", rec.candidate, action="promote", note=f"{rec.id}: passed the gate")
        return {"passed": True, "metric": metric, "gate": gate, "candidate_alias": f"{self.alias}-candidate"}

    def _canary(self, rec: LoopRecord) -> dict[str, Any]:
        share = self.settings.loop.canary
        assert rec.candidate is not None
        weights = {rec.control: round(1.0 - share, 6), rec.candidate: share}
        _catalog(self.settings).set_route(rec.route, weights, by="loop", note=f"{rec.id}: canary {share:g}")
        rec.status = ls.CANARY
        return {"weights": weights, "started_unix": time.time(), "route": rec.route}


def _catalog(settings: Settings) -> Any:
    from ragops.serve.models import ModelCatalog

    return ModelCatalog(settings)


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numeric metrics of a training result (what the loop record keeps)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

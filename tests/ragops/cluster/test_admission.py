"""Admission: demands against nodes' free room; fit, wait or one clear failure."""

from __future__ import annotations

from typing import Any

import pytest

from ragops.cluster.admission import NodeRoom, Unschedulable, admit, fit, place
from ragops.cluster.resources import job_demands, serve_demands, training_demands
from ragops.config import load_settings


def _node(cpus: float, free: float | None = None, gpus: float = 0.0, free_gpus: float | None = None) -> NodeRoom:
    return NodeRoom("n", cpus, gpus, cpus if free is None else free, gpus if free_gpus is None else free_gpus)


def _ingest(settings: Any) -> list[Any]:
    load, actors = job_demands(settings, "ingest")
    return [actors, load]


@pytest.fixture
def joined(monkeypatch: pytest.MonkeyPatch) -> None:
    """Admission as on a cluster this process joined (not a Ray it started)."""
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")


def test_the_issue_message_for_an_actor_larger_than_any_node(joined: None) -> None:
    settings = load_settings([], ["ingest.cpus_per_actor=2"], environ={})
    with pytest.raises(Unschedulable) as exc:
        admit(settings, _ingest(settings), room=lambda: [_node(1)], notify=lambda _: None)
    assert str(exc.value) == (
        "ingest.cpus_per_actor=2 × ingest.embed_actors=1 needs 2 CPUs on one node, the largest node has 1 CPU: "
        "lower it or add nodes"
    )


def test_free_room_not_total_decides(joined: None) -> None:
    settings = load_settings([], ["ingest.cpus_per_actor=2"], environ={})
    reason = place(_ingest(settings), [_node(4, free=1.5)])
    assert reason == (
        "ingest.cpus_per_actor=2 × ingest.embed_actors=1 needs 2 CPUs on one node, the largest node has 1.5 CPUs free: "
        "lower it or add nodes"
    )


def test_the_load_tasks_must_fit_beside_the_actor_pool(joined: None) -> None:
    settings = load_settings([], ["ingest.cpus_per_actor=2"], environ={})
    reason = place(_ingest(settings), [_node(2)])
    assert reason == (
        "an ingest load/chunk task needs 0.25 CPUs on one node beside ingest.cpus_per_actor=2 × ingest.embed_actors=1; "
        "the largest node has 0 CPUs left: lower it or add nodes"
    )


def test_training_workers_counted_across_nodes(joined: None) -> None:
    settings = load_settings([], ["finetune.workers=3"], environ={})
    with pytest.raises(Unschedulable) as exc:
        admit(settings, training_demands(settings, "sft"), room=lambda: [_node(2)], notify=lambda _: None)
    assert "finetune.cpus_per_worker=1 × finetune.workers=3 needs 3 CPUs in all (3 × 1 CPU)" in str(exc.value)
    assert "room for 2 of 3" in str(exc.value)
    # Two nodes of two CPUs hold three one-CPU workers.
    assert admit(settings, training_demands(settings, "sft"), room=lambda: [_node(2), _node(2)]) is settings


def test_defaults_are_fitted_to_a_fixed_cluster_chosen_values_are_not(joined: None) -> None:
    notes: list[str] = []
    default = load_settings([], [], environ={})
    fitted = admit(default, _ingest(default), room=lambda: [_node(2)], notify=notes.append)
    assert fitted.ingest.cpus_per_actor == 1.75 and place(_ingest(fitted), [_node(2)]) is None
    assert notes and "ingest.cpus_per_actor=1.75" in notes[0]
    chosen = load_settings([], ["ingest.cpus_per_actor=2"], environ={})
    with pytest.raises(Unschedulable):
        admit(chosen, _ingest(chosen), room=lambda: [_node(2)], notify=notes.append)


def test_a_ray_started_here_fits_even_chosen_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    chosen = load_settings([], ["ingest.cpus_per_actor=4", "ingest.embed_actors=2"], environ={})
    fitted = admit(chosen, _ingest(chosen), room=lambda: [_node(2)], notify=lambda _: None)
    assert fitted.ingest.cpus_per_actor == 0.87 and fitted.is_explicit("ingest.cpus_per_actor")


def test_gpus_are_never_fitted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    settings = load_settings([], ["ingest.gpus_per_actor=1"], environ={})
    with pytest.raises(Unschedulable) as exc:
        admit(settings, _ingest(settings), room=lambda: [_node(8)], notify=lambda _: None)
    assert "needs 2 CPUs and 1 GPU on one node, the largest node has 8 CPUs" in str(exc.value)


def test_fit_gives_up_when_even_the_smallest_share_does_not_fit() -> None:
    settings = load_settings([], [], environ={})
    assert fit(settings, _ingest(settings), [_node(0.2)], any_value=True) is None
    assert fit(settings, _ingest(settings), [_node(8)], any_value=False) == {}


def test_serve_minimum_replicas_are_checked(joined: None) -> None:
    settings = load_settings([], ["serve.generator.num_cpus=3"], environ={})
    demands = [d.__class__(**{**d.__dict__, "count": d.min_count}) for d in serve_demands(settings)]
    reason = place(demands, [_node(2)])
    assert reason is not None and "serve.generator.num_cpus=3" in reason


def test_an_autoscaling_cluster_is_waited_for_then_admitted(joined: None) -> None:
    settings = load_settings([], ["runtime.autoscaling=on", "ingest.cpus_per_actor=4"], environ={})
    rooms = iter([[_node(2)], [_node(2)], [_node(2), _node(4)]])
    notes: list[str] = []
    got = admit(settings, _ingest(settings), room=lambda: next(rooms), notify=notes.append, sleep=lambda _: None)
    assert got is settings
    assert notes[0].startswith("waiting up to 600s for the autoscaler") and "has room" in notes[-1]


def test_waiting_for_the_autoscaler_has_a_limit(joined: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import ragops.cluster.admission as adm

    clock = iter(range(0, 10_000, 5))
    monkeypatch.setattr(adm.time, "monotonic", lambda: float(next(clock)))
    settings = load_settings([], ["runtime.autoscaling=on", "runtime.schedule_timeout_s=20", "ingest.cpus_per_actor=4"], environ={})
    with pytest.raises(Unschedulable) as exc:
        admit(settings, _ingest(settings), room=lambda: [_node(2)], notify=lambda _: None, sleep=lambda _: None)
    assert "waited 20s for the autoscaler" in str(exc.value)

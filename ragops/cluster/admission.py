"""Admission: will what a command asks Ray for fit the cluster it runs on?

Ray never fails a task or actor it cannot place: it waits, silently, for a node that may
never come. A job whose embedding actor asks for 2 CPUs on a 1-CPU head, or whose training
asks for 3 workers on 2 CPUs, sits idle until someone gives up. So every Ray-run command
checks its demands (:mod:`ragops.cluster.resources`) against the nodes' free resources
before it starts work, and then does one of three things:

* **fits**: on a Ray started in this process (the machine's own size, fixed), or on a
  fixed-size cluster when the sizing settings are built-in defaults, the per-bundle CPUs are
  lowered until everything fits, with one line saying so;
* **waits**: with an autoscaler (``runtime.autoscaling``), it asks the autoscaler for the
  bundles and waits up to ``runtime.schedule_timeout_s`` (``--schedule-timeout``), with a
  visible message;
* **fails at once** with one line naming the setting, what it asks and what there is.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ragops.cluster.resources import Demand
from ragops.config import Settings
from ragops.errors import ConfigError, RagopsError

log = logging.getLogger(__name__)

EPS = 1e-6
#: The smallest CPU share a fitted bundle gets (Ray accepts fractions down to 0.0001; below a
#: tenth of a core a stage would only crawl).
MIN_FITTED_CPUS = 0.1
#: Seconds between two looks at the cluster while the autoscaler adds nodes.
POLL_S = 2.0
#: Seconds to wait for just-released resources to show as free before deciding.
SETTLE_S = 5.0


class Unschedulable(RagopsError):
    """What a command asks Ray for cannot be placed on the cluster (and will not be)."""

    exit_code = 5


@dataclass(frozen=True)
class NodeRoom:
    """One alive node: what it has and what is free now (CPUs, GPUs)."""

    node_id: str
    cpus: float
    gpus: float
    free_cpus: float
    free_gpus: float


def cluster_room() -> list[NodeRoom]:
    """The alive nodes of the connected Ray, with their free CPUs and GPUs.

    ``ray.available_resources()`` only sums the cluster; a bundle must fit on *one* node, so
    this reads the per-node view (``ray._private.state``: a DeveloperAPI, the same numbers
    ``ray status`` prints).
    """
    import ray
    from ray._private import state

    free = state.available_resources_per_node()
    out = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        total = n.get("Resources") or {}
        avail = free.get(n["NodeID"], {})
        out.append(
            NodeRoom(
                n["NodeID"], float(total.get("CPU", 0.0)), float(total.get("GPU", 0.0)),
                float(avail.get("CPU", 0.0)), float(avail.get("GPU", 0.0)),
            )
        )  # fmt: skip
    return out


def _busy(n: NodeRoom) -> bool:
    return n.free_cpus + EPS < n.cpus or n.free_gpus + EPS < n.gpus


def _amount(cpus: float, gpus: float) -> str:
    parts = []
    if cpus > EPS or gpus <= EPS:
        parts.append(f"{cpus:g} CPU" + ("" if abs(cpus - 1) < EPS else "s"))
    if gpus > EPS:
        parts.append(f"{gpus:g} GPU" + ("" if abs(gpus - 1) < EPS else "s"))
    return " and ".join(parts)


def _name(d: Demand) -> str:
    return d.label or d.what


def place(demands: Sequence[Demand], nodes: Sequence[NodeRoom]) -> str | None:
    """Place every bundle on the nodes' free room, first fit, in the demands' order.

    Returns None when all fit, else the one-line reason for the first bundle that does not.
    Order matters and is the caller's: a demand placed first holds its room (ingest's actor
    pool before the load tasks it must leave room for).
    """
    room = [[n.free_cpus, n.free_gpus] for n in nodes]
    placed: list[Demand] = []
    for d in demands:
        n = d.count
        for i in range(n):
            for r in room:
                if r[0] + EPS >= d.cpus and r[1] + EPS >= d.gpus:
                    r[0] -= d.cpus
                    r[1] -= d.gpus
                    break
            else:
                return _reason(d, i, n, nodes, placed, room)
        if n:
            placed.append(d)
    return None


def _reason(d: Demand, i: int, n: int, nodes: Sequence[NodeRoom], placed: list[Demand], room: list[list[float]]) -> str:
    fix = "lower it or add nodes"
    if not nodes:
        return f"{_name(d)} needs {_amount(d.cpus, d.gpus)} on one node, and the cluster has no alive node: {fix}"
    if not any(x.cpus + EPS >= d.cpus and x.gpus + EPS >= d.gpus for x in nodes):
        big = max(nodes, key=lambda x: (x.gpus, x.cpus)) if d.gpus > EPS else max(nodes, key=lambda x: x.cpus)
        return f"{_name(d)} needs {_amount(d.cpus, d.gpus)} on one node, the largest node has {_amount(big.cpus, big.gpus)}: {fix}"
    if i == 0 and not placed:
        big = max(nodes, key=lambda x: (x.free_gpus, x.free_cpus)) if d.gpus > EPS else max(nodes, key=lambda x: x.free_cpus)
        return (
            f"{_name(d)} needs {_amount(d.cpus, d.gpus)} on one node, the largest node has "
            f"{_amount(big.free_cpus, big.free_gpus)} free: {fix}"
        )
    total_cpus = sum(x.free_cpus for x in nodes)
    total_gpus = sum(x.free_gpus for x in nodes)
    beside = f" beside {', '.join(_name(p) for p in placed)}" if placed else ""
    if n == 1:
        left = max(room, key=lambda r: (r[1], r[0])) if d.gpus > EPS else max(room, key=lambda r: r[0])
        return (
            f"{_name(d)} needs {_amount(d.cpus, d.gpus)} on one node{beside}; the largest node has "
            f"{_amount(max(0.0, left[0]), max(0.0, left[1]))} left: {fix}"
        )
    return (
        f"{_name(d)} needs {_amount(d.cpus * n, d.gpus * n)} in all ({n} × {_amount(d.cpus, d.gpus)}){beside}; "
        f"the cluster has {_amount(total_cpus, total_gpus)} free, room for {i} of {n}: {fix}"
    )


def autoscaling(settings: Settings) -> bool:
    """Whether the cluster adds nodes on demand (``runtime.autoscaling``; 'auto' means no).

    Ray cannot tell from a driver whether an autoscaler with room to grow runs (a plain head
    reports an autoscaler too): the manifests ``ragops kuberay render`` writes, which enable
    KubeRay's autoscaler, say so with ``RAGOPS_RUNTIME__AUTOSCALING=on``.
    """
    return settings.runtime.autoscaling == "on"


def in_process_ray(settings: Settings) -> bool:
    """Whether this process started its own Ray (no cluster address to join)."""
    from ragops.raylocal import driver_address

    return driver_address(settings.ray.address, os.environ.get("RAY_ADDRESS")) is None


def fit(settings: Settings, demands: Sequence[Demand], nodes: Sequence[NodeRoom], *, any_value: bool) -> dict[str, float] | None:
    """Lower the fittable demands' per-bundle CPUs (one common factor) until everything fits.

    A demand is fittable when it has a ``fit`` setting, asks for no GPU (a GPU is not
    divisible here) and, unless ``any_value``, none of its settings was chosen by the user.
    Returns ``{setting: fitted CPUs}`` (empty when nothing had to change), or None when no
    factor fits.
    """
    fittable = {
        i for i, d in enumerate(demands)
        if d.fit and d.gpus <= EPS and (any_value or not any(settings.is_explicit(k) for k in d.keys))
    }  # fmt: skip
    if place(demands, nodes) is None:
        return {}
    if not fittable:
        return None

    def scaled(factor: float) -> list[Demand]:
        return [
            replace(d, cpus=max(MIN_FITTED_CPUS, _floor2(d.cpus * factor))) if i in fittable else d
            for i, d in enumerate(demands)
        ]

    if place(scaled(0.0), nodes) is not None:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if place(scaled(mid), nodes) is None:
            lo = mid
        else:
            hi = mid
    best = scaled(lo)
    return {d.fit: best[i].cpus for i, d in enumerate(demands) if i in fittable and d.fit and best[i].cpus < d.cpus}


def _floor2(x: float) -> float:
    return int(x * 100 + EPS) / 100


def apply(settings: Settings, changes: dict[str, float]) -> Settings:
    """``settings`` with dotted ``changes`` applied (validated; the user's choices kept)."""
    if not changes:
        return settings
    tree: dict[str, Any] = settings.model_dump(mode="json")
    for key, value in changes.items():
        cur = tree
        *path, leaf = key.split(".")
        for part in path:
            cur = cur[part]
        cur[leaf] = value
    try:
        out = Settings.model_validate(tree)
    except Exception as exc:  # noqa: BLE001 - a fitted value our own code chose
        raise ConfigError(f"fitting {changes} to the cluster gave invalid settings: {exc}") from None
    return out.with_explicit(sorted(settings.explicit_keys))


def admit(
    settings: Settings,
    demands: Sequence[Demand],
    *,
    notify: Callable[[str], None] | None = None,
    room: Callable[[], list[NodeRoom]] = cluster_room,
    sleep: Callable[[float], None] = time.sleep,
) -> Settings:
    """Check ``demands`` against the connected Ray; fit, wait or fail (see the module doc).

    Args:
        settings: The command's settings (``runtime.*`` decide waiting; ``is_explicit`` fitting).
        demands: What the command will hold at once, in placement order.
        notify: Where the one-line notes go (fitted values, waiting for the autoscaler).
        room: The nodes' room (tests pass their own).
        sleep: Pause between looks while waiting.

    Returns:
        ``settings``, or a copy with the fitted per-bundle CPUs.

    Raises:
        Unschedulable: it cannot fit and nothing will add the room.
    """
    say = notify or _note
    nodes = room()
    reason = place(demands, nodes)
    # Resources a stage just released (the data-preparation tasks of a training run) show as
    # free a moment later: while some are in use, look again briefly before deciding.
    settle_until = time.monotonic() + SETTLE_S
    while reason is not None and any(_busy(n) for n in nodes) and time.monotonic() < settle_until:
        sleep(0.5)
        nodes = room()
        reason = place(demands, nodes)
    if reason is None:
        return settings
    if autoscaling(settings) and not in_process_ray(settings):
        return _wait_for_autoscaler(settings, demands, reason, say, room, sleep)
    changes = fit(settings, demands, nodes, any_value=in_process_ray(settings))
    if changes is None:
        raise Unschedulable(reason)
    if changes:
        shown = ", ".join(f"{k}={v:g}" for k, v in changes.items())
        say(f"fitted to this cluster ({_amount(sum(n.free_cpus for n in nodes), sum(n.free_gpus for n in nodes))} free): {shown}")
    return apply(settings, changes)


def _wait_for_autoscaler(
    settings: Settings,
    demands: Sequence[Demand],
    reason: str,
    say: Callable[[str], None],
    room: Callable[[], list[NodeRoom]],
    sleep: Callable[[float], None],
) -> Settings:
    timeout = settings.runtime.schedule_timeout_s
    say(f"waiting up to {timeout:.0f}s for the autoscaler to add nodes (--schedule-timeout): {reason}")
    _request(demands)
    started = time.monotonic()
    last_note = started
    try:
        while True:
            sleep(POLL_S)
            reason_now = place(demands, room())
            if reason_now is None:
                say(f"the cluster has room after {time.monotonic() - started:.0f}s")
                return settings
            now = time.monotonic()
            if now - started >= timeout:
                raise Unschedulable(f"{reason_now} (waited {timeout:.0f}s for the autoscaler; runtime.schedule_timeout_s)")
            if now - last_note >= 30:
                say(f"still waiting for nodes ({now - started:.0f}s of {timeout:.0f}s)")
                last_note = now
    finally:
        _request([])


def _note(line: str) -> None:
    # stderr, not logging: the CLI shows warnings only, and job logs must carry this line.
    sys.stderr.write(f"ragops: {line}\n")
    sys.stderr.flush()


def _request(demands: Sequence[Demand]) -> None:
    """Ask the autoscaler for the bundles now, before any task exists to ask for them."""
    try:
        from ray.autoscaler.sdk import request_resources

        bundles = []
        for d in demands:
            b = {"CPU": d.cpus} if d.cpus > EPS else {}
            if d.gpus > EPS:
                b["GPU"] = d.gpus
            bundles += [b] * d.count
        request_resources(bundles=[b for b in bundles if b])
    except Exception:  # noqa: BLE001 - only a hint to the autoscaler; the demands ask again
        log.debug("request_resources failed", exc_info=True)

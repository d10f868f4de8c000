"""The stall watchdog: no beat for the timeout → a message and Stalled in the main thread."""

from __future__ import annotations

import time

import pytest

from ragops.watchdog import Stalled, Watchdog


def test_a_stall_interrupts_the_work_with_what_is_pending() -> None:
    lines: list[str] = []
    dog = Watchdog(0.5, "ingest", status=lambda: "3/10 files", pending=lambda: "pending resource demand: 1 × {CPU: 2}",
                   write=lines.append, hard_exit=False)  # fmt: skip
    with pytest.raises(Stalled) as exc:
        with dog:
            for _ in range(200):  # a stage that waits forever, as seen from the driver
                time.sleep(0.05)
    msg = str(exc.value)
    assert "ingest made no progress for" in msg and "(3/10 files)" in msg and "1 × {CPU: 2}" in msg
    assert "run the same command again to resume" in msg and lines == []  # the error says it, once
    assert Stalled.exit_code == 6


def test_beats_keep_it_quiet_and_zero_disables_it() -> None:
    with Watchdog(0.6, "train sft", pending=lambda: "", hard_exit=False) as dog:
        for _ in range(20):
            time.sleep(0.05)
            dog.beat()
    assert not dog.fired
    with Watchdog(0, "train sft", pending=lambda: "", hard_exit=False) as off:
        time.sleep(0.3)
    assert not off.fired


def test_the_pending_report_reads_the_real_ray(ray_local: None) -> None:
    from ragops.watchdog import pending_report

    report = pending_report()
    assert report.startswith("pending resource demand:") and "free:" in report


def test_a_stall_interrupts_even_when_a_library_took_sigint() -> None:
    import signal

    calls: list[int] = []

    def library_handler(signum: int, frame: object) -> None:
        calls.append(signum)

    previous = signal.signal(signal.SIGINT, library_handler)  # as Ray Train leaves it after fit()
    try:
        with pytest.raises(Stalled):
            with Watchdog(0.5, "ingest", pending=lambda: "", hard_exit=False):
                for _ in range(200):
                    time.sleep(0.05)
        assert calls == []  # the stall's interrupt is ours, not the library's
        assert signal.getsignal(signal.SIGINT) is library_handler  # given back
    finally:
        signal.signal(signal.SIGINT, previous)

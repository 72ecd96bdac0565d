"""service/balancing.py: the workers' table of connections, and pinning to a core."""

from __future__ import annotations

import os
import time

import pytest

from service import balancing
from service.balancing import WorkerTable, pin_to_core


def test_a_forked_worker_sees_what_another_publishes():
    table = WorkerTable(slots=4)
    mine, other = table.claim(age=1), table.claim(age=2)
    assert mine is not None and other is not None and mine.index != other.index
    pid = os.fork()
    if pid == 0:  # the other worker: publishes, then exits without running pytest's teardown
        other.publish(7)
        os._exit(0)
    os.waitpid(pid, 0)
    assert mine.fewest_elsewhere() == 7
    assert other.fewest_elsewhere() is None  # mine has published nothing: not accepting


def test_the_fewest_counts_only_live_accepting_workers(monkeypatch):
    table = WorkerTable(slots=4)
    slots = [table.claim(age) for age in range(4)]
    assert all(slots)
    slots[1].publish(5)
    slots[2].publish(3)
    slots[3].publish(-1)  # stopping
    assert slots[0].fewest_elsewhere() == 3
    assert slots[2].fewest_elsewhere() == 5  # its own count is not "elsewhere"
    later = time.monotonic_ns() + balancing.LIVE_TICK_NS + 1
    monkeypatch.setattr(time, "monotonic_ns", lambda: later)  # no tick for too long: stuck
    assert slots[0].fewest_elsewhere() is None


def test_a_released_slot_is_free_and_counts_for_nothing():
    table = WorkerTable(slots=2)
    first, second = table.claim(1), table.claim(2)
    assert first is not None and second is not None
    assert table.claim(3) is None  # full: that worker accepts as plain gunicorn
    second.publish(0)
    table.release(second)
    assert first.fewest_elsewhere() is None
    again = table.claim(4)
    assert again is not None and again.index == second.index
    table.release(None)  # a worker that had no slot


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_pinning_takes_one_core_per_worker_only_when_there_are_as_many():
    table = WorkerTable(slots=4)
    slot = table.claim(1)
    cores = sorted(os.sched_getaffinity(0))
    assert pin_to_core(slot, workers=len(cores) + 1, setting="auto") is None
    assert pin_to_core(slot, workers=len(cores), setting="0") is None
    assert pin_to_core(None, workers=len(cores), setting="1") is None
    pid = os.fork()
    if pid == 0:  # pin a child, not the test process
        core = pin_to_core(slot, workers=len(cores), setting="auto")
        os._exit(0 if core == cores[0] and os.sched_getaffinity(0) == {core} else 1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert sorted(os.sched_getaffinity(0)) == cores

"""Even connections across workers, and a core for each.

    service/gunicorn.conf.py: WorkerTable.shared(server) before the first fork;
    claim() in pre_fork, release() in child_exit; service/worker.py publishes and asks.

The workers share one listening socket; each accepts a new connection only if no other
ready worker holds fewer (least connections, as nginx's ``least_conn``). Left to the
kernel, kept-alive connections split unevenly: on one shared socket whichever worker
woke first took them (31/1 of 32), and hashed over per-worker ``SO_REUSEPORT`` sockets
they split 10/22 to 19/13, which put a third more latency on the fuller worker.

Each worker's slot in a small table in anonymous shared memory (made by the master,
inherited by every fork) holds its pid, its open connections (-1: not taking any) and
the last tick of its event loop. A slot is written by its worker alone; readers may see
a value one update old, which only makes a choice one connection less even.
"""

from __future__ import annotations

import mmap
import os
import time
from typing import Any

_FIELDS = 3  # pid, connections (-1: not accepting), event-loop tick (monotonic ns)
_SLOTS = 64  # workers at once, counting TTIN and restarts under way
LIVE_TICK_NS = 2_000_000_000  # an event loop ticks at least every second


class WorkerTable:
    """The workers' slots; one table per server, kept on the arbiter across SIGHUP."""

    def __init__(self, slots: int = _SLOTS) -> None:
        # MAP_SHARED: forks see writes. Cell 0: how many slots were ever claimed (scanned).
        self._memory = mmap.mmap(-1, (1 + slots * _FIELDS) * 8)
        self._cells = memoryview(self._memory).cast("q")
        self.slots = slots
        self._owners: dict[int, int] = {}  # the master's: slot -> worker age

    @classmethod
    def shared(cls, server: Any) -> WorkerTable:
        table = getattr(server, "digitserve_workers", None)
        if table is None:
            table = server.digitserve_workers = cls()
        return table

    # -- the master ----------------------------------------------------------------------
    def claim(self, age: int) -> WorkerSlot | None:
        """A free slot for the worker about to be forked (None: all taken, it takes part
        in nothing and accepts like plain gunicorn)."""
        for index in range(self.slots):
            if index not in self._owners:
                self._owners[index] = age
                self._write(index, 0, -1, 0)
                self._cells[0] = max(self._cells[0], index + 1)
                return WorkerSlot(self, index)
        return None

    def release(self, slot: WorkerSlot | None) -> None:
        if slot is not None and self._owners.pop(slot.index, None) is not None:
            self._write(slot.index, 0, -1, 0)

    # -- the workers -----------------------------------------------------------------------
    def publish(self, slot: int, pid: int, connections: int) -> None:
        """This worker's open connections (-1: not accepting), and that it is alive."""
        self._write(slot, pid, connections, time.monotonic_ns())

    def fewest_elsewhere(self, slot: int) -> int | None:
        """The fewest connections any other live, accepting worker holds (None: none)."""
        now, fewest = time.monotonic_ns(), None
        cells = self._cells
        for other in range(cells[0]):
            base = 1 + other * _FIELDS
            if other == slot or cells[base] == 0:
                continue
            connections = cells[base + 1]
            if connections < 0 or now - cells[base + 2] > LIVE_TICK_NS:
                continue
            if fewest is None or connections < fewest:
                fewest = connections
        return fewest

    def _write(self, slot: int, pid: int, connections: int, tick: int) -> None:
        base = 1 + slot * _FIELDS
        self._cells[base + 1], self._cells[base + 2] = connections, tick
        self._cells[base] = pid


class WorkerSlot:
    """One worker's place in the table: what it writes, and what it asks of the others."""

    __slots__ = ("index", "pid", "table")

    def __init__(self, table: WorkerTable, index: int) -> None:
        self.table, self.index = table, index
        self.pid = 0  # the worker's, known once forked (getpid is a system call)

    def publish(self, connections: int) -> None:
        if not self.pid:
            self.pid = os.getpid()
        self.table.publish(self.index, self.pid, connections)

    def fewest_elsewhere(self) -> int | None:
        return self.table.fewest_elsewhere(self.index)


def pin_to_core(slot: WorkerSlot | None, workers: int, setting: str) -> int | None:
    """Pin this process (and the threads it will start) to one core, when ``setting``
    asks for it or, with ``auto``, when the process may use exactly one core per worker.
    Returns the core, or None if not pinned."""
    if slot is None or setting == "0" or not hasattr(os, "sched_setaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    if setting == "auto" and len(cores) != workers:
        return None
    core = cores[slot.index % len(cores)]
    os.sched_setaffinity(0, {core})
    return core

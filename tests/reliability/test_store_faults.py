"""The model store on a full disk (a small tmpfs) and on a read-only one, under load:
publishing fails with a clear message and leaves nothing half-made; the service keeps
serving. Needs root (mount); skipped otherwise, saying so."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from store import ModelStore, StoreError
from tests.support import ROOT, SHIPPED_STORE, Server

from .clients import BackgroundLoad, LoadResult, local_address
from .test_model_updates import ReadyWatch, publish_copy

pytestmark = pytest.mark.reliability


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs holding a copy of the shipped store (1.3 MiB of it)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    point = tmp_path / "tmpfs"
    point.mkdir()
    try:
        mount("-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(point))
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {getattr(exc, 'stderr', exc)}")
    try:
        shutil.copytree(SHIPPED_STORE, point / "model_store", ignore=shutil.ignore_patterns(".*"))
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=30)


def snapshot(store: Path) -> dict[str, int]:
    """Every path under the store with its size: what "nothing half-made" compares. The
    publish lock is left out: an empty file that every publish opens, and keeps."""
    paths = [p for p in store.rglob("*") if p.name != ".publish.lock"]
    return {
        str(p.relative_to(store)) + ("/" if p.is_dir() else ""): 0
        if p.is_dir()
        else p.stat().st_size
        for p in paths
    }


def pages(size: int) -> int:
    """What a file of ``size`` bytes takes of a tmpfs."""
    return -(-size // 4096) * 4096


def fill(point: Path, leave: int) -> None:
    """Fill the file system until ``leave`` bytes are free."""
    free = shutil.disk_usage(point).free
    with open(point / "filler", "wb") as f:
        f.write(bytes(max(0, free - leave)))


def train_cli(store: Path) -> subprocess.CompletedProcess[str]:
    """The trainer's own check before it trains (it must not train for nothing)."""
    return subprocess.run(
        [sys.executable, "-m", "training.train", "--store", str(store), "--epochs", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def serve_while(
    start_server: Callable[..., Server], store: Path, payloads: list[bytes], attempts: Attempts
) -> tuple[list[str], LoadResult, list[int | str]]:
    """Serve from ``store`` under load while ``attempts`` run; their messages, the load's
    result and the /ready statuses."""
    server = start_server({"DIGITSERVE_STORE": str(store)}, workers=2)
    with (
        ReadyWatch(server) as ready,
        BackgroundLoad(local_address(server.url), payloads, concurrency=8) as load,
    ):
        time.sleep(1)
        errors = attempts.run(store)
        time.sleep(1)
    return errors, load.result, ready.statuses


class Attempts:
    """Publishes that must fail, each with the message it gave and the store after it."""

    def __init__(self, point: Path, leaves: list[int]):
        """``leaves``: bytes left free before each attempt (-1: leave the disk as it is)."""
        self.point, self.leaves = point, leaves

    def run(self, store: Path) -> list[str]:
        messages = []
        v1_params = store / "mnist" / "1" / "mnist-0000.params"
        for leave in self.leaves:
            if leave >= 0:
                fill(self.point, leave)
            before = snapshot(store)
            with pytest.raises(StoreError) as caught:
                publish_copy(store, lambda path: shutil.copy(v1_params, path))
            assert snapshot(store) == before, f"a failed publish left something: {caught.value}"
            messages.append(str(caught.value))
            if leave >= 0:
                (self.point / "filler").unlink()
        return messages


def test_store_on_a_full_disk(start_server, tmpfs, payloads, figure):
    store = tmpfs / "model_store"
    # Nothing free; room for the symbol but not the params; for both files, but not for
    # the high-water mark and the manifest written after them.
    v1 = store / "mnist" / "1"
    symbol = pages((v1 / "mnist-symbol.json").stat().st_size)
    both = symbol + pages((v1 / "mnist-0000.params").stat().st_size)
    attempts = Attempts(tmpfs, [0, symbol + 40 * 4096, both])
    messages, result, ready = serve_while(start_server, store, payloads, attempts)
    failures = result.failures()
    figure(
        "store-full",
        f"publishing into a full tmpfs store, 3 ways, while serving at concurrency 8: each "
        f"refused ({messages[0]!r}), nothing left behind; {len(failures)} of {result.count} "
        f"requests failed, /ready not 200 {sum(s != 200 for s in ready)} of {len(ready)} times",
        messages=messages,
        failed=len(failures),
        requests=result.count,
    )
    assert all("No space left on device" in m for m in messages), messages
    assert not failures, result.kinds()
    assert ready and all(s == 200 for s in ready)
    assert ModelStore(store).versions("mnist") == [1]


def test_store_read_only(start_server, tmpfs, payloads, figure):
    store = tmpfs / "model_store"
    mount("-o", "remount,ro", str(tmpfs))
    attempts = Attempts(tmpfs, [-1])
    messages, result, ready = serve_while(start_server, store, payloads, attempts)
    trainer = train_cli(store)
    failures = result.failures()
    figure(
        "store-read-only",
        f"publishing into a read-only store while serving at concurrency 8: refused "
        f"({messages[0]!r}); the trainer stops before training (exit {trainer.returncode}: "
        f"{trainer.stderr.strip().splitlines()[-1]!r}); {len(failures)} of {result.count} "
        f"requests failed",
        messages=messages,
        trainer_exit=trainer.returncode,
        failed=len(failures),
        requests=result.count,
    )
    assert "Read-only file system" in messages[0], messages
    assert trainer.returncode != 0 and "Read-only file system" in trainer.stderr
    assert "epoch" not in trainer.stdout.lower()
    assert not failures, result.kinds()
    assert ready and all(s == 200 for s in ready)

"""Shared fixtures: data (the committed sample, the full MNIST where found), the
shipped model store, a small freshly trained model, and a real gunicorn."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from hypothesis import settings
from prometheus_client.parser import text_string_to_metric_families

from store import ModelStore
from training.data import SHARED_DIR, Split, load_split, read_md5sums

# No per-example deadline: a loaded 2-core machine stalls now and then. In CI, fixed
# examples (a run is repeatable); elsewhere new ones each run, to keep finding bugs.
settings.register_profile("local", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, database=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "local")

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DIR = ROOT / "tests" / "data" / "mnist-sample"
SHIPPED_STORE = ROOT / "model_store"


@pytest.fixture(scope="session")
def sample_train() -> Split:
    return load_split("train", SAMPLE_DIR, checksums=read_md5sums(SAMPLE_DIR), download=False)


@pytest.fixture(scope="session")
def sample_test() -> Split:
    return load_split("test", SAMPLE_DIR, checksums=read_md5sums(SAMPLE_DIR), download=False)


@pytest.fixture(scope="session")
def full_test() -> Split:
    """The full 10k test set where this machine has it (CI does), else skip."""
    folder = Path(os.environ.get("MNIST_DIR") or SHARED_DIR)
    if (
        not (folder / "t10k-images-idx3-ubyte.gz").exists()
        and not (folder / "t10k-images-idx3-ubyte").exists()
    ):
        pytest.skip(f"full MNIST not found in {folder}")
    return load_split("test", folder, download=False)


@pytest.fixture(scope="session")
def shipped_store() -> ModelStore:
    store = ModelStore(SHIPPED_STORE)
    assert store.versions("mnist"), "the repository must ship a default model in model_store/mnist"
    return store


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, sample_train, sample_test) -> ModelStore:
    """A store holding a small CNN trained for a few seconds on the sample."""
    from training.train import TrainConfig, publish, train

    store = ModelStore(tmp_path_factory.mktemp("store"))
    cfg = TrainConfig(epochs=2, batch_size=64, seed=1)
    result = train(cfg, sample_train, sample_test, progress=False)
    publish(store, "mnist", cfg, result, sample_train, sample_test, "tests")
    return store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real gunicorn serving the app on 127.0.0.1, stopped by the fixture."""

    def __init__(self, env: dict[str, str], workers: int = 2):
        self.env, self.workers, self.relaunches = env, workers, 0
        self._launch()

    def _launch(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {
            **os.environ,
            **self.env,
            "DIGITSERVE_BIND": f"127.0.0.1:{self.port}",
            "DIGITSERVE_WORKERS": str(self.workers),
            "DIGITSERVE_ACCESS_LOG": "",
            "DIGITSERVE_POLL_SECONDS": self.env.get("DIGITSERVE_POLL_SECONDS", "0.5"),
        }
        full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.log = open(  # noqa: SIM115  (closed in stop())
            Path(self.env.get("LOG_DIR", "/tmp")) / f"gunicorn-{self.port}.log", "w+b"
        )
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "-c",
                "service/gunicorn.conf.py",
                "service.app:create_app()",
            ],
            cwd=ROOT,
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until /ready answers 200 and every worker serves a model: requests land on
        any worker, so a test must not start while one of them is still loading."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                # free_port() let go of its port before gunicorn bound it: rarely, another
                # process took it meanwhile. Start again on a new one.
                if "Connection in use" in self.output() and self.relaunches < 2:
                    self.relaunches += 1
                    self.log.close()
                    self._launch()
                    continue
                raise RuntimeError(f"gunicorn exited {self.proc.returncode}:\n{self.output()}")
            try:
                # The socket accepts before a worker does: the read may wait for a load.
                if requests.get(f"{self.url}/ready", timeout=(2, 30)).status_code == 200:
                    self.wait_workers(timeout=deadline - time.monotonic())
                    return
            except (requests.ConnectionError, requests.Timeout):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"gunicorn not ready after {timeout}s:\n{self.output()}")

    def served_versions(self) -> dict[str, int]:
        """pid -> the version each live worker serves (reported once it has loaded one)."""
        text = requests.get(f"{self.url}/metrics", timeout=(2, 30)).text
        return {
            sample.labels["pid"]: int(sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "digitserve_model_version"
        }

    def wait_workers(self, version: int | None = None, timeout: float = 30.0) -> None:
        """Until all the workers serve a model (``version``, if given)."""
        deadline = time.monotonic() + timeout
        while True:
            served = self.served_versions()
            if len(served) == self.workers and (
                version is None or set(served.values()) == {version}
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"workers serve {served}, expected {self.workers} on "
                    f"{version or 'any version'}:\n{self.output()}"
                )
            time.sleep(0.2)

    def worker_pids(self) -> set[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return {int(p) for p in out.stdout.split()}

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-8000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


@pytest.fixture
def start_server(tmp_path) -> Iterator:
    servers: list[Server] = []

    def start(env: dict[str, str], workers: int = 2, wait: bool = True) -> Server:
        server = Server({"LOG_DIR": str(tmp_path), **env}, workers)
        servers.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


def copy_shipped_store(store_dir: Path) -> Path:
    """A copy of the shipped model store (without its lock and temp files) to publish into."""
    shutil.copytree(SHIPPED_STORE, store_dir, ignore=shutil.ignore_patterns(".*"))
    return store_dir


@pytest.fixture(scope="module")
def shipped_server(tmp_path_factory) -> Iterator[Server]:
    """gunicorn with 2 workers on a copy of the shipped store (tests may publish into it)."""
    store_dir = copy_shipped_store(tmp_path_factory.mktemp("served") / "model_store")
    server = Server(
        {
            "DIGITSERVE_STORE": str(store_dir),
            "DIGITSERVE_ADMIN_TOKEN": "s3cret",
            "LOG_DIR": str(store_dir.parent),
        }
    )
    try:
        server.wait_ready()
        server.store_dir = store_dir  # type: ignore[attr-defined]
        yield server
    finally:
        server.stop()

"""What tests share that is not a fixture: a real gunicorn to start, an in-process client
called as ``requests`` is, the one error-shape check, and store helpers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from store import ModelStore
from store.publishing import publish

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_STORE = ROOT / "model_store"


def assert_error(response: Any, status: int, code: str | None = None) -> None:
    """The API's one error shape, from gunicorn (requests) or in-process (InProcessClient);
    under /v2 the V2 protocol's, {"error": "<message>"}, with the API's code beside it."""
    assert response.status_code == status, response.text
    body = response.json()
    if urlsplit(response.url).path.startswith("/v2"):
        assert set(body) == {"error", "code"} and isinstance(body["error"], str), body
        assert body["error"]
        got = body["code"]
    else:
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
        got = body["error"]["code"]
    if code:
        assert got == code, body


class Answer:
    """A Flask test response read as a ``requests.Response`` is."""

    def __init__(self, response: Any):
        self.raw = response
        self.status_code: int = response.status_code
        self.url: str = response.request.url
        self.headers = response.headers
        self.text: str = response.get_data(as_text=True)
        response.close()  # a file response (the drawing page) holds its file open until then
        self.ok = self.status_code < 400

    def json(self) -> Any:
        return self.raw.get_json()


class InProcessClient:
    """The app's test client, called with ``requests``' arguments (files=, json=, params=,
    headers=, data=): the body is built by requests itself, byte for byte as it would
    send it, and handed to the app in-process, no server in between."""

    def __init__(self, app: Flask):
        self.app = app
        self.client = app.test_client()

    def request(self, method: str, path: str, **kwargs: Any) -> Answer:
        kwargs.pop("timeout", None)
        kwargs.pop("allow_redirects", None)  # the test client never follows them
        prepared = requests.Request(method, f"http://localhost{path}", **kwargs).prepare()
        body = prepared.body or b""
        if not isinstance(body, bytes | str):
            raise TypeError("a streamed (chunked) body needs a real server: tests/test_http.py")
        headers = {k: v for k, v in prepared.headers.items() if k.lower() != "content-length"}
        response = self.client.open(prepared.path_url, method=method, data=body, headers=headers)
        return Answer(response)

    def get(self, path: str, **kwargs: Any) -> Answer:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Answer:
        return self.request("POST", path, **kwargs)


def copy_shipped_store(store_dir: Path) -> Path:
    """A copy of the shipped model store (without its lock and temp files) to publish into."""
    shutil.copytree(SHIPPED_STORE, store_dir, ignore=shutil.ignore_patterns(".*"))
    return store_dir


def clone_version(source: ModelStore, target: ModelStore, note: str, corrupt=None) -> int:
    """Publish a copy of the shipped version into ``target`` (optionally corrupted after)."""
    mv = source.resolve("mnist")

    def write(folder):
        for role in ("symbol", "params"):
            (folder / mv.manifest["artifacts"][role]["file"]).write_bytes(
                getattr(mv, f"{role}_file").read_bytes()
            )
        return {r: mv.manifest["artifacts"][r]["file"] for r in ("symbol", "params")}

    published = publish(target, "mnist", write, {**manifest_fields(mv.manifest), "note": note})
    if corrupt:
        corrupt(published)
    return published.version


def manifest_fields(manifest: dict) -> dict:
    """What a publisher passes: the manifest without what the store fills in."""
    filled = ("name", "version", "artifacts", "schema_version")
    return {k: v for k, v in manifest.items() if k not in filled}


def stop_group(proc: subprocess.Popen, sig: signal.Signals, grace: float) -> None:
    """Stop a process started with start_new_session=True and all it started: ``sig`` to
    its process group, SIGKILL to the group after ``grace`` seconds."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real gunicorn serving the app on 127.0.0.1, stopped by the fixture."""

    def __init__(
        self, env: dict[str, str], workers: int = 2, app: str = "service.app:create_app()"
    ):
        self.env, self.workers, self.app, self.relaunches = env, workers, app, 0
        self._launch()

    def _launch(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {
            **os.environ,
            "DIGITSERVE_ACCESS_LOG": "",
            **self.env,
            "DIGITSERVE_BIND": f"127.0.0.1:{self.port}",
            "DIGITSERVE_WORKERS": str(self.workers),
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
                self.app,
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
        stop_group(self.proc, signal.SIGTERM, grace=30)
        self.log.close()

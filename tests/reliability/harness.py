"""What the reliability tests run besides gunicorn: Debian's nginx with the deployment's
own config (deploy/nginx/nginx.conf), wrk, and readings of the processes' memory."""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support import ROOT, free_port, stop_group

NGINX_DIR = ROOT / "deploy" / "nginx"
WRK_LUA = ROOT / "benchmarks" / "mms" / "post_files.lua"


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None
    )


def _set(text: str, directive: str, value: str) -> str:
    """Set every ``directive ...;`` of the config to ``value`` (it must be there)."""
    pattern = re.compile(rf"(?m)^(\s*{re.escape(directive)}\s+)[^;]*;")
    new, count = pattern.subn(lambda m: f"{m.group(1)}{value};", text)
    if not count:
        raise AssertionError(f"deploy/nginx: no {directive!r} directive to set")
    return new


def _replace(text: str, old: str, new: str) -> str:
    if old not in text:
        raise AssertionError(f"deploy/nginx: {old!r} is not in the config any more")
    return text.replace(old, new)


def render_nginx_conf(
    workdir: Path, listen_port: int, upstream_port: int, overrides: dict[str, str] | None = None
) -> Path:
    """deploy/nginx/nginx.conf and upstream.conf as the container runs them, but on
    127.0.0.1 ports, with its files in ``workdir`` and ``overrides`` (directive ->
    value, e.g. shorter timeouts for a test that waits for one)."""
    conf = (NGINX_DIR / "nginx.conf").read_text().replace(" /tmp/", f" {workdir}/")
    upstream = _replace(
        (NGINX_DIR / "upstream.conf").read_text(),
        "server web:8000;",
        f"server 127.0.0.1:{upstream_port};",
    )
    (workdir / "upstream.conf").write_text(upstream)
    conf = _replace(
        conf, "include /etc/nginx/digitserve/upstream.conf;", f"include {workdir}/upstream.conf;"
    )
    conf = _replace(conf, "listen 8080;", f"listen 127.0.0.1:{listen_port};")
    conf = _replace(conf, "access_log /dev/stdout", f"access_log {workdir}/access.log")
    for directive, value in (overrides or {}).items():
        conf = _set(conf, directive, value)
    if os.geteuid() == 0:  # the container runs it unprivileged; as root, workers stay root
        conf = "user root root;\n" + conf  # (nobody could not reach the pytest folders)
    path = workdir / "nginx.conf"
    path.write_text(conf)
    return path


class Nginx:
    """Debian's nginx on 127.0.0.1 in front of ``upstream_port``, stopped by ``stop()``."""

    def __init__(
        self, workdir: Path, upstream_port: int, overrides: dict[str, str] | None = None
    ) -> None:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed (apt-get install nginx)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.conf = render_nginx_conf(workdir, self.port, upstream_port, overrides)
        self.log = open(workdir / "nginx.out", "w+b")  # noqa: SIM115  (closed in stop())
        check = subprocess.run(
            [binary, "-t", "-q", "-c", str(self.conf), "-p", str(workdir), "-e", "stderr"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check.returncode != 0:
            self.log.close()
            raise RuntimeError(f"nginx -t failed:\n{check.stderr}")
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.conf), "-p", str(workdir), "-e", "stderr"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                output = self.output()
                self.log.close()
                raise RuntimeError(f"nginx exited {self.proc.returncode}:\n{output}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return
            time.sleep(0.05)
        output = self.output()
        self.stop()
        raise RuntimeError(f"nginx did not listen on {self.port}:\n{output}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-8000:]

    def access_log(self) -> list[str]:
        path = self.workdir / "access.log"
        return path.read_text().splitlines() if path.exists() else []

    def stop(self) -> None:
        stop_group(self.proc, signal.SIGQUIT, grace=15)  # nginx's graceful stop, as docker's
        self.log.close()


def upstream_connections(port: int) -> set[int]:
    """Source ports of the established TCP connections to 127.0.0.1:``port``."""
    out = subprocess.run(
        ["ss", "-tnH", "state", "established", f"( dport = :{port} )"],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout
    ports = set()
    for line in out.splitlines():
        fields = line.split()  # Recv-Q Send-Q Local:Port Peer:Port
        if len(fields) >= 4 and fields[3].endswith(f":{port}"):
            ports.add(int(fields[2].rsplit(":", 1)[1]))
    return ports


@dataclass
class WrkRun:
    requests: int
    seconds: float
    errors: dict[str, int]
    latency_ms: dict[str, float]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def write_bodies(folder: Path, pngs: list[bytes]) -> Path:
    """The body files and their list, as benchmarks/mms/post_files.lua reads them."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(pngs):
        path = folder / f"{i:03d}.png"
        path.write_bytes(data)
        paths.append(str(path))
    listing = folder / "bodies.txt"
    listing.write_text("\n".join(paths) + "\n")
    return listing


def run_wrk(
    url: str,
    bodies: Path,
    *,
    seconds: float,
    connections: int,
    threads: int = 1,
    timeout_s: float = 10.0,
) -> WrkRun:
    """wrk POSTing the PNGs of ``bodies`` to ``url``/predict, one figure line back."""
    binary = wrk_binary()
    if binary is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    run = subprocess.run(
        [
            binary,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{seconds:g}s",
            f"--timeout={timeout_s:g}s",
            "-s",
            str(WRK_LUA),
            f"{url}/predict",
        ],
        env={**os.environ, "WRK_BODIES": str(bodies), "WRK_CONTENT_TYPE": "image/png"},
        capture_output=True,
        text=True,
        timeout=seconds + timeout_s + 60,
    )
    line = next((x for x in run.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
    if run.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({run.returncode}):\n{run.stdout}\n{run.stderr}")
    data = json.loads(line.removeprefix("WRK_JSON "))
    return WrkRun(data["requests"], data["duration_s"], data["errors"], data["latency_ms"])


def rss_kib(pid: int) -> int:
    """Resident memory of a process, in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


TICK = os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine have used (every core, /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / TICK


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) one process has used."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def own_cpu_seconds() -> float:
    """This process and its finished children (wrk runs), in CPU seconds."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

"""digitserve against the official MXNet Model Server (MMS 1.1.11), side by side, with wrk.

    .venv/bin/python -m benchmarks.compare_mms                  # 3 rounds, 10 s a point
    .venv/bin/python -m benchmarks.compare_mms --rounds 1 --seconds 2 --warmup 1 --concurrency 1,32
    .venv/bin/python -m benchmarks.compare_mms --only digitserve

Sets up multi-model-server 1.1.11 and model-archiver (with mxnet 1.9.1) in their own venv
under --workdir, archives the newest model_store/mnist/<N>/ with the minimal MMS handler
benchmarks/mms/handler.py, then drives each server on 127.0.0.1 with wrk and
benchmarks/mms/post_files.lua: 200 MNIST test digits as raw image/png bodies, one image a
request, at each --concurrency, in --rounds whose server order flips. Both servers stay up
and take turns point by point, the idle one using no CPU, so that the two figures of each
ratio are taken seconds apart on a machine whose speed drifts; each first gets --settle
seconds of load, for MMS's JIT. Then digitserve alone: 8 images per request (multipart) at
concurrency 32, and a 280x280 canvas PNG and a ~1 MP phone JPEG at concurrency 1 with the
server's own latency_ms. Writes compare_mms.json, .md and .png to --out and prints the
Markdown table. Needs java (OpenJDK 17 works) and wrk (installed with apt-get if missing).

One script on purpose (about 450 lines): a user re-running the comparison reads one file.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tests.images import canvas_png, phone_photo
from training.data import load_split

REPO = Path(__file__).resolve().parents[1]
MMS_DIR = Path(__file__).resolve().parent / "mms"
LUA = MMS_DIR / "post_files.lua"
MMS_PACKAGES = [
    "multi-model-server==1.1.11",
    "model-archiver",
    "mxnet==1.9.1",
    "numpy<1.24",
    "pillow",
]
SERVERS = ("digitserve", "mms")
HOST = "127.0.0.1"
BOUNDARY = "digitserve-bench-boundary"
PCTS = ("p50", "p90", "p99")


def sh(cmd: list[str], **kw: Any) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout.strip()


def free_port() -> int:
    """A free port below 32767: MMS 1.1.11 refuses higher ones ("Invalid port number")."""
    for port in random.sample(range(20000, 32000), 200):
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind((HOST, port))
            return port
    raise RuntimeError("no free port in 20000-32000")


def http_get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read() if r.status == 200 else None
    except OSError:
        return None


def ensure_wrk() -> None:
    if shutil.which("wrk") is None:
        print("installing wrk with apt-get", flush=True)
        if subprocess.run(["apt-get", "install", "-y", "-q", "wrk"]).returncode:
            subprocess.run(["apt-get", "update", "-q"], check=True)
            subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True)


def ensure_mms(work: Path) -> Path:
    """Java, and MMS's own venv (made once); returns that venv's bin folder."""
    if shutil.which("java") is None:
        raise SystemExit("MMS needs java: apt-get install -y openjdk-17-jre-headless")
    venv = work / "mms-venv"
    stamp = venv / ".installed"
    if not stamp.exists() or stamp.read_text().split() != MMS_PACKAGES:
        print(f"setting up {venv} ({', '.join(MMS_PACKAGES)})", flush=True)
        if not (venv / "bin" / "python").exists():
            subprocess.run(["python3.11", "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
        subprocess.run([*pip, *MMS_PACKAGES], check=True)
        stamp.write_text("\n".join(MMS_PACKAGES))
    return venv / "bin"


def archive(mms_bin: Path, version_dir: Path, work: Path) -> Path:
    """model-archiver: the version's files, its manifest.json and the handler -> mnist.mar."""
    manifest = json.loads((version_dir / "manifest.json").read_text())
    stage, store = work / "mar-stage", work / "mms-model-store"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    store.mkdir(exist_ok=True)
    for name in (
        *(manifest["artifacts"][a]["file"] for a in ("symbol", "params")),
        "manifest.json",
    ):
        shutil.copy2(version_dir / name, stage)
    shutil.copy2(MMS_DIR / "handler.py", stage)
    cmd = [str(mms_bin / "model-archiver"), "--model-name", "mnist", "--model-path", str(stage)]
    sh([*cmd, "--handler", "handler:handle", "--export-path", str(store), "-f"])
    return store


@dataclass
class Server:
    name: str
    cmd: list[str]
    env: dict[str, str]
    cwd: Path
    predict_url: str
    ready: Callable[[], bool]


@contextlib.contextmanager
def serving(server: Server, log: Path, timeout: float = 180) -> Iterator[Server]:
    """The server in its own process group for the block, stopped however the block ends."""
    started = time.monotonic()
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            server.cmd,
            cwd=server.cwd,
            env=server.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        while not server.ready():
            if proc.poll() is not None or time.monotonic() - started > timeout:
                raise RuntimeError(f"{server.name} did not start; see {log}")
            time.sleep(0.5)
        print(f"  {server.name} up in {time.monotonic() - started:.1f} s", flush=True)
        yield server
    finally:  # SIGTERM to the group, then SIGKILL to whatever of it is left
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=40)
            time.sleep(0.5)  # MMS's Python workers end after the Java leader
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def digitserve() -> Server:
    """`make run`'s command and config file, with its defaults, on a free port."""
    port = free_port()
    base = f"http://{HOST}:{port}"
    cmd = [str(REPO / ".venv/bin/gunicorn"), "-c", "service/gunicorn.conf.py"]
    cmd.append("service.app:create_app()")
    env = os.environ | {"DIGITSERVE_BIND": f"{HOST}:{port}"}

    def ready() -> bool:
        return http_get(f"{base}/ready") is not None

    return Server("digitserve", cmd, env, REPO, f"{base}/predict", ready)


def mms(mms_bin: Path, store: Path, work: Path) -> Server:
    """2 workers of 1 OpenMP thread each (the machine's 2 cores), as digitserve has."""
    port, mport = free_port(), free_port()
    home, tmp = work / "mms-home", work / "mms-tmp"  # its logs/; its pid file and sockets
    home.mkdir(exist_ok=True)
    tmp.mkdir(exist_ok=True)
    # Left by the last run (its launcher is killed, not stopped): a live PID in it, even
    # another program's, makes MMS refuse to start ("already running").
    (tmp / ".model_server.pid").unlink(missing_ok=True)
    config = home / "config.properties"
    config.write_text(
        f"inference_address=http://{HOST}:{port}\nmanagement_address=http://{HOST}:{mport}\n"
        f"model_store={store}\nload_models=mnist.mar\ndefault_workers_per_model=2\n"
        # The default queue (100 jobs) would answer part of the c=128 load with 503; async
        # logging is what MMS's docs/logging.md advises for light models.
        "job_queue_size=1000\nasync_logging=true\n"
    )

    def ready() -> bool:
        body = http_get(f"http://{HOST}:{mport}/models/mnist")
        workers = json.loads(body)["workers"] if body else []
        return len(workers) == 2 and all(w["status"] == "READY" for w in workers)

    env = os.environ | {"OMP_NUM_THREADS": "1", "TEMP": str(tmp), "TMPDIR": str(tmp)}
    cmd = [str(mms_bin / "multi-model-server"), "--start", "--foreground"]
    cmd += ["--mms-config", str(config), "--model-store", str(store)]
    return Server("mms", cmd, env, home, f"http://{HOST}:{port}/predictions/mnist", ready)


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def multipart(files: list[bytes]) -> bytes:
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="%d.png"'
    head += "\r\nContent-Type: image/png\r\n\r\n"
    parts = [(head % i).encode() + f + b"\r\n" for i, f in enumerate(files)]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def make_bodies(folder: Path, data_dir: str | None) -> tuple[dict[str, dict], list[bytes], list]:
    """Request bodies as files, and a listing of each set for the Lua script."""
    test = load_split("test", data_dir)
    digits = [png(d) for d in test.images[:200]]
    rng = np.random.default_rng(0)
    photos = [phone_photo(d, rng, long_side=1100) for d in test.images[:10]]
    batch8 = [multipart(digits[i : i + 8]) for i in range(0, 200, 8)]
    sets = {
        "digits": (digits, "image/png", 1),
        "batch8": (batch8, f"multipart/form-data; boundary={BOUNDARY}", 8),
        "canvas": ([canvas_png(d) for d in test.images[:20]], "image/png", 1),
        "photo": (photos, "image/jpeg", 1),
    }
    out = {}
    for key, (bodies, ctype, images) in sets.items():
        (folder / key).mkdir(parents=True, exist_ok=True)
        paths = [folder / key / f"{i:03d}.bin" for i in range(len(bodies))]
        for path, body in zip(paths, bodies, strict=True):
            path.write_bytes(body)
        (folder / f"{key}.txt").write_text("".join(f"{p}\n" for p in paths))
        mean = round(float(np.mean([len(b) for b in bodies])))
        out[key] = dict(list=folder / f"{key}.txt", type=ctype, images=images, count=len(bodies))
        out[key]["mean_bytes"] = mean
    pixels = [np.prod(Image.open(io.BytesIO(p)).size) for p in photos]
    out["photo"]["mean_megapixels"] = round(float(np.mean(pixels)) / 1e6, 2)
    return out, digits[:20], [int(x) for x in test.labels[:20]]


def wrk(url: str, body: dict, conc: int, seconds: int, server_ms: bool = False) -> dict:
    env = os.environ | {"WRK_BODIES": str(body["list"]), "WRK_CONTENT_TYPE": body["type"]}
    env["WRK_SERVER_MS"] = "1" if server_ms else "0"
    cmd = ["wrk", "-t", "1" if conc < 8 else "2", "-c", str(conc), "-d", f"{seconds}s"]
    out = sh([*cmd, "--timeout", "30s", "-s", str(LUA), url], env=env, timeout=seconds + 120)
    r = json.loads(next(x for x in out.splitlines() if x.startswith("WRK_JSON "))[9:])
    r["rps"] = round(r["requests"] / r["duration_s"], 1)
    r["images_per_s"] = round(r["rps"] * body["images"], 1)
    r["errors_total"] = sum(r["errors"].values())
    if server_ms and (ms := r.pop("server_ms")):
        p50, p90 = (round(float(x), 2) for x in np.percentile(ms, [50, 90]))
        r["server_latency_ms"] = dict(n=len(ms), p50=p50, p90=p90)
    return r


def sanity(server: Server, pngs: list[bytes], labels: list[int]) -> float:
    """20 digits, one at a time: a server must answer each with 200; returns its accuracy."""
    right = 0
    for body, label in zip(pngs, labels, strict=True):
        req = urllib.request.Request(server.predict_url, body, {"Content-Type": "image/png"})
        with urllib.request.urlopen(req, timeout=30) as r:
            right += int(json.loads(r.read())["digit"]) == label
    return right / len(labels)


def cell(p: dict | None) -> str:
    if not p:
        return "–"
    if p.get("requests") == 0:
        return "**no request completed**"
    lat = p.get("latency_ms", p)
    text = f"{p['rps']:.0f} ({lat['p50']:.1f}/{lat['p99']:.1f})"
    return text + (f" **{p['errors_total']} errors**" if p.get("errors_total") else "")


def summarize(rounds: list[dict], concurrency: list[int]) -> tuple[list[dict], str]:
    """Per concurrency: each round's figures and ratio, then their medians (a bold row)."""
    lines = [
        "| concurrency | round | digitserve req/s (p50/p99 ms) | MMS req/s (p50/p99 ms) | ratio |",
        "|---:|---:|---:|---:|---:|",
    ]
    rows = []
    for c in concurrency:
        pts = [{s: r.get(s, {}).get(str(c)) for s in SERVERS} for r in rounds]
        ratios = [
            p["digitserve"]["rps"] / p["mms"]["rps"] if all(p.values()) else None for p in pts
        ]
        for i, (p, ratio) in enumerate(zip(pts, ratios, strict=True), 1):
            cells = " | ".join(cell(p[s]) for s in SERVERS)
            lines.append(f"| {c} | {i} | {cells} | {f'{ratio:.2f}' if ratio else '–'} |")
        row: dict[str, Any] = {
            "concurrency": c,
            "ratio_per_round": [x and round(x, 3) for x in ratios],
        }
        for s in SERVERS:
            got = [p[s] for p in pts if p[s]]
            row[s] = None
            if got:
                row[s] = {
                    k: round(statistics.median(x["latency_ms"][k] for x in got), 2) for k in PCTS
                }
                row[s]["rps"] = round(statistics.median(x["rps"] for x in got), 1)
        known = [x for x in ratios if x]
        row["ratio_median"] = round(statistics.median(known), 3) if known else None
        ratio = f"**{row['ratio_median']:.2f}**" if known else "–"
        cells = " | ".join(cell(row[s]) for s in SERVERS)
        lines.append(f"| **{c}** | **median** | {cells} | {ratio} |")
        rows.append(row)
    return rows, "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    for s, label in zip(SERVERS, ("digitserve", "MMS 1.1.11"), strict=True):
        got = [r for r in rows if r[s]]
        cs = [r["concurrency"] for r in got]
        left.plot(cs, [r[s]["rps"] for r in got], "o-", label=label)
        right.plot(cs, [r[s]["p99"] for r in got], "o-", label=label)
    for ax, name in ((left, "throughput, req/s (1 image each)"), (right, "p99 latency, ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks([r["concurrency"] for r in rows], [str(r["concurrency"]) for r in rows])
        ax.set(xlabel="concurrent connections (wrk)", title=f"{name}, median of rounds")
        ax.grid(alpha=0.3)
        ax.legend()
    right.set_yscale("log")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=10, help="measured seconds per point")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured seconds before each point")
    p.add_argument("--settle", type=int, default=60, help="unmeasured seconds of load first")
    p.add_argument("--concurrency", default="1,8,32,128")
    p.add_argument("--only", choices=SERVERS)
    p.add_argument("--workdir", type=Path, default=REPO / ".bench")
    p.add_argument("--out", type=Path, default=REPO / ".bench" / "results")
    p.add_argument("--data-dir", default=None, help="MNIST folder (default: training's)")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that servers get stopped
    concurrency = [int(c) for c in args.concurrency.split(",")]
    names = [s for s in SERVERS if args.only in (None, s)]
    work, out = args.workdir.resolve(), args.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    version_dir = max((REPO / "model_store" / "mnist").glob("[0-9]*"), key=lambda d: int(d.name))
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, "-m", "benchmarks.compare_mms", *sys.argv[1:]]),
        "commit": sh(["git", "rev-parse", "--short", "HEAD"], cwd=REPO),
        "dirty": bool(sh(["git", "status", "--porcelain"], cwd=REPO)),
        "nproc": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "model_version": int(version_dir.name),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    ensure_wrk()
    meta["wrk"] = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("[")[0]
    make: dict[str, Callable[[], Server]] = {"digitserve": digitserve}
    if "mms" in names:
        mms_bin = ensure_mms(work)
        store = archive(mms_bin, version_dir, work)
        make["mms"] = lambda: mms(mms_bin, store, work)
        java = subprocess.run(["java", "-version"], capture_output=True, text=True)
        meta["java"] = java.stderr.splitlines()[0]
    bodies, pngs, labels = make_bodies(work / "bodies", args.data_dir)
    meta["bodies"] = {k: {x: v for x, v in b.items() if x != "list"} for k, b in bodies.items()}

    def point(server: Server, key: str, c: int, server_ms: bool = False) -> dict:
        if args.warmup:
            wrk(server.predict_url, bodies[key], c, args.warmup)
        return wrk(server.predict_url, bodies[key], c, args.seconds, server_ms)

    rounds: list[dict[str, Any]] = [{"order": []} for _ in range(args.rounds)]
    # Both servers stay up, each idle while the other is measured, and they take turns
    # point by point: on this shared machine the speed drifts within a minute, so the two
    # figures of a ratio are taken seconds apart, in an order that flips every round.
    with contextlib.ExitStack() as stack:
        servers = {
            name: stack.enter_context(serving(make[name](), work / f"{name}.log")) for name in names
        }
        for name, server in servers.items():
            acc = rounds[0][f"{name}_sanity_accuracy"] = sanity(server, pngs, labels)
            print(f"  {name} sanity: {acc:.0%} of {len(labels)} digits right, one at a time")
            # MMS's Java front end runs at a quarter of its speed until the JIT has compiled
            # it: c=32 went 183 -> 874 req/s over 40 s of load. Both are measured warm.
            if args.settle:
                print(f"  {name}: {args.settle} s of load at c=32 to warm it up", flush=True)
                wrk(server.predict_url, bodies["digits"], 32, args.settle)
        for n, result in enumerate(rounds):
            order = names if n % 2 == 0 else names[::-1]
            result["order"] = order
            print(f"round {n + 1}/{args.rounds}: {' then '.join(order)}", flush=True)
            for c in concurrency:
                for name in order:
                    result.setdefault(name, {})[str(c)] = r = point(servers[name], "digits", c)
                    print(f"    {name:<10} c={c:<4} {cell(r)}", flush=True)
    alone: dict[str, Any] = {}
    if "digitserve" in names:
        print("digitserve alone: 8 images a request at c=32; canvas and photo at c=1", flush=True)
        with serving(digitserve(), work / "digitserve.log") as server:
            for key, c in (("batch8", 32), ("canvas", 1), ("photo", 1)):
                alone[key] = r = point(server, key, c, server_ms=c == 1) | {"concurrency": c}
                print(
                    f"    {key:<7} c={c:<3} {cell(r)}, {r['images_per_s']:.0f} images/s, "
                    f"server latency_ms {r.get('server_latency_ms', '–')}",
                    flush=True,
                )
    meta["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    rows, _ = summarize(rounds, concurrency)
    results = {"meta": meta, "summary": rows, "rounds": rounds, "digitserve_alone": alone}
    (out / "compare_mms.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "compare_mms.md").write_text(report(results))
    if rounds:
        plot(rows, out / "compare_mms.png", header(meta))
    print(f"\n{header(meta)}\n\n{tables(results)}\n\nwritten to {out}/compare_mms.{{json,md,png}}")


def header(meta: dict) -> str:
    args = meta["args"]
    return (
        f"commit {meta['commit']}{' (dirty)' if meta['dirty'] else ''}, {meta['date']}, "
        f"nproc {meta['nproc']}, load {meta['loadavg_before']} -> {meta['loadavg_after']}, "
        f"{args['rounds']} rounds of {args['seconds']} s a point"
    )


def tables(results: dict) -> str:
    """The Markdown tables of a run, from its compare_mms.json alone."""
    concurrency = [int(c) for c in results["meta"]["args"]["concurrency"].split(",")]
    _, markdown = summarize(results["rounds"], concurrency)
    alone = results["digitserve_alone"]
    if alone:
        markdown += (
            "\n\n| digitserve alone | concurrency | req/s (p50/p99 ms) | images/s | "
            "server latency_ms p50/p90 |\n|---|---:|---:|---:|---:|"
        )
    for key, r in alone.items():
        lat = r.get("server_latency_ms")
        own = f"{lat['p50']:.2f}/{lat['p90']:.2f}" if lat else "–"
        markdown += (
            f"\n| {key} | {r['concurrency']} | {cell(r)} | {r['images_per_s']:.0f} | {own} |"
        )
    return markdown


def report(results: dict) -> str:
    """compare_mms.md: the run's header line, its command and its tables."""
    meta = results["meta"]
    return f"{header(meta)}\n\n`{meta['command']}`\n\n{tables(results)}\n"


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; the servers this run started are stopped")

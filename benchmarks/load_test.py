"""Load test of the web service on loopback: throughput, latency and server memory under concurrent predictions.

Starts the real server (``python -m malaria_cells.cli serve --host 127.0.0.1 --port <free port>``) in a
subprocess, waits for ``GET /api/v1/health``, then sends ``--requests`` ``POST /api/v1/predict`` requests, each
one real cell image (cycled from ``--files`` images of ``--data``, both classes, read into memory up front), with
``--concurrency`` requests in flight, after ``--warmup`` requests that are not timed. The server is always stopped
at the end, also on errors and Ctrl-C. Traffic goes to 127.0.0.1 only.

Measured: requests/s (completed, errors included), latency p50/p90/p99/max in ms of the successful requests (client
side: send to full response), errors (a status other than 200, a body whose result is not ``ok``, or an exception
such as a timeout), the server's RSS (VmRSS of the server process and any children, from /proc) before the load,
after the warm-up and after the run, the growth after the warm-up in MB, the peak RSS (VmHWM), the server's and the
client's CPU seconds, and the machine (cores, load average at start and end, Python and package versions, date, git
commit). The client runs on the same cores as the server, so requests/s is what this machine serves with a client
on it, not the server alone.

Bounded: at most ``--requests`` (+ warm-up) requests and ``--max-seconds`` of load (warm-up included); past the
time limit no new request is sent, the ones in flight finish, and the report says the run stopped early.

Upload attack (``--scenario upload-attack``, and after the load with the default ``--scenario all``): what
``--attack-requests`` concurrent requests of ``--attack-files`` files of ``--attack-file-mb`` MB each (random-pixel
PNGs, so incompressible and as large as allowed: 32 x 9.9 MB by default) do to the server: its RSS (VmRSS of its
process tree, sampled every 50 ms, and VmHWM after), the statuses it answers (200, 413 for files beyond the
per-request pixel budget, 503 + Retry-After beyond the admission limits) and how long it takes. Bounded: each
request has ``--attack-timeout`` seconds and the whole attack ``--attack-max-seconds``; loopback only.

Run: .venv/bin/python benchmarks/load_test.py [--model MODEL.onnx|RUN_DIR] [--requests 5000] [--concurrency 16]
     [--max-seconds 300] [--warmup 100] [--threads N] [--workers N] [--data ../shared/nih-cell-images] [--out PATH]
     [--scenario all|load|upload-attack] [--attack-requests 12] [--attack-files 32] [--attack-file-mb 9.9] [--quick]
Writes benchmarks/results/load_test.json (``--scenario upload-attack``: load_test_upload_attack.json; ``--quick``, a
smoke run with small sizes: load_test_quick.json in the temporary folder). Exit code 0 with no errors, 1 with any
(in the attack: a 5xx other than 503, or the server gone), 2 when the server cannot start or an option is unusable,
130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import io
import math
import mimetypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from harness import machine_info, proc_status, process_tree, save_result
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]  # defaults work from any directory, not only the repository root
HOST = "127.0.0.1"  # loopback only, by design: this script must never load another machine
API = "/api/v1"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
PACKAGES = ("malaria-cells", "fastapi", "starlette", "uvicorn", "python-multipart", "onnxruntime", "numpy", "httpx")
# Wider than rich's 80-column fallback when piped to a file, so the table and the commands stay on one line.
console = Console() if sys.stdout.isatty() else Console(width=120)


# --------------------------------------------------------------------------------------------- test images


def load_images(data_dir: Path, count: int) -> list[tuple[str, bytes, str]]:
    """``count`` images as (name, bytes, content type), alternating the class folders, evenly spread over each.

    Read into memory up front so that disk reads are not part of the timing; spread (not the first N) so that
    the sizes and both classes are represented.
    """
    folders = sorted(p for p in data_dir.iterdir() if p.is_dir())
    per_class = [sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) for d in folders]
    per_class = [files for files in per_class if files]
    if not per_class:
        raise SystemExit(f"no images in class folders under {data_dir}")
    picks: list[list[Path]] = []
    for files in per_class:
        n = min(len(files), math.ceil(count / len(per_class)))
        step = len(files) / n
        picks.append([files[int(i * step)] for i in range(n)])
    ordered = [p for group in zip(*picks, strict=False) for p in group][:count]
    images = []
    for path in ordered:
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        images.append((path.name, path.read_bytes(), ctype))
    return images


# --------------------------------------------------------------------------------------------- server process


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (the server binds it right after; a clash fails start-up)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def serve_supports(option: str) -> bool:
    """Whether ``malaria-cells serve`` has ``option``, read from its --help (the CLI is the contract, not the code)."""
    out = subprocess.run(
        [sys.executable, "-m", "malaria_cells.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )
    return option in out.stdout


def server_memory(pid: int, pids: list[int] | None = None) -> dict[str, float]:
    """RSS and peak RSS (MB) summed over the server's process tree (or ``pids``), and its thread count."""
    pids = pids or process_tree(pid)
    status = [proc_status(p) for p in pids]
    return {
        "rss_mb": sum(st.get("VmRSS", 0) for st in status) / 1024,
        "peak_rss_mb": sum(st.get("VmHWM", 0) for st in status) / 1024,
        "threads": sum(st.get("Threads", 0) for st in status),
        "processes": len(pids),
    }


def server_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of the server's process tree (how much of the 2 cores the server itself used)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / ticks


@dataclass
class Server:
    """The service under test, in its own session so that signals reach it and its children, and only them."""

    proc: subprocess.Popen
    base_url: str
    log_path: Path

    @classmethod
    def start(
        cls, *, model: str | None, threads: int | None, workers: int | None, log_path: Path, timeout_s: float
    ) -> Server:
        port = free_port()
        cmd = [sys.executable, "-m", "malaria_cells.cli", "serve", "--host", HOST, "--port", str(port)]
        if model:
            cmd += ["--model", model]
        if threads:
            cmd += ["--threads", str(threads)]
        if workers:
            cmd += ["--workers", str(workers)]
        console.print(f"[dim]starting: {' '.join(cmd)}[/]")
        # Log to a file, not a pipe: uvicorn writes a line per request and a full, unread pipe would stall it.
        log = log_path.open("wb")
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()  # the child holds its own descriptor
        server = cls(proc=proc, base_url=f"http://{HOST}:{port}", log_path=log_path)
        try:
            server.wait_healthy(timeout_s)
        except BaseException:
            server.stop()
            raise
        return server

    def wait_healthy(self, timeout_s: float) -> None:
        """Poll /api/v1/health until the model is loaded; fail early if the process exits."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.base_url, timeout=2.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with code {self.proc.returncode} during start-up")
                with contextlib.suppress(httpx.HTTPError):
                    r = client.get(f"{API}/health")
                    if r.status_code == 200 and r.json().get("model_loaded"):
                        return
                time.sleep(0.25)
        raise RuntimeError(f"server not healthy after {timeout_s:.0f} s")

    def stop(self) -> int | None:
        """SIGINT (uvicorn's graceful shutdown), then SIGTERM, then SIGKILL, to the server's process group."""
        for sig, wait_s in ((signal.SIGINT, 10.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)  # its own group (start_new_session): only the server's processes
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait_s)
        return self.proc.poll()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_problems(self) -> list[str]:
        """Log lines that are not the normal access/info lines: warnings, errors, tracebacks."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        marks = ("WARNING", "ERROR", "CRITICAL", "Traceback", "Exception")
        return [line for line in text.splitlines() if any(m in line for m in marks)]


# --------------------------------------------------------------------------------------------- load


@dataclass
class Phase:
    """What one batch of requests did."""

    sent: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    error_examples: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    stopped_early: bool = False

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if len(self.error_examples) < 5:
            self.error_examples.append(f"{kind}: {detail[:300]}")

    @property
    def n_errors(self) -> int:
        return sum(self.errors.values())


async def run_phase(
    client: httpx.AsyncClient,
    images: list[tuple[str, bytes, str]],
    *,
    n: int,
    concurrency: int,
    deadline: float,
    offset: int,
    server_pid: int,
) -> Phase:
    """Send ``n`` predictions, ``concurrency`` at a time, none started after ``deadline`` (time.monotonic)."""
    phase = Phase()
    next_i = 0  # shared by the workers; safe without a lock because asyncio switches only at awaits

    async def worker() -> None:
        nonlocal next_i
        while next_i < n:
            if time.monotonic() >= deadline:
                phase.stopped_early = True
                return
            i = next_i
            next_i += 1
            phase.sent += 1
            name, data, ctype = images[(offset + i) % len(images)]
            t0 = time.perf_counter()
            try:
                r = await client.post(f"{API}/predict", files={"files": (name, data, ctype)})
                latency = (time.perf_counter() - t0) * 1000
            except httpx.HTTPError as e:
                phase.error(type(e).__name__, str(e) or repr(e))
                continue
            if r.status_code != 200:
                phase.error(f"HTTP {r.status_code}", r.text)
                continue
            try:
                result = r.json()["results"][0]
                ok = result["ok"] is True and bool(result["label"])
            except (ValueError, KeyError, IndexError, TypeError) as e:
                phase.error("bad body", f"{e!r}: {r.text}")
                continue
            if not ok:
                phase.error("result not ok", r.text)
                continue
            phase.latencies_ms.append(latency)

    cpu0, server_cpu0, t0 = time.process_time(), server_cpu_seconds(server_pid), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, n)))))
    phase.wall_s = time.perf_counter() - t0
    phase.client_cpu_s = time.process_time() - cpu0
    phase.server_cpu_s = server_cpu_seconds(server_pid) - server_cpu0
    return phase


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile (a value that was observed; no interpolation between two requests)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize(phase: Phase) -> dict[str, Any]:
    lat = sorted(phase.latencies_ms)
    done = len(lat) + phase.n_errors
    return {
        "sent": phase.sent,
        "ok": len(lat),
        "errors": phase.n_errors,
        "errors_by_kind": phase.errors,
        "error_examples": phase.error_examples,
        "wall_s": round(phase.wall_s, 3),
        "requests_per_s": round(done / phase.wall_s, 2) if phase.wall_s > 0 else None,
        "ok_per_s": round(len(lat) / phase.wall_s, 2) if phase.wall_s > 0 else None,
        "latency_ms": {
            "p50": round(percentile(lat, 50), 2),
            "p90": round(percentile(lat, 90), 2),
            "p99": round(percentile(lat, 99), 2),
            "max": round(lat[-1], 2) if lat else None,
            "mean": round(sum(lat) / len(lat), 2) if lat else None,
        },
        "client_cpu_s": round(phase.client_cpu_s, 2),
        "server_cpu_s": round(phase.server_cpu_s, 2),
        "server_cpu_ms_per_request": round(1000 * phase.server_cpu_s / done, 2) if done else None,
        "stopped_early": phase.stopped_early,
    }


async def load(server: Server, images: list[tuple[str, bytes, str]], args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up, memory reading, timed run, memory reading."""
    pid = server.proc.pid
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    # trust_env=False: a proxy set in the environment must not carry loopback traffic anywhere else.
    async with httpx.AsyncClient(
        base_url=server.base_url, timeout=args.timeout, limits=limits, trust_env=False
    ) as client:
        model = (await client.get(f"{API}/model")).json()
        mem_before = server_memory(pid)
        deadline = time.monotonic() + args.max_seconds
        console.print(f"warm-up: {args.warmup} requests, concurrency {args.concurrency}")
        warm = await run_phase(
            client, images, n=args.warmup, concurrency=args.concurrency, deadline=deadline, offset=0, server_pid=pid
        )
        mem_warm = server_memory(pid)
        console.print(f"run: {args.requests} requests, concurrency {args.concurrency}")
        run = await run_phase(
            client,
            images,
            n=args.requests,
            concurrency=args.concurrency,
            deadline=deadline,
            offset=args.warmup,
            server_pid=pid,
        )
        mem_after = server_memory(pid)
        health = (await client.get(f"{API}/health")).json()
    return {
        "model": {k: model.get(k) for k in ("model", "backend", "source", "input_size", "threshold") if k in model},
        "warmup": summarize(warm),
        "run": summarize(run),
        "memory": {
            "before_load": mem_before,
            "after_warmup": mem_warm,
            "after_run": mem_after,
            "rss_growth_after_warmup_mb": round(mem_after["rss_mb"] - mem_warm["rss_mb"], 1),
            "rss_growth_per_1000_requests_mb": round(1000 * (mem_after["rss_mb"] - mem_warm["rss_mb"]) / run.sent, 2)
            if run.sent
            else None,
        },
        "health_after_run": health,
    }


# --------------------------------------------------------------------------------------------- upload attack


def noise_png(max_bytes: int) -> bytes:
    """A PNG of random pixels just under ``max_bytes``: incompressible, so as large as a file may be, and decoding it
    costs what its size says (~3 bytes per pixel)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    side = int(math.sqrt(max_bytes / 3))
    while True:
        buf = io.BytesIO()
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
        if buf.tell() <= max_bytes:
            return buf.getvalue()
        side = int(side * math.sqrt(max_bytes / buf.tell()) * 0.999)


async def upload_attack(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    """``--attack-requests`` requests of ``--attack-files`` max-size files, all at once; server RSS sampled meanwhile.

    Every request is sent at once (no client-side queue), each with its own connection. Answers are counted by
    status and, per file, by result code; a connection the server closed while the client was still uploading (a
    refused request; the 503 may not reach a client that is still sending) counts under its exception's name.
    """
    pid = server.proc.pid
    payload = noise_png(int(args.attack_file_mb * 1_000_000))
    files = [("files", (f"noise{i}.png", payload, "image/png")) for i in range(args.attack_files)]
    console.print(
        f"upload attack: {args.attack_requests} requests x {args.attack_files} files x {len(payload) / 1e6:.2f} MB "
        f"({args.attack_requests * args.attack_files * len(payload) / 1e9:.2f} GB in all), at once"
    )
    statuses: collections.Counter[str] = collections.Counter()
    file_codes: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    pids = process_tree(pid)  # once: walking /proc every 50 ms would cost the client more than the sample
    samples: list[float] = []
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            samples.append(server_memory(pid, pids)["rss_mb"])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.05)

    limits = httpx.Limits(max_connections=args.attack_requests + 2, max_keepalive_connections=0)
    async with httpx.AsyncClient(
        base_url=server.base_url, timeout=args.attack_timeout, limits=limits, trust_env=False
    ) as client:
        model = (await client.get(f"{API}/model")).json()
        mem_before = server_memory(pid, pids)

        async def one() -> None:
            t0 = time.perf_counter()
            try:
                r = await client.post(f"{API}/predict", files=files)
            except httpx.HTTPError as e:
                errors[type(e).__name__] += 1
                return
            latencies.append((time.perf_counter() - t0) * 1000)
            statuses[str(r.status_code)] += 1
            try:
                body = r.json()
            except ValueError:
                file_codes["(not JSON)"] += 1
                return
            for res in body.get("results") or []:
                file_codes["ok" if res.get("ok") else res.get("error", {}).get("code", "?")] += 1
            if not body.get("results") and body.get("error"):
                file_codes[f"request: {body['error'].get('code')}"] += 1

        sampler = asyncio.create_task(sample())
        t0 = time.perf_counter()
        stopped_early = False
        try:
            await asyncio.wait_for(
                asyncio.gather(*(one() for _ in range(args.attack_requests))), args.attack_max_seconds
            )
        except TimeoutError:
            stopped_early = True
        wall = time.perf_counter() - t0
        done.set()
        await sampler
        mem_after = server_memory(pid, pids)
        health = (await client.get(f"{API}/health")).json()
    return {
        "requests": args.attack_requests,
        "files_per_request": args.attack_files,
        "file_bytes": len(payload),
        "request_mb": round(args.attack_files * len(payload) / 1e6, 1),
        "server_limits": model.get("limits"),
        "statuses": dict(statuses),
        "client_errors": dict(errors),
        "file_results": dict(file_codes),
        "wall_s": round(wall, 2),
        "latency_ms_max": round(max(latencies), 1) if latencies else None,
        "rss_before_mb": round(mem_before["rss_mb"], 1),
        "rss_max_sampled_mb": round(max(samples, default=mem_before["rss_mb"]), 1),
        "rss_after_mb": round(mem_after["rss_mb"], 1),
        "peak_rss_vmhwm_mb": round(mem_after["peak_rss_mb"], 1),
        "rss_samples": len(samples),
        "health_after": health,
        "stopped_early": stopped_early,
        "unexpected": sum(n for code, n in statuses.items() if code.startswith("5") and code != "503"),
    }


# --------------------------------------------------------------------------------------------- report


def print_report(params: dict[str, Any], results: dict[str, Any], machine: dict[str, Any]) -> None:
    la0, la1 = machine["load_average_start"], machine.get("load_average_end") or list(os.getloadavg())
    if "run" in results:
        run, warm, mem = results["run"], results["warmup"], results["memory"]
        table = Table(title=f"load test: {params['requests']} requests, concurrency {params['concurrency']}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        m = results["model"]
        table.add_row("server", results["server_url"])
        table.add_row("model", f"{m.get('model')} ({m.get('backend')}, {m.get('source')})")
        table.add_row("requests sent / ok", f"{run['sent']} / {run['ok']}")
        color = "red" if run["errors"] else "green"
        table.add_row("errors", f"[{color}]{run['errors']}[/] (warm-up: {warm['errors']})")
        table.add_row("wall time", f"{run['wall_s']:.1f} s")
        table.add_row("requests/s", f"{run['requests_per_s']}")
        for k in ("p50", "p90", "p99", "max"):
            table.add_row(f"latency {k}", f"{run['latency_ms'][k]} ms")
        table.add_row("server CPU per request", f"{run['server_cpu_ms_per_request']} ms")
        table.add_row("client CPU / server CPU", f"{run['client_cpu_s']} s / {run['server_cpu_s']} s")
        table.add_row("server RSS before load", f"{mem['before_load']['rss_mb']:.1f} MB")
        table.add_row("server RSS after warm-up", f"{mem['after_warmup']['rss_mb']:.1f} MB")
        table.add_row("server RSS after run", f"{mem['after_run']['rss_mb']:.1f} MB")
        table.add_row("RSS growth after warm-up", f"{mem['rss_growth_after_warmup_mb']:+.1f} MB")
        table.add_row("server peak RSS (VmHWM)", f"{mem['after_run']['peak_rss_mb']:.1f} MB")
        threads = f"{mem['before_load']['threads']} / {mem['after_run']['threads']}"
        table.add_row("server threads before / after", threads)
        table.add_row("load average start / end", f"{la0[0]:.2f} / {la1[0]:.2f} (1 min)")
        table.add_row("cores", str(machine["cpu_count"]))
        console.print(table)
        if run["stopped_early"] or warm["stopped_early"]:
            console.print(
                f"[yellow]stopped early: --max-seconds {params['max_seconds']} reached after "
                f"{warm['sent'] + run['sent']} requests (warm-up included); numbers cover the requests sent[/]"
            )
        for example in warm["error_examples"] + run["error_examples"]:
            console.print(f"[red]error[/] {example}")
    if "upload_attack" in results:
        a = results["upload_attack"]
        table = Table(
            title=f"upload attack: {a['requests']} requests x {a['files_per_request']} files x "
            f"{a['file_bytes'] / 1e6:.2f} MB, at once"
        )
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_row("answers by status", ", ".join(f"{k}: {v}" for k, v in sorted(a["statuses"].items())) or "-")
        table.add_row("client errors", ", ".join(f"{k}: {v}" for k, v in a["client_errors"].items()) or "-")
        table.add_row("file results", ", ".join(f"{k}: {v}" for k, v in a["file_results"].items()) or "-")
        table.add_row("wall time", f"{a['wall_s']:.1f} s")
        table.add_row("server RSS before", f"{a['rss_before_mb']:.1f} MB")
        table.add_row("server RSS max (sampled, 50 ms)", f"{a['rss_max_sampled_mb']:.1f} MB")
        table.add_row("server RSS after", f"{a['rss_after_mb']:.1f} MB")
        table.add_row("server peak RSS (VmHWM)", f"{a['peak_rss_vmhwm_mb']:.1f} MB")
        table.add_row("load average start / end", f"{la0[0]:.2f} / {la1[0]:.2f} (1 min)")
        console.print(table)
        if a["stopped_early"]:
            console.print(f"[yellow]stopped early: --attack-max-seconds {params['attack_max_seconds']} reached[/]")
    if results["server_log_problems"]:
        console.print(f"[yellow]{len(results['server_log_problems'])} warning/error line(s) in the server log[/]")
        for line in results["server_log_problems"][:5]:
            console.print(f"  {line}")


# --------------------------------------------------------------------------------------------- main

QUICK = dict(  # --quick: a smoke run that checks the script works, not a measurement
    requests=100,
    warmup=10,
    concurrency=4,
    files=20,
    max_seconds=60.0,
    attack_requests=4,
    attack_files=4,
    attack_file_mb=2.0,
    attack_max_seconds=60.0,
)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--scenario",
        choices=("all", "load", "upload-attack"),
        default="all",
        help="all: load, then upload attack",
    )
    ap.add_argument("--requests", type=int, default=5000, help="timed requests (after the warm-up)")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    ap.add_argument("--model", default=None, help="an .onnx file or run folder (default: the server's default)")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="no new request after this long (warm-up too)")
    ap.add_argument("--warmup", type=int, default=100, help="untimed requests before the run")
    ap.add_argument("--threads", type=int, default=None, help="server inference threads (if serve has --threads)")
    ap.add_argument("--workers", type=int, default=None, help="requests the server classifies at once (serve default)")
    ap.add_argument(
        "--data", default=str(ROOT.parent / "shared" / "nih-cell-images"), help="dataset root, one folder per class"
    )
    ap.add_argument("--files", type=int, default=200, help="distinct images to cycle through")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds before one request counts as failed")
    ap.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for /api/v1/health")
    ap.add_argument("--attack-requests", type=int, default=12, help="upload attack: requests sent at once (<= 64)")
    ap.add_argument("--attack-files", type=int, default=32, help="upload attack: files per request")
    ap.add_argument("--attack-file-mb", type=float, default=9.9, help="upload attack: size of each file, MB")
    ap.add_argument("--attack-timeout", type=float, default=120.0, help="upload attack: seconds per request")
    ap.add_argument("--attack-max-seconds", type=float, default=180.0, help="upload attack: seconds in all")
    ap.add_argument("--quick", action="store_true", help="a smoke run with small sizes (not a measurement)")
    ap.add_argument("--out", default=None, help="result file (default: benchmarks/results/load_test*.json)")
    args = ap.parse_args()
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.out is None:
        name = {"upload-attack": "load_test_upload_attack.json"}.get(args.scenario, "load_test.json")
        quick = Path(tempfile.gettempdir()) / "load_test_quick.json"
        args.out = str(quick if args.quick else ROOT / "benchmarks" / "results" / name)
    for name in ("requests", "concurrency", "files", "attack_requests", "attack_files"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.attack_requests > 64:
        ap.error("--attack-requests must be at most 64 (this is a bounded test, not a flood)")
    if args.warmup < 0 or min(args.max_seconds, args.timeout, args.attack_timeout, args.attack_max_seconds) <= 0:
        ap.error("--warmup must be >= 0; --max-seconds, --timeout and the attack's times > 0")
    if not 0 < args.attack_file_mb <= 100:
        ap.error("--attack-file-mb must be in (0, 100]")
    return args


def _forward_to_sigint(_signum: int, _frame: Any) -> None:
    # Turned into SIGINT so that asyncio.run cancels the load cleanly (its own SIGINT handler), and outside the
    # event loop it is a KeyboardInterrupt; either way the finally in main() stops the server.
    signal.raise_signal(signal.SIGINT)


async def measure(server: Server, images: list[tuple[str, bytes, str]], args: argparse.Namespace) -> dict[str, Any]:
    """The chosen scenarios, in order: the load (if asked), then the upload attack (if asked)."""
    out: dict[str, Any] = {}
    if args.scenario in ("all", "load"):
        out.update(await load(server, images, args))
    if args.scenario in ("all", "upload-attack"):
        out["upload_attack"] = await upload_attack(server, args)
    return out


def main() -> int:
    args = parse_args()
    # SIGTERM (e.g. from a job runner) takes the same path as Ctrl-C, so the finally below stops the server. A
    # shell starts background jobs with SIGINT ignored: restore Python's handler, or the forwarded signal is lost.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _forward_to_sigint)
    if args.threads and not serve_supports("--threads"):
        console.print(
            "[red]`malaria-cells serve` has no --threads option; the server uses onnxruntime's/torch's default "
            "(all cores). Run without --threads.[/]"
        )
        return 2
    data = Path(args.data)
    images: list[tuple[str, bytes, str]] = []
    if args.scenario in ("all", "load"):
        if not data.is_dir():
            console.print(f"[red]{data}: not a folder[/]")
            return 2
        images = load_images(data, args.files)
        size_mb = sum(len(b) for _, b, _ in images) / 1e6
        console.print(f"{len(images)} images from {data} ({size_mb:.1f} MB in memory)")
    machine = machine_info(PACKAGES)
    server: Server | None = None
    with tempfile.TemporaryDirectory(prefix="load_test_") as tmp:
        try:
            try:
                server = Server.start(
                    model=args.model,
                    threads=args.threads,
                    workers=args.workers,
                    log_path=Path(tmp) / "server.log",
                    timeout_s=args.startup_timeout,
                )
            except RuntimeError as e:
                console.print(f"[red]{e}[/]")
                log = Path(tmp) / "server.log"
                if log.exists():
                    console.print(log.read_text(errors="replace")[-4000:], markup=False, highlight=False)
                return 2
            measured = asyncio.run(measure(server, images, args))
            server_gone = server.proc.poll() is not None  # crashed under the load or the attack
        except KeyboardInterrupt:
            console.print("[yellow]interrupted; server stopped, nothing written[/]")
            return 130
        finally:
            exit_code = server.stop() if server else None
            problems = server.log_problems() if server else []
        machine["load_average_end"] = list(os.getloadavg())
    params = {
        "scenario": args.scenario,
        "quick": args.quick,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "warmup": args.warmup,
        "max_seconds": args.max_seconds,
        "threads": args.threads,
        "workers": args.workers,
        "files": len(images),
        "data": str(data),
        "timeout_s": args.timeout,
        "model_arg": args.model,
        "attack_requests": args.attack_requests,
        "attack_files": args.attack_files,
        "attack_file_mb": args.attack_file_mb,
        "attack_timeout_s": args.attack_timeout,
        "attack_max_seconds": args.attack_max_seconds,
    }
    results = {
        "server_url": server.base_url,
        "server_command": "python -m malaria_cells.cli serve --host 127.0.0.1 --port <free port>"
        + (f" --model {args.model}" if args.model else "")
        + (f" --threads {args.threads}" if args.threads else "")
        + (f" --workers {args.workers}" if args.workers else ""),
        **measured,
        "server_exit_code": exit_code,
        "server_crashed": server_gone,
        "server_log_problems": problems[:50],
    }
    command = " ".join(["python", "benchmarks/load_test.py", *sys.argv[1:]])
    save_result(args.out, name="load_test", command=command, params=params, results=results, machine=machine)
    print_report(params, results, machine)
    console.print(f"[green]wrote[/] {args.out}")
    errors = sum(results[k]["errors"] for k in ("run", "warmup") if k in results)
    errors += results.get("upload_attack", {}).get("unexpected", 0) + int(server_gone)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

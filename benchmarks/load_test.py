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

Run: .venv/bin/python benchmarks/load_test.py [--model MODEL.onnx|RUN_DIR] [--requests 5000] [--concurrency 16]
     [--max-seconds 300] [--warmup 100] [--threads N] [--workers N] [--data ../shared/nih-cell-images] [--out PATH]
Writes benchmarks/results/load_test.json. Exit code 0 with no errors, 1 with any, 2 when the server cannot start
or an option is unusable, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from benchinfo import machine_info
from rich.console import Console
from rich.table import Table

from malaria_cells.io import atomic_write_json

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


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (uvicorn with workers or a reloader forks; count their memory too)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        # The command name (field 2) is in parentheses and may hold spaces: parse after the last ")".
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(parents.get(p, []))
    return tree


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def server_memory(pid: int) -> dict[str, float]:
    """RSS and peak RSS (MB) summed over the server's process tree, and its thread count."""
    pids = process_tree(pid)
    return {
        "rss_mb": sum(_status_kb(p, "VmRSS") for p in pids) / 1024,
        "peak_rss_mb": sum(_status_kb(p, "VmHWM") for p in pids) / 1024,
        "threads": sum(_status_kb(p, "Threads") for p in pids),
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


# --------------------------------------------------------------------------------------------- report


def print_report(result: dict[str, Any]) -> None:
    run, warm, mem = result["run"], result["warmup"], result["memory"]
    p = result["parameters"]
    table = Table(title=f"load test: {p['requests']} requests, concurrency {p['concurrency']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    m = result["model"]
    table.add_row("server", result["server_url"])
    table.add_row("model", f"{m.get('model')} ({m.get('backend')}, {m.get('source')})")
    table.add_row("requests sent / ok", f"{run['sent']} / {run['ok']}")
    table.add_row("errors", f"[{'red' if run['errors'] else 'green'}]{run['errors']}[/] (warm-up: {warm['errors']})")
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
    table.add_row("server threads before / after", f"{mem['before_load']['threads']} / {mem['after_run']['threads']}")
    la0, la1 = result["machine"]["load_average_start"], result["machine"]["load_average_end"]
    table.add_row("load average start / end", f"{la0[0]:.2f} / {la1[0]:.2f} (1 min)")
    table.add_row("cores", str(result["machine"]["cpu_count"]))
    console.print(table)
    if run["stopped_early"] or warm["stopped_early"]:
        console.print(
            f"[yellow]stopped early: --max-seconds {p['max_seconds']} reached after {warm['sent'] + run['sent']} "
            f"requests (warm-up included); numbers cover the requests sent[/]"
        )
    for example in warm["error_examples"] + run["error_examples"]:
        console.print(f"[red]error[/] {example}")
    if result["server_log_problems"]:
        console.print(f"[yellow]{len(result['server_log_problems'])} warning/error line(s) in the server log[/]")
        for line in result["server_log_problems"][:5]:
            console.print(f"  {line}")


# --------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "load_test.json"))
    args = ap.parse_args()
    for name in ("requests", "concurrency", "files"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    if args.warmup < 0 or args.max_seconds <= 0 or args.timeout <= 0:
        ap.error("--warmup must be >= 0, --max-seconds and --timeout > 0")
    return args


def _forward_to_sigint(_signum: int, _frame: Any) -> None:
    # Turned into SIGINT so that asyncio.run cancels the load cleanly (its own SIGINT handler), and outside the
    # event loop it is a KeyboardInterrupt; either way the finally in main() stops the server.
    signal.raise_signal(signal.SIGINT)


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
    if not data.is_dir():
        console.print(f"[red]{data}: not a folder[/]")
        return 2
    images = load_images(data, args.files)
    console.print(f"{len(images)} images from {data} ({sum(len(b) for _, b, _ in images) / 1e6:.1f} MB in memory)")
    machine = machine_info(PACKAGES)
    machine["load_average_start"] = list(os.getloadavg())
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
            measured = asyncio.run(load(server, images, args))
        except KeyboardInterrupt:
            console.print("[yellow]interrupted; server stopped, nothing written[/]")
            return 130
        finally:
            exit_code = server.stop() if server else None
            problems = server.log_problems() if server else []
        machine["load_average_end"] = list(os.getloadavg())
    result = {
        "benchmark": "load_test",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "server_url": server.base_url,
        "server_command": "python -m malaria_cells.cli serve --host 127.0.0.1 --port <free port>"
        + (f" --model {args.model}" if args.model else "")
        + (f" --threads {args.threads}" if args.threads else "")
        + (f" --workers {args.workers}" if args.workers else ""),
        "parameters": {
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
        },
        "machine": machine,
        **measured,
        "server_exit_code": exit_code,
        "server_log_problems": problems[:50],
    }
    atomic_write_json(Path(args.out), result)
    print_report(result)
    console.print(f"[green]wrote[/] {args.out}")
    errors = result["run"]["errors"] + result["warmup"]["errors"]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

"""What every benchmark shares: the machine block, timing and statistics, /proc readers, train sweeps, one result file.

The scripts in this folder run as ``python benchmarks/NAME.py``, so this module is found beside them:
``from harness import machine_info, save_result, ...``. It imports only the standard library at module level (the
ONNX cells of ``inference_matrix.py`` import it and must not pull in torch); ``malaria_cells``, numpy and even
``statistics`` (1 MB of RSS with ``decimal``) are imported inside the functions that need them.

A result file (``benchmarks/results/*.json``) has one shape, :data:`SCHEMA`::

    {"schema": "malaria-cells-bench/1", "benchmark": NAME, "command": "python benchmarks/NAME.py ...",
     "machine": {...machine_info()...}, "params": {...what was asked for...}, "results": {...what was measured...}}

written atomically by :func:`save_result` and read by :func:`load_result`, which also reads the files written before
the schema (flat dicts), so ``report.py`` renders old and new files alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # pragma: no cover - typing only
    from malaria_cells.run import Run

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "malaria-cells-bench/1"
# What `make bench` writes: not a change to the code measured.
BENCH_OUTPUTS = ("benchmarks/results/", "docs/benchmarks.md")
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
T = TypeVar("T")


# --------------------------------------------------------------------------------------------- machine


def git(*args: str) -> str | None:
    """A git command's output in this repository, or None (no git, not a checkout, an error).

    Only trailing whitespace is cut: the first line of ``status --porcelain`` may begin with a space.
    """
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.rstrip() if out.returncode == 0 else None


def git_state() -> tuple[str | None, bool | None]:
    """The checked-out commit and whether the code has local changes (None, None outside a git checkout).

    Benchmark outputs (results, the README's tables) do not count as local changes.
    """
    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = git("status", "--porcelain")
    if status is None:
        return commit, None
    changed = [ln[3:] for ln in status.splitlines() if ln.strip()]
    return commit, any(not p.startswith(BENCH_OUTPUTS) for p in changed)


def package_versions(packages: Iterable[str]) -> dict[str, str | None]:
    """Installed version of each distribution (None when it is not installed)."""
    import importlib.metadata

    versions: dict[str, str | None] = {}
    for pkg in packages:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return versions


def machine_info(packages: Iterable[str], extra_versions: dict[str, str] | None = None) -> dict[str, Any]:
    """CPU model, cores, bf16/AMX flags, memory, package versions, date, git commit and load of this run.

    Call it when the benchmark starts (its ``load_average_start`` is the load before the work);
    :func:`save_result` adds ``load_average_end``.

    Args:
        packages: distribution names whose versions decide the benchmark's numbers.
        extra_versions: versions pip metadata does not know (e.g. OpenCV's build).

    Returns:
        A JSON-ready dict.
    """
    import datetime as dt
    import platform

    cpuinfo = ""
    with contextlib.suppress(OSError):
        cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), None)
    flags = set(next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines() if ln.startswith("flags")), []))
    mem_kb = proc_status_file(Path("/proc/meminfo")).get("MemTotal")
    commit, dirty = git_state()
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_model": model or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_flags": {f: f in flags for f in CPU_FLAGS},
        "native_bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
        "memory_gb": round(mem_kb / 1024**2, 1) if mem_kb else None,
        "platform": platform.platform(),
        "packages": {"python": platform.python_version(), **package_versions(packages), **(extra_versions or {})},
        "git_commit": commit,
        "git_dirty": dirty,
        "nice": os.nice(0),
        "thread_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
        # The machine may be shared: the load average says how busy it was (N cores fully busy = load N).
        "load_average_start": list(os.getloadavg()),
    }


# --------------------------------------------------------------------------------------------- statistics and timing


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, interpolated linearly between the two nearest ranks.

    The one definition of every benchmark here: ``numpy.percentile``'s default ("linear", Hyndman & Fan type 7),
    which the latency columns of the README's inference matrix were computed with. It may return a value between
    two observations (p50 of an even count is the mean of the middle two). NaN for no values.
    """
    if not values:
        return float("nan")
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def spread(items: Sequence[T], n: int | None) -> list[T]:
    """``n`` items evenly spread over ``items`` (for the share: both classes, many patients); all of them when ``n``
    is None or not smaller than ``len(items)``."""
    if n is None or n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def interleaved(
    fns: dict[str, Callable[[], T]], repeat: int, *, on_call: Callable[[], Any] | None = None
) -> dict[str, list[T]]:
    """What each function returns, over ``repeat`` rounds that call every function once, in order.

    Interleaving makes a change in the machine's load (it is shared) hit every variant alike. Warm-up is the
    caller's: the first call here is already recorded.
    """
    out: dict[str, list[T]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            out[name].append(fn())
            if on_call:
                on_call()
    return out


def interleaved_rates(
    fns: dict[str, Callable[[], Any]], n: int, repeat: int, *, on_call: Callable[[], Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Items per second of each function (each call handles ``n`` items), timed in interleaved rounds.

    Returns:
        name -> {"median": median over rounds, "best": the fastest round, "rounds": every round's rate}.
    """

    def timed(fn: Callable[[], Any]) -> Callable[[], float]:
        def call() -> float:
            t0 = time.perf_counter()
            fn()
            return n / (time.perf_counter() - t0)

        return call

    import statistics

    rounds = interleaved({name: timed(fn) for name, fn in fns.items()}, repeat, on_call=on_call)
    return {name: {"median": statistics.median(r), "best": max(r), "rounds": r} for name, r in rounds.items()}


# --------------------------------------------------------------------------------------------- /proc


def proc_status_file(path: Path) -> dict[str, int]:
    """The numeric fields of a ``/proc`` key/value file (``status``, ``meminfo``): name -> first number (KiB for
    memory). Empty where it cannot be read (no /proc, the process has exited)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            key, _, rest = line.partition(":")
            with contextlib.suppress(ValueError, IndexError):
                out[key] = int(rest.split()[0])
    return out


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """``/proc/PID/status`` as numbers: VmRSS, VmHWM, RssAnon, RssFile (KiB), Threads, ..."""
    return proc_status_file(Path(f"/proc/{pid}/status"))


def status_kb(pid: int | str, key: str) -> int | None:
    """One field of ``/proc/PID/status`` (KiB for memory; a count for Threads), None where unreadable."""
    return proc_status(pid).get(key)


def rss_mb(pid: int | str = "self") -> float | None:
    """Resident memory now (VmRSS) in MiB, None where there is no /proc."""
    kb = status_kb(pid, "VmRSS")
    return kb / 1024 if kb is not None else None


def peak_rss_mb(pid: int | str = "self") -> float | None:
    """Peak resident memory (VmHWM) in MiB.

    VmHWM, not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries ru_maxrss over an exec from the forked copy of the
    parent, so a child of a parent that imported torch would report the parent's size (measured: 755 MB for an
    onnxruntime-only child). VmHWM belongs to the exec'd image alone. Without /proc: ru_maxrss for this process,
    None for another.
    """
    kb = status_kb(pid, "VmHWM")
    if kb is not None:
        return kb / 1024
    if pid == "self":
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return None


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (a server with workers forks; count their memory and CPU too)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        # The command name (field 2) is in parentheses and may hold spaces: parse after the last ")".
        parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(parents.get(p, []))
    return tree


# --------------------------------------------------------------------------------------------- training runs


def first_reached(history: list[dict[str, Any]], targets: Iterable[float]) -> dict[str, dict[str, Any] | None]:
    """For each target validation accuracy, the first epoch of ``history`` (a run's ``metrics.jsonl`` rows) that
    reached it and its ``elapsed_s``, or None; keyed ``f"{target:.2f}"``."""
    reached = {}
    for target in targets:
        hit = next((h for h in history if (h.get("val_accuracy") or 0) >= target), None)
        reached[f"{target:.2f}"] = {"epoch": hit["epoch"], "elapsed_s": hit["elapsed_s"]} if hit else None
    return reached


def val_metrics(run: Run) -> dict[str, Any]:
    """A finished run's validation metrics at its threshold: accuracy, ROC AUC, MCC and the number of cells."""
    vm = run.meta.val_metrics_at_threshold
    return {"val_accuracy": vm["accuracy"], "val_roc_auc": vm["roc_auc"], "val_mcc": vm["mcc"], "val_cells": vm["n"]}


def train_run(overrides: dict[str, Any], *, data: Path, run_dir: Path) -> tuple[Run, float]:
    """Train one run (``malaria_cells.train.train`` with the defaults plus ``overrides``) into ``run_dir``.

    Returns:
        (the finished run, wall seconds of the training call).
    """
    from malaria_cells.config import resolve_config
    from malaria_cells.run import Run
    from malaria_cells.train import train

    t0 = time.perf_counter()
    out = train(config=resolve_config(overrides=overrides), data_dir=data, run_dir=run_dir)
    return Run.open(out), time.perf_counter() - t0


def sweep(
    settings: Iterable[T],
    overrides: Callable[[T], dict[str, Any]],
    row: Callable[[T, Run, float], dict[str, Any]],
    *,
    data: Path,
    workdir: Path,
    label: Callable[[T], str] = str,
    echo: bool = True,
) -> list[dict[str, Any]]:
    """One training run per setting, one result row per run: the loop of the train-per-setting benchmarks.

    Every run trains ``overrides(setting)`` into ``workdir / label(setting)`` (settings are consumed lazily, so a
    later setting may name an earlier run's folder, e.g. as ``init_from``); ``row(setting, run, wall_s)`` makes its
    row, printed as it comes when ``echo``.
    """
    rows = []
    for setting in settings:
        run, wall_s = train_run(overrides(setting), data=data, run_dir=workdir / label(setting))
        rows.append(row(setting, run, wall_s))
        if echo:
            from rich.console import Console

            Console().print(rows[-1])
    return rows


# --------------------------------------------------------------------------------------------- result files


def command_line() -> str:
    """This benchmark's command as it was run (``python benchmarks/NAME.py ARGS``), to print beside its numbers."""
    import shlex

    return shlex.join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def save_result(
    path: str | Path, *, name: str, command: str, params: dict[str, Any], results: Any, machine: dict[str, Any]
) -> Path:
    """Write a result file of the :data:`SCHEMA` shape atomically (NaN as null); adds ``load_average_end``.

    Args:
        path: the JSON file (``benchmarks/results/NAME.json``).
        name: the benchmark's name.
        command: the command that reruns it (:func:`command_line`).
        params: what was asked for (arguments, sizes, repeats).
        results: what was measured.
        machine: :func:`machine_info` of this run, taken at its start.
    """
    from malaria_cells.io import atomic_write_json

    machine = {**machine, "load_average_end": machine.get("load_average_end") or list(os.getloadavg())}
    doc = {"schema": SCHEMA, "benchmark": name, "command": command, "machine": machine, "params": params}
    return atomic_write_json(Path(path), {**doc, "results": results})


@dataclass(frozen=True)
class Result:
    """A result file, whatever its age: ``machine``, ``params`` and ``results`` as in :data:`SCHEMA`.

    ``result[key]`` / ``result.get(key)`` look in ``results`` (when a dict), then in ``params``, so a reader need
    not know which side an older file kept a key on.
    """

    path: Path
    name: str
    command: str | None
    machine: dict[str, Any]
    params: dict[str, Any]
    results: Any
    schema: str | None = None  # None: written before the schema

    def __getitem__(self, key: str) -> Any:
        if isinstance(self.results, dict) and key in self.results:
            return self.results[key]
        return self.params[key]

    def __contains__(self, key: str) -> bool:
        return (isinstance(self.results, dict) and key in self.results) or key in self.params

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default


# Files from before the schema kept some machine fields at the top level, under their own names.
_LEGACY_MACHINE = {"cpu": "cpu_model", "cpu_count": "cpu_count", "cpu_has_native_bf16": "native_bf16", "date": "date"}


def load_result(path: str | Path) -> Result:
    """Read a result file: the :data:`SCHEMA` shape, or an older flat one.

    An older file's ``config`` (its arguments) becomes ``params``, its other keys ``results``, and machine fields it
    kept at the top level (``cpu``, ``cpu_count``, ``cpu_has_native_bf16``, ``date``, ``loadavg_at_start``,
    ``load_average_1min``) fill the gaps of ``machine`` under the names :func:`machine_info` uses.
    """
    path = Path(path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    if raw.get("schema") == SCHEMA:
        return Result(path, raw["benchmark"], raw.get("command"), raw["machine"], raw["params"], raw["results"], SCHEMA)
    machine = dict(raw.get("machine") or {})
    for old, new in _LEGACY_MACHINE.items():
        missing = new not in machine if new == "native_bf16" else not machine.get(new)  # False is a value there
        if old in raw and missing:
            machine[new] = raw[old]
    if not machine.get("load_average_start"):
        start, one = raw.get("loadavg_at_start"), raw.get("load_average_1min")
        if isinstance(start, list) and start:
            machine["load_average_start"] = start
        elif one is not None:
            machine["load_average_start"] = [one]
    own = ("schema", "benchmark", "command", "machine", "config")
    results = {k: v for k, v in raw.items() if k not in own}
    params = raw.get("config") or {}
    return Result(path, raw.get("benchmark") or path.stem, raw.get("command"), machine, params, results)

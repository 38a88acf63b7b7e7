"""What every benchmark records about where it ran: package versions and the git commit (imported by the scripts
in this folder, which run as ``python benchmarks/NAME.py`` and so find this module beside them)."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_OUTPUTS = ("benchmarks/results/", "README.md")
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def package_versions(packages: Iterable[str]) -> dict[str, str | None]:
    """Installed version of each package (None when it is not installed).

    Args:
        packages: distribution names.

    Returns:
        Name -> version.
    """
    versions: dict[str, str | None] = {}
    for pkg in packages:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return versions


def git_state(cwd: Path = ROOT) -> tuple[str | None, bool | None]:
    """The checked-out commit and whether the tree has local changes (None, None outside a git checkout).

    Args:
        cwd: a folder inside the repository.

    Returns:
        (commit sha or None, dirty or None); dirty ignores the benchmark outputs (results, README tables).
    """
    commit, dirty = None, None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=cwd)
        if out.returncode == 0:
            commit = out.stdout.strip()
            st = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=10, cwd=cwd)
            # What `make bench` itself writes (results and the README's tables) is not a change to the code measured.
            changed = [ln[3:] for ln in st.stdout.splitlines() if ln.strip()]
            code = [p for p in changed if not p.startswith(BENCH_OUTPUTS)]
            dirty = bool(code) if st.returncode == 0 else None
    return commit, dirty


def machine_info(packages: Iterable[str], extra_versions: dict[str, str] | None = None) -> dict[str, Any]:
    """CPU model, cores, bf16/AMX flags, memory, package versions, date and git commit of this run.

    Every benchmark's JSON carries this block, so all of them say the same things about where they ran.

    Args:
        packages: distribution names whose versions decide the benchmark's numbers.
        extra_versions: versions not known to pip metadata (e.g. OpenCV's build).

    Returns:
        A JSON-ready dict.
    """
    cpuinfo = ""
    with contextlib.suppress(OSError):
        cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), None)
    flags = set(next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines() if ln.startswith("flags")), []))
    mem_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError, StopIteration):
        line = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
        mem_gb = round(int(line.split()[1]) / 1024**2, 1)
    versions: dict[str, str | None] = {
        "python": platform.python_version(),
        **package_versions(packages),
        **(extra_versions or {}),
    }
    commit, dirty = git_state()
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_model": model or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_flags": {f: f in flags for f in CPU_FLAGS},
        "native_bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
        "memory_gb": mem_gb,
        "platform": platform.platform(),
        "packages": versions,
        "git_commit": commit,
        "git_dirty": dirty,
        "nice": os.nice(0),
        "thread_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
        # The machine may be shared: the load average says how busy it was (N cores fully busy = load N).
        "load_average_start": list(os.getloadavg()),
    }

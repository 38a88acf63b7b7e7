"""What every benchmark records about where it ran: package versions and the git commit (imported by the scripts
in this folder, which run as ``python benchmarks/NAME.py`` and so find this module beside them)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import subprocess
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
        (commit sha or None, dirty or None).
    """
    commit, dirty = None, None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=cwd)
        if out.returncode == 0:
            commit = out.stdout.strip()
            st = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=10, cwd=cwd)
            dirty = bool(st.stdout.strip()) if st.returncode == 0 else None
    return commit, dirty

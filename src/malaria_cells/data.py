"""Finding the cell images: folders or the official zip archive, class labels and patient ids.

A data source is a folder holding ``Parasitized/`` and ``Uninfected/`` (any letter case, possibly one level
down as in the NIH archive's ``cell_images/``), or the archive ``cell_images.zip`` itself. Images inside a
zip are addressed as ``ARCHIVE.zip::MEMBER`` (read with :func:`read_bytes`, which lives in :mod:`malaria_cells.io`
so that decoding, below this module, can read such paths too).
"""

from __future__ import annotations

import hashlib
import os
import re
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from malaria_cells.errors import EXIT_DATA, MalariaCellsError
from malaria_cells.io import ZIP_SEP, read_bytes  # re-exported: data.read_bytes is the public name too

CLASSES = ("Uninfected", "Parasitized")  # index = label; Parasitized = 1 is the positive class
POSITIVE = 1
IMAGE_EXTS = (".png", ".webp", ".jpg", ".jpeg")
DATA_ENV = "MALARIA_CELLS_DATA"

# The patient is the number after the leading C of the slide prefix (the share's README): C100P61ThinF,
# C12NThinF, C1_thinF, C3thin_original, C37BP2_thinF, C47P8thin_Original_Motic. The number must be followed by
# a letter or underscore so "C12" is never read out of "C123".
_PATIENT_RE = re.compile(r"^C(\d+)(?=[A-Za-z_])")
_PREFIX_RE = re.compile(r"^(.*?)_IMG_", re.IGNORECASE)


class DataError(MalariaCellsError, RuntimeError):
    """The data cannot be found or used; the message says what to do."""

    code = "data_unavailable"
    exit_code = EXIT_DATA


@dataclass(frozen=True)
class CellImage:
    """One labelled cell image."""

    path: str  # file path, or ARCHIVE.zip::MEMBER
    rel: str  # path relative to the data root, with "/" (what split.csv stores)
    label: int  # 0 Uninfected, 1 Parasitized
    patient: str  # e.g. "C100"
    size_bytes: int


@dataclass
class Scan:
    """What a scan of a data source found."""

    root: str
    images: list[CellImage]
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) for files that were skipped

    @property
    def manifest_hash(self) -> str:
        """sha256 over (relative path, label, patient, size) of every image: identifies the data a run saw."""
        h = hashlib.sha256()
        for im in sorted(self.images, key=lambda i: i.rel):
            h.update(f"{im.rel}\t{im.label}\t{im.patient}\t{im.size_bytes}\n".encode())
        return h.hexdigest()


def parse_patient_id(name: str) -> str | None:
    """Return the patient id (``"C100"``) of an NIH cell image file name, or ``None`` when it does not parse.

    Args:
        name: a file name such as ``C100P61ThinF_IMG_20150918_144104_cell_162.png``.

    Returns:
        ``"C<number>"`` without leading zeros, or ``None``.
    """
    m = _PATIENT_RE.match(Path(name).name)
    return f"C{int(m.group(1))}" if m else None


def slide_prefix(name: str) -> str | None:
    """Return the slide prefix (the part before ``_IMG_``) of a file name, or ``None``."""
    m = _PREFIX_RE.match(Path(name).name)
    return m.group(1) if m else None


def resolve_data_dir(data: str | Path | None) -> Path:
    """Find the data: ``--data``, else ``$MALARIA_CELLS_DATA``, else ``./data/cell_images``, else the share.

    Args:
        data: what the user passed, or ``None``.

    Returns:
        The folder or zip archive to read.

    Raises:
        DataError: nothing found; the message says how to get the data.
    """
    candidates: list[tuple[str, Path]] = []
    if data is not None:
        candidates.append(("--data", Path(data)))
    elif os.environ.get(DATA_ENV):
        candidates.append((f"${DATA_ENV}", Path(os.environ[DATA_ENV])))
    else:
        candidates += [
            ("default", Path("data/cell_images")),
            ("default", Path("data/cell_images.zip")),
            ("shared", Path("../shared/nih-cell-images")),
        ]
    for _, path in candidates:
        if path.exists():
            return path
    if data is not None or os.environ.get(DATA_ENV):
        where, path = candidates[0]
        raise DataError(f"{where} points to {path}, which does not exist")
    raise DataError(
        "No cell images found. Looked for --data, $MALARIA_CELLS_DATA, ./data/cell_images and "
        "../shared/nih-cell-images. Get the NIH data with `malaria-cells data fetch --to data` "
        "(353 MB) or pass --data DIR (a folder with Parasitized/ and Uninfected/, or cell_images.zip)."
    )


def _label_of_dir(name: str) -> int | None:
    low = name.lower()
    return CLASSES.index(next(c for c in CLASSES if c.lower() == low)) if low in ("parasitized", "uninfected") else None


def scan(source: str | Path) -> Scan:
    """List the labelled images of a folder or a zip archive.

    Files that are not images (by extension) or whose names have no patient id are reported in
    ``Scan.problems`` and skipped; nothing is guessed. Decoding is not attempted here (see ``check``).

    Args:
        source: folder (with class folders at any depth) or ``.zip`` archive.

    Returns:
        The scan, images sorted by relative path.

    Raises:
        DataError: no class folders found.
    """
    source = Path(source)
    if source.is_file() and zipfile.is_zipfile(source):
        entries = _zip_entries(str(source))
        root = str(source)
    elif source.is_dir():
        entries = _dir_entries(source)
        root = str(source)
    else:
        raise DataError(f"{source}: not a folder or a zip archive")
    images, problems = [], []
    for path, rel, class_dir, size in entries:
        label = _label_of_dir(class_dir)
        if label is None:
            continue
        name = rel.rsplit("/", 1)[-1]
        if name.startswith(".") or "__MACOSX" in rel:
            continue
        if not name.lower().endswith(IMAGE_EXTS):
            problems.append((path, f"not an image file (extension {Path(name).suffix or 'none'})"))
            continue
        patient = parse_patient_id(name)
        if patient is None:
            problems.append((path, "file name has no patient id (expected it to start with C<number>)"))
            continue
        images.append(CellImage(path=path, rel=rel, label=label, patient=patient, size_bytes=size))
    if not images and not problems:
        raise DataError(f"{source}: no Parasitized/ or Uninfected/ folder with images found")
    images.sort(key=lambda i: i.rel)
    return Scan(root=root, images=images, problems=problems)


def _dir_entries(root: Path) -> list[tuple[str, str, str, int]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        parent = os.path.basename(dirpath)
        if _label_of_dir(parent) is None:
            continue
        for fn in sorted(filenames):
            full = os.path.join(dirpath, fn)
            try:
                size = os.stat(full).st_size
            except OSError:
                size = -1
            out.append((full, os.path.relpath(full, root).replace(os.sep, "/"), parent, size))
    return out


def _zip_entries(archive: str) -> list[tuple[str, str, str, int]]:
    out = []
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            parts = info.filename.split("/")
            if len(parts) < 2:
                continue
            out.append((f"{archive}{ZIP_SEP}{info.filename}", info.filename, parts[-2], info.file_size))
    return out


def summarize(images: list[CellImage]) -> dict:
    """Counts per class and per patient.

    Args:
        images: the images.

    Returns:
        ``{"classes": {name: n}, "patients": {patient: {"Uninfected": n, "Parasitized": n}}, ...}``.
    """
    per_patient: dict[str, Counter] = defaultdict(Counter)
    for im in images:
        per_patient[im.patient][CLASSES[im.label]] += 1
    classes = Counter(CLASSES[im.label] for im in images)
    infected = sorted((p for p, c in per_patient.items() if c["Parasitized"]), key=patient_sort_key)
    return {
        "images": len(images),
        "classes": {c: classes.get(c, 0) for c in CLASSES},
        "patients": {
            p: {c: per_patient[p].get(c, 0) for c in CLASSES} for p in sorted(per_patient, key=patient_sort_key)
        },
        "n_patients": len(per_patient),
        "n_infected_patients": len(infected),
        "n_uninfected_only_patients": len(per_patient) - len(infected),
    }


def patient_sort_key(patient: str) -> tuple[int, str]:
    """Sort C2 before C10."""
    digits = patient[1:]
    return (int(digits), patient) if digits.isdigit() else (1 << 30, patient)


@dataclass
class CheckReport:
    """What ``data check`` found."""

    summary: dict
    problems: list[tuple[str, str]]  # (path, reason): skipped files, unreadable or unusable images
    duplicates: list[list[str]]  # groups of paths with identical bytes (sha256)
    width_range: tuple[int, int]
    height_range: tuple[int, int]
    ok: int


def _check_chunk(paths: list[str]) -> list[tuple[str, int, int, str, str | None]]:
    from malaria_cells.preprocess import ImageError, decode_image

    out = []
    for p in paths:
        try:
            data = read_bytes(p)
        except OSError as e:
            out.append((p, 0, 0, "", f"cannot read ({e})"))
            continue
        digest = hashlib.sha256(data).hexdigest()
        try:
            img = decode_image(data, name=p)
            out.append((p, img.width, img.height, digest, None))
        except ImageError as e:
            out.append((p, 0, 0, digest, str(e).removeprefix(f"{p}: ")))
    return out


def check(source: str | Path, *, n_workers: int | None = None) -> CheckReport:
    """Decode every image of a data source and report what is wrong, without stopping at the first problem.

    Args:
        source: folder or zip archive.
        n_workers: decoding processes (default: the cores this process may use).

    Returns:
        Counts per class and patient, size ranges, problems (path + reason) and duplicate groups.
    """
    from malaria_cells.progress import parallel_map

    found = scan(source)
    problems = list(found.problems)
    by_path = {im.path: im for im in found.images}
    by_hash: dict[str, list[str]] = defaultdict(list)
    widths, heights, good = [], [], []
    paths = [im.path for im in found.images]
    for _, rows in parallel_map(
        _check_chunk, paths, description=f"checking {len(paths):,} images", n_workers=n_workers
    ):
        for p, w, h, digest, err in rows:
            if digest:
                by_hash[digest].append(p)
            if err:
                problems.append((p, err))
            else:
                widths.append(w)
                heights.append(h)
                good.append(by_path[p])
    dups = sorted(sorted(g) for g in by_hash.values() if len(g) > 1)
    good.sort(key=lambda i: i.rel)
    return CheckReport(
        summary=summarize(good),
        problems=sorted(problems),
        duplicates=dups,
        width_range=(min(widths), max(widths)) if widths else (0, 0),
        height_range=(min(heights), max(heights)) if heights else (0, 0),
        ok=len(good),
    )

"""Finding the cell images: folders or the official zip archive, class labels and patient ids.

A data source is a folder holding ``Parasitized/`` and ``Uninfected/`` (any letter case, possibly one level
down as in the NIH archive's ``cell_images/``), or the archive ``cell_images.zip`` itself. Images inside a
zip are addressed as ``ARCHIVE.zip::MEMBER`` (read with :func:`read_bytes`, which lives in :mod:`malaria_cells.io`
so that decoding, below this module, can read such paths too).
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import zipfile
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from malaria_cells.errors import EXIT_DATA, ConfigError, MalariaCellsError
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

    def require_images(self, *, hint: str = "") -> None:
        """Raise a :class:`DataError` that says why when every file was skipped.

        Args:
            hint: what to do when the files have no patient id (the caller knows its own options).

        Raises:
            DataError: no usable image, with the main reason and an example file name.
        """
        if self.images:
            return
        if not self.problems:
            raise DataError(f"{self.root}: no images in its Parasitized/ and Uninfected/ folders", code="no_images")
        reasons = Counter(r for _, r in self.problems)
        reason, n = reasons.most_common(1)[0]
        examples = ", ".join([Path(p.rsplit("::", 1)[-1]).name for p, r in self.problems if r == reason][:2])
        if reason == NIH_ID_MISSING:
            why = f"no patient id in file names like {examples}" + (f": {hint}" if hint else "")
        else:
            why = f"{reason} (e.g. {examples})"
        others = f"; {len(self.problems) - n} skipped for other reasons" if n < len(self.problems) else ""
        raise DataError(
            f"{self.root}: no usable images: all {len(self.problems):,} files skipped, {n:,} because {why}{others}",
            code="no_usable_images",
        )

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


NIH_ID_MISSING = "file name has no patient id (expected it to start with C<number>)"
SHOWN_SKIPPED = 5  # skipped files named in a summary line; the rest are counted


@dataclass(frozen=True, eq=False)
class PatientIds:
    """Where each image's patient id comes from: NIH file names, a CSV, a regex on file names, or none.

    With ``kind="none"`` every file is its own group (its relative path is its id): the patient bootstrap then
    resamples cells, which ignores that cells of one patient look alike. Build one with :meth:`nih`,
    :meth:`from_csv`, :meth:`from_regex` or :meth:`none`.
    """

    kind: str  # "nih" | "csv" | "regex" | "none"
    source: str = ""  # the CSV path or the regex, for messages
    by_path: Mapping[str, str] = field(default_factory=dict)  # csv: path relative to the data folder -> patient
    by_name: Mapping[str, str | None] = field(default_factory=dict)  # csv: basename -> patient (None: ambiguous)
    pattern: re.Pattern[str] | None = None

    @classmethod
    def nih(cls) -> PatientIds:
        """The NIH file-name rule (:func:`parse_patient_id`)."""
        return cls("nih")

    @classmethod
    def none(cls) -> PatientIds:
        """No patient ids: every file is its own group."""
        return cls("none")

    @classmethod
    def from_regex(cls, regex: str) -> PatientIds:
        """Patient id = the first group of ``regex`` searched in each file name.

        Args:
            regex: a Python regular expression with at least one group, e.g. ``'^(P\\d+)_'``.

        Returns:
            The rule.

        Raises:
            ConfigError: not a valid regex, or one without a group.
        """
        try:
            pattern = re.compile(regex)
        except re.error as e:
            raise ConfigError(
                f"patient regex {regex!r} is not a valid regex ({e})", code="patient_regex_invalid"
            ) from None
        if pattern.groups < 1:
            raise ConfigError(
                f"patient regex {regex!r} has no group: put the patient id in parentheses, e.g. '^(P\\d+)_'",
                code="patient_regex_invalid",
            )
        return cls("regex", source=regex, pattern=pattern)

    @classmethod
    def from_csv(cls, path: str | Path) -> PatientIds:
        """Patient ids from a CSV with columns ``file,patient``.

        ``file`` is a path relative to the data folder (``Parasitized/cell_001.png``) or a bare file name, which
        matches that name in any folder (a bare name listed with two patients matches none: never guessed).

        Args:
            path: the CSV file.

        Returns:
            The rule.

        Raises:
            DataError: unreadable, no ``file`` and ``patient`` columns, or a file listed with two patients.
        """
        path = Path(path)
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                rows = list(csv.DictReader(f))
                header = [h.strip().lower() for h in (rows[0].keys() if rows else [])]
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise DataError(f"{path}: cannot read the patients file ({e})", code="patients_file_invalid") from None
        if not rows or not {"file", "patient"} <= set(header):
            raise DataError(
                f"{path}: a patients file needs a header with columns file,patient and one row per image",
                code="patients_file_invalid",
            )
        by_path: dict[str, str] = {}
        by_name: dict[str, str | None] = {}
        for n, raw in enumerate(rows, start=2):
            row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()}
            file, patient = _norm_rel(row["file"]), row["patient"]
            if not file or not patient:
                raise DataError(f"{path}:{n}: empty file or patient", code="patients_file_invalid")
            if by_path.get(file, patient) != patient:
                raise DataError(
                    f"{path}:{n}: {file} is listed with patients {by_path[file]} and {patient}",
                    code="patients_file_invalid",
                )
            if "/" in file:
                by_path[file] = patient
            else:  # a bare file name: matches that name in any folder, unless two rows give it two patients
                by_name[file] = patient if by_name.get(file, patient) == patient else None
        return cls("csv", source=str(path), by_path=by_path, by_name=by_name)

    def patient(self, rel: str) -> str | None:
        """The patient id of one image, or ``None`` when this rule finds none (the file is then skipped).

        Args:
            rel: the image's path relative to the data root, with "/" (``Parasitized/cell_001.png``).

        Returns:
            The id, or ``None``.
        """
        name = rel.rsplit("/", 1)[-1]
        if self.kind == "nih":
            return parse_patient_id(name)
        if self.kind == "none":
            return rel
        if self.kind == "csv":
            return self.by_path.get(rel) or self.by_name.get(name)
        m = self.pattern.search(name) if self.pattern is not None else None
        return (m.group(1) or None) if m else None

    @property
    def missing_reason(self) -> str:
        """Why a file without a patient id is skipped (the reason in :attr:`Scan.problems`)."""
        if self.kind == "csv":
            return f"not listed in the patients file {self.source}"
        if self.kind == "regex":
            return f"file name does not match the patient regex {self.source!r}"
        return NIH_ID_MISSING

    def describe(self) -> str:
        """The rule in words (for reports)."""
        return {
            "nih": "NIH file names (the number after the leading C)",
            "csv": f"patients file {self.source}",
            "regex": f"first group of the regex {self.source!r} in each file name",
            "none": "none: every file is its own group",
        }[self.kind]


def _norm_rel(path: str) -> str:
    rel = path.replace("\\", "/").strip()
    while rel.startswith("./"):
        rel = rel[2:]
    return rel


def skipped_summary(problems: list[tuple[str, str]], *, total: int | None = None) -> str | None:
    """One line counting and naming skipped files, grouped by reason (the first few names of each, then a count).

    Args:
        problems: (path, reason) of each skipped file.
        total: files found in all, for "N of M"; None leaves it out.

    Returns:
        The line, or ``None`` when nothing was skipped.
    """
    if not problems:
        return None
    by_reason: dict[str, list[str]] = defaultdict(list)
    for path, reason in problems:
        name = path.replace("\\", "/").rsplit("/", 1)[-1].rsplit("::", 1)[-1]
        by_reason[reason.removeprefix(f"{path}: ")].append(name)
    parts = []
    for reason, names in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        more = f" and {len(names) - SHOWN_SKIPPED} more" if len(names) > SHOWN_SKIPPED else ""
        parts.append(f"{reason} ({len(names)}: {', '.join(names[:SHOWN_SKIPPED])}{more})")
    of = f" of {total:,}" if total is not None else ""
    return f"skipped {len(problems):,}{of} file(s): " + "; ".join(parts)


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


def scan(source: str | Path, *, patients: PatientIds | None = None) -> Scan:
    """List the labelled images of a folder or a zip archive.

    Files that are not images (by extension) or that have no patient id are reported in ``Scan.problems`` and
    skipped; nothing is guessed. Decoding is not attempted here (see ``check``).

    Args:
        source: folder (with class folders at any depth) or ``.zip`` archive.
        patients: where patient ids come from (default: NIH file names).

    Returns:
        The scan, images sorted by relative path.

    Raises:
        DataError: no class folders found.
    """
    rule = patients or PatientIds.nih()
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
        patient = rule.patient(rel)
        if patient is None:
            problems.append((path, rule.missing_reason))
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

"""Patient-disjoint, class-stratified train/val/test splits, saved as ``split.csv`` and checked on every load.

Infected patients (cells in both folders) and uninfected-only patients are spread over the splits
separately, so each split gets its share of both kinds. Within each kind, patients are shuffled by the seed
and dealt out until each split holds its fraction of that kind's images. A by-image split exists only for
the leakage audit: its kind is ``image-leaky`` and it says so wherever it appears.
"""

from __future__ import annotations

import csv
import io
import random
from collections import Counter, defaultdict
from dataclasses import dataclass

from malaria_cells.data import CellImage, patient_sort_key
from malaria_cells.errors import ConfigError, MalariaCellsError
from malaria_cells.io import atomic_write_text

SPLITS = ("train", "val", "test")
PATIENT = "patient"
LEAKY = "image-leaky"


class LeakageError(MalariaCellsError, RuntimeError):
    """A patient's cells sit in more than one split of a split that claims to be by patient."""

    code = "split_leaks"
    status = 422


@dataclass(frozen=True)
class Split:
    """Which split each image belongs to."""

    kind: str  # "patient" or "image-leaky"
    assignment: dict[str, str]  # image rel path -> "train" | "val" | "test"
    seed: int

    def indices(self, images: list[CellImage], which: str) -> list[int]:
        """Positions in ``images`` of the images in split ``which`` (images not in the split are ignored)."""
        return [i for i, im in enumerate(images) if self.assignment.get(im.rel) == which]

    def patients(self, images: list[CellImage], which: str) -> list[str]:
        """Sorted patient ids of split ``which``."""
        return sorted({images[i].patient for i in self.indices(images, which)}, key=patient_sort_key)


def make_split(
    images: list[CellImage],
    *,
    kind: str = PATIENT,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> Split:
    """Split images into train/val/test, by patient (default) or by image (leaky, for the audit only).

    Args:
        images: the labelled images.
        kind: ``"patient"`` or ``"image-leaky"``.
        val_fraction: share of images for validation (0-0.5), reached by whole patients.
        test_fraction: share of images for test (0-0.5), reached by whole patients.
        seed: shuffling seed; the same images and seed give the same split.

    Returns:
        The split, already checked for leakage.

    Raises:
        ConfigError: a fraction out of range or an unknown kind (a ``ValueError`` too).
    """
    if not (0 <= val_fraction < 0.5 and 0 <= test_fraction < 0.5):
        raise ConfigError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be in [0, 0.5)")
    rng = random.Random(seed)
    assignment: dict[str, str] = {}
    if kind == LEAKY:
        by_class: dict[int, list[CellImage]] = defaultdict(list)
        for im in images:
            by_class[im.label].append(im)
        for group in by_class.values():
            _deal(rng, [(im.rel, 1, [im.rel]) for im in group], val_fraction, test_fraction, assignment)
    elif kind == PATIENT:
        cells: dict[str, list[str]] = defaultdict(list)
        infected: set[str] = set()
        for im in images:
            cells[im.patient].append(im.rel)
            if im.label == 1:
                infected.add(im.patient)
        patients = sorted(cells, key=patient_sort_key)
        for group in ([p for p in patients if p in infected], [p for p in patients if p not in infected]):
            _deal(rng, [(p, len(cells[p]), cells[p]) for p in group], val_fraction, test_fraction, assignment)
    else:
        raise ConfigError(f"unknown split kind {kind!r}; use 'patient' or '{LEAKY}'")
    split = Split(kind=kind, assignment=assignment, seed=seed)
    check_split(split, images)
    return split


def cv_folds(images: list[CellImage], *, folds: int, seed: int = 0) -> dict[str, int]:
    """Deal patients into ``folds`` test folds, stratified by kind and balanced by cells.

    Infected patients and uninfected-only patients are dealt separately (as in :func:`make_split`), each in a seeded
    shuffle, every patient to the fold that holds the fewest cells of that kind so far: every fold gets its share
    of both kinds and about ``1/folds`` of the cells, and every patient lands in exactly one fold.

    Args:
        images: the labelled images.
        folds: number of folds K (2-20).
        seed: shuffling seed; the same images and seed give the same folds.

    Returns:
        Patient id -> fold number (0 .. K-1).

    Raises:
        ConfigError: K out of range, or fewer patients than folds.
    """
    cells: dict[str, int] = Counter(im.patient for im in images)
    infected = {im.patient for im in images if im.label == 1}
    if not 2 <= folds <= 20:
        raise ConfigError(f"cv folds {folds} must be in [2, 20]")
    if len(cells) < folds:
        raise ConfigError(f"{len(cells)} patient(s) cannot fill {folds} folds")
    rng = random.Random(seed)
    fold_of: dict[str, int] = {}
    for group in (
        [p for p in sorted(cells, key=patient_sort_key) if p in infected],
        [p for p in sorted(cells, key=patient_sort_key) if p not in infected],
    ):
        rng.shuffle(group)
        load = [0] * folds
        # Largest patients first, each to the lightest fold: folds end up within one patient's cells of each other.
        for p in sorted(group, key=lambda q: -cells[q]):
            k = min(range(folds), key=lambda i: (load[i], i))
            fold_of[p] = k
            load[k] += cells[p]
    return fold_of


def make_cv_split(
    images: list[CellImage], *, folds: int, fold: int, val_fraction: float = 0.15, seed: int = 0
) -> Split:
    """The split of one cross-validation fold: test = that fold's patients, val drawn from the others.

    Args:
        images: the labelled images.
        folds: number of folds K.
        fold: the test fold (0-based).
        val_fraction: share of all images for validation, by whole patients of the training folds (stratified).
        seed: fold and validation seed (the folds depend on ``seed`` only, so every fold of one K and seed
            partitions the patients).

    Returns:
        A by-patient split with kind ``patient``.
    """
    if not 0 <= fold < folds:
        raise ConfigError(f"cv fold {fold} must be in [0, {folds})")
    fold_of = cv_folds(images, folds=folds, seed=seed)
    assignment = {im.rel: "test" for im in images if fold_of[im.patient] == fold}
    rest = [im for im in images if fold_of[im.patient] != fold]
    # val_fraction of all images, drawn from the training folds' patients by the same stratified deal as make_split.
    share = min(0.49, val_fraction * len(images) / max(1, len(rest)))
    inner = make_split(rest, val_fraction=share, test_fraction=0.0, seed=seed + 1000 * (fold + 1))
    assignment.update(inner.assignment)
    split = Split(kind=PATIENT, assignment=assignment, seed=seed)
    check_split(split, images)
    return split


def _deal(rng: random.Random, units: list[tuple[str, int, list[str]]], val: float, test: float, out: dict) -> None:
    """Shuffle units (patients or single images) and fill test, then val, to their share of images."""
    rng.shuffle(units)
    total = sum(n for _, n, _ in units)
    targets = [("test", test * total), ("val", val * total)]
    filled = Counter()
    k = 0
    for name, target in targets:
        # Take a unit while that brings the split closer to its target than stopping would.
        while k < len(units) and abs(filled[name] + units[k][1] - target) < abs(filled[name] - target):
            for rel in units[k][2]:
                out[rel] = name
            filled[name] += units[k][1]
            k += 1
    for _, _, rels in units[k:]:
        for rel in rels:
            out[rel] = "train"


def check_split(split: Split, images: list[CellImage]) -> None:
    """Raise :class:`LeakageError` if a patient crosses splits (for a by-patient split).

    Args:
        split: the split.
        images: the images it covers.
    """
    if split.kind == LEAKY:
        return
    where: dict[str, set[str]] = defaultdict(set)
    for im in images:
        s = split.assignment.get(im.rel)
        if s is not None:
            where[im.patient].add(s)
    crossing = {p: sorted(s) for p, s in where.items() if len(s) > 1}
    if crossing:
        examples = ", ".join(f"{p} in {'+'.join(s)}" for p, s in sorted(crossing.items())[:5])
        raise LeakageError(f"{len(crossing)} patient(s) cross splits ({examples}); the split is not patient-disjoint")


def split_to_csv(split: Split, images: list[CellImage]) -> str:
    """Render a split as CSV text: rel, label, patient, split, kind."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rel", "label", "patient", "split", "kind"])
    for im in images:
        if im.rel in split.assignment:
            w.writerow([im.rel, im.label, im.patient, split.assignment[im.rel], split.kind])
    return buf.getvalue()


def save_split(split: Split, images: list[CellImage], path) -> None:
    """Write ``split.csv`` atomically (after re-checking leakage).

    Args:
        split: the split.
        images: the images it covers.
        path: destination.
    """
    check_split(split, images)
    atomic_write_text(path, split_to_csv(split, images))


def load_split(path, images: list[CellImage] | None = None) -> Split:
    """Read ``split.csv`` and check that no patient crosses splits.

    Args:
        path: the CSV file.
        images: when given, leakage is checked on these images' patient ids too (ids re-parsed from names).

    Returns:
        The split.

    Raises:
        LeakageError: a by-patient split whose file puts one patient in two splits.
    """
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    kinds = {r["kind"] for r in rows}
    if len(kinds) > 1:
        raise ValueError(f"{path}: mixed split kinds {sorted(kinds)}")
    kind = kinds.pop() if kinds else PATIENT
    split = Split(kind=kind, assignment={r["rel"]: r["split"] for r in rows}, seed=-1)
    if kind != LEAKY:
        where: dict[str, set[str]] = defaultdict(set)
        for r in rows:
            where[r["patient"]].add(r["split"])
        crossing = sorted(p for p, s in where.items() if len(s) > 1)
        if crossing:
            raise LeakageError(f"{path}: patient(s) {', '.join(crossing[:5])} cross splits")
    if images is not None:
        check_split(split, images)
    return split


def describe(split: Split, images: list[CellImage]) -> list[dict]:
    """Per split: images, Parasitized, Uninfected, patients, infected patients (for tables)."""
    rows = []
    for which in SPLITS:
        idx = split.indices(images, which)
        labels = Counter(images[i].label for i in idx)
        pats = {images[i].patient for i in idx}
        inf = {images[i].patient for i in idx if images[i].label == 1}
        rows.append(
            {
                "split": which,
                "images": len(idx),
                "parasitized": labels[1],
                "uninfected": labels[0],
                "patients": len(pats),
                "infected_patients": len(inf),
                "uninfected_only_patients": len(pats - inf),
            }
        )
    return rows

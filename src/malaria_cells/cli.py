"""The ``malaria-cells`` command line: a thin layer over the library. The only module that parses arguments."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Train, evaluate and deploy malaria cell classifiers (Parasitized vs Uninfected) with patient-disjoint "
    "splits. Research and education use only; not for diagnosis.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Inspect, split and download the cell images.", no_args_is_help=True)
app.add_typer(data_app, name="data")

DataOpt = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="Folder with Parasitized/ and Uninfected/, or cell_images.zip. Default: $MALARIA_CELLS_DATA, "
        "./data/cell_images, ../shared/nih-cell-images.",
    ),
]


def _fail(msg: str) -> None:
    from malaria_cells.progress import console

    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(2)


def _data(path: Path | None) -> Path:
    from malaria_cells.data import DataError, resolve_data_dir

    try:
        return resolve_data_dir(path)
    except DataError as e:
        _fail(str(e))
        raise


@app.command("models")
def models_cmd() -> None:
    """List the models in the registry with their defaults."""
    from rich.table import Table

    from malaria_cells.models import MODELS
    from malaria_cells.progress import console

    t = Table(title="models")
    for col in ("name", "input px", "default strategy", "strategies", "weights", "description"):
        t.add_column(col)
    for name, s in MODELS.items():
        t.add_row(name, str(s.input_size), s.strategy, ", ".join(s.strategies), s.weights, s.description)
    console.print(t)


@data_app.command("check")
def data_check(
    source: Annotated[Path, typer.Argument(help="Folder or zip archive to check.")],
    workers: Annotated[int | None, typer.Option(help="Decoding processes (default: all cores).")] = None,
    per_patient: Annotated[bool, typer.Option(help="Print the per-patient table.")] = False,
) -> None:
    """Decode every image: counts per class and patient, sizes, unreadable files and duplicates.

    Bad files are listed with their path and reason and skipped; the check never stops at the first one.
    Exit code 1 when problems were found.
    """
    from rich.table import Table

    from malaria_cells.data import DataError, check
    from malaria_cells.progress import console

    try:
        report = check(source, n_workers=workers)
    except DataError as e:
        _fail(str(e))
    s = report.summary
    t = Table(title=f"{source}: {report.ok:,} usable images")
    t.add_column("what")
    t.add_column("value", justify="right")
    for c, n in s["classes"].items():
        t.add_row(c, f"{n:,}")
    t.add_row("patients", str(s["n_patients"]))
    t.add_row("  infected (cells in both folders)", str(s["n_infected_patients"]))
    t.add_row("  uninfected only", str(s["n_uninfected_only_patients"]))
    t.add_row("width px (min-max)", f"{report.width_range[0]}-{report.width_range[1]}")
    t.add_row("height px (min-max)", f"{report.height_range[0]}-{report.height_range[1]}")
    t.add_row("problems (skipped)", str(len(report.problems)))
    t.add_row("duplicate groups (same sha256)", str(len(report.duplicates)))
    console.print(t)
    if per_patient:
        pt = Table(title="per patient")
        for col in ("patient", "Uninfected", "Parasitized"):
            pt.add_column(col, justify="right")
        for p, c in s["patients"].items():
            pt.add_row(p, str(c["Uninfected"]), str(c["Parasitized"]))
        console.print(pt)
    for path, reason in report.problems:
        console.print(f"[yellow]problem[/] {path}: {reason}")
    for group in report.duplicates[:20]:
        console.print(f"[yellow]duplicate[/] {' = '.join(group)}")
    if len(report.duplicates) > 20:
        console.print(f"... {len(report.duplicates) - 20} more duplicate groups")
    raise typer.Exit(1 if report.problems else 0)


@data_app.command("split")
def data_split(
    out: Annotated[Path, typer.Option(help="Where to write split.csv.")] = Path("split.csv"),
    data: DataOpt = None,
    val_fraction: Annotated[float, typer.Option(help="Share of images for validation, by whole patients.")] = 0.15,
    test_fraction: Annotated[float, typer.Option(help="Share of images for test, by whole patients.")] = 0.15,
    seed: Annotated[int, typer.Option(help="Shuffling seed.")] = 0,
    by_image: Annotated[
        bool, typer.Option("--by-image-leaky", help="A LEAKY by-image split, for the leakage audit only.")
    ] = False,
) -> None:
    """Make a patient-disjoint, class-stratified train/val/test split and save it as CSV."""
    from rich.table import Table

    from malaria_cells.data import scan
    from malaria_cells.progress import console
    from malaria_cells.split import LEAKY, PATIENT, describe, make_split, save_split

    found = scan(_data(data))
    split = make_split(
        found.images,
        kind=LEAKY if by_image else PATIENT,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
    )
    save_split(split, found.images, out)
    t = Table(title=f"{split.kind} split{' (LEAKY: for the audit only)' if by_image else ''} -> {out}")
    rows = describe(split, found.images)
    for col in rows[0]:
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(*(str(v) for v in r.values()))
    console.print(t)


@data_app.command("fetch")
def data_fetch(
    to: Annotated[Path, typer.Option(help="Folder to download and unpack into.")] = Path("data"),
    url: Annotated[str | None, typer.Option(help="Archive URL (default: NIH's cell_images.zip).")] = None,
    sha256: Annotated[str | None, typer.Option(help="Expected sha256 (default: the NIH archive's).")] = None,
    size: Annotated[int | None, typer.Option(help="Expected size in bytes (default: the NIH archive's).")] = None,
    unpack: Annotated[bool, typer.Option(help="Unpack after download.")] = True,
) -> None:
    """Download the official NIH archive (353 MB) with progress, resume and checksum check, and unpack it."""
    from malaria_cells import fetch
    from malaria_cells.progress import console

    custom = url is not None
    try:
        folder = fetch.fetch_archive(
            to=to,
            url=url or fetch.NIH_URL,
            sha256=sha256 if (sha256 or custom) else fetch.NIH_SHA256,
            expected_bytes=size if (size or custom) else fetch.NIH_BYTES,
            unpack=unpack,
        )
    except fetch.FetchError as e:
        _fail(str(e))
    console.print(f"[green]ready:[/] {folder}  (use --data {folder})")


def _config_overrides(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


@app.command("train")
def train_cmd(
    model: Annotated[str | None, typer.Option(help="Registry name (see `malaria-cells models`).")] = None,
    data: DataOpt = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML file of config fields.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/<model>-<date-time>).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue this run folder from its last epoch.")] = None,
    strategy: Annotated[str | None, typer.Option(help="scratch | frozen | finetune (default: model's).")] = None,
    weights: Annotated[str | None, typer.Option(help="imagenet | FILE | none (default: model's).")] = None,
    init_from: Annotated[str | None, typer.Option(help="Run folder whose best weights start this run.")] = None,
    input_size: Annotated[int | None, typer.Option(help="Input side in px (default: model's).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs (default: model's).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step (default 64).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default: model's).")] = None,
    unfreeze_stages: Annotated[int | None, typer.Option(help="finetune: top stages that train.")] = None,
    patience: Annotated[int | None, typer.Option(help="Early stopping patience in epochs (default 5).")] = None,
    max_images: Annotated[int | None, typer.Option(help="Class-balanced subset size (quick runs).")] = None,
    split: Annotated[str | None, typer.Option(help="patient (default) | image-leaky (audit only).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for split, subset, init and order (default 0).")] = None,
    precision: Annotated[str | None, typer.Option(help="auto | bf16 | fp32 (auto: bf16 where native).")] = None,
    threads: Annotated[int | None, typer.Option(help="Torch threads (default: all cores).")] = None,
    time_budget: Annotated[float | None, typer.Option(help="Stop after this many seconds of training.")] = None,
    augment: Annotated[bool | None, typer.Option("--augment/--no-augment", help="Cell augmentations.")] = None,
) -> None:
    """Train a model on a patient-disjoint split; writes a resumable run folder.

    Config precedence: defaults < --config YAML < flags. The resolved config is saved in the run folder.
    """
    from malaria_cells.config import resolve_config
    from malaria_cells.progress import console
    from malaria_cells.train import train

    if resume is not None:
        run_dir = train(config=None, data_dir=_data(data), run_dir=resume, resume=True)  # type: ignore[arg-type]
    else:
        try:
            cfg = resolve_config(
                yaml_path=config,
                overrides=_config_overrides(
                    model=model,
                    strategy=strategy,
                    weights=weights,
                    init_from=init_from,
                    input_size=input_size,
                    epochs=epochs,
                    batch_size=batch_size,
                    lr=lr,
                    unfreeze_stages=unfreeze_stages,
                    patience=patience,
                    max_images=max_images,
                    split=split,
                    seed=seed,
                    precision=precision,
                    threads=threads,
                    time_budget_s=time_budget,
                    augment=augment,
                ),
            )
        except ValueError as e:
            _fail(str(e))
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = train(config=cfg, data_dir=_data(data), run_dir=out or Path("runs") / f"{cfg.model}-{stamp}")
    console.print(f"[green]run folder:[/] {run_dir}   next: malaria-cells evaluate {run_dir}")


@app.command("evaluate")
def evaluate_cmd(
    run: Annotated[Path, typer.Argument(help="A finished run folder.")],
    data: DataOpt = None,
    split: Annotated[
        str, typer.Option(help="test | val | train (the run's split) | all (every image: other patients' data).")
    ] = "test",
    out: Annotated[Path | None, typer.Option(help="Output folder (default RUN/eval-<split>).")] = None,
    n_boot: Annotated[int, typer.Option(help="Patient-bootstrap resamples for 95% CIs.")] = 1000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
) -> None:
    """Clinical metrics with patient-bootstrap CIs, per-patient table, report.md and PNG plots."""
    from malaria_cells.evaluate import evaluate_run
    from malaria_cells.progress import console

    if not (run / "metadata.json").exists():
        _fail(f"{run}: not a finished run folder (no metadata.json)")
    try:
        evaluate_run(run_dir=run, data_dir=_data(data), split=split, out_dir=out, n_boot=n_boot, seed=seed)
    except ValueError as e:
        _fail(str(e))
    console.print(f"[green]report:[/] {(out or run / f'eval-{split}') / 'report.md'}")


@app.command("reproduce")
def reproduce_cmd(
    data: DataOpt = None,
    out: Annotated[Path | None, typer.Option(help="Output folder.")] = None,
    quick: Annotated[bool, typer.Option(help="Subset and few epochs: minutes instead of an hour.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for split and training.")] = 0,
    n_boot: Annotated[int, typer.Option(help="Patient-bootstrap resamples.")] = 1000,
) -> None:
    """Train and compare the published project's models on one patient-level split; writes results.md."""
    from malaria_cells.reproduce import reproduce

    reproduce(
        data_dir=_data(data),
        out_dir=out or Path("runs") / ("reproduce-quick" if quick else "reproduce"),
        quick=quick,
        seed=seed,
        n_boot=n_boot,
    )


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; a training run can be continued with `malaria-cells train --resume RUN`\n")
        sys.exit(130)


if __name__ == "__main__":
    main()

"""The ``malaria-cells`` command line: a thin layer over the library. The only module that parses arguments.

Every command runs inside :func:`malaria_cells.terminal.cli_session` (the library's log lines and progress become
rich output on stderr) and :func:`_guarded`: a :class:`~malaria_cells.errors.MalariaCellsError` becomes one
``error:`` line and its exit code (the table in :mod:`malaria_cells.errors`); anything else is a crash, with its
traceback.
"""

from __future__ import annotations

import datetime as dt
import functools
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from malaria_cells import __version__


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command with the CLI's rendering, turning the library's errors into one line and an exit code."""

    @functools.wraps(fn)  # typer reads the signature through __wrapped__
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from rich.markup import escape

        from malaria_cells.errors import EXIT_USAGE, MalariaCellsError, train_extra_error
        from malaria_cells.terminal import cli_session, console

        with cli_session():
            try:
                return fn(*args, **kwargs)
            except MalariaCellsError as e:
                # soft_wrap: one line however narrow the terminal, so scripts and logs can grep it.
                console.print(f"[bold red]error:[/] {escape(e.message)}", highlight=False, soft_wrap=True)
                raise typer.Exit(e.exit_code) from None
            except FileExistsError as e:  # e.g. train --out onto an existing run
                console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
                raise typer.Exit(EXIT_USAGE) from None
            except ModuleNotFoundError as e:  # torch & co. on an inference-only install: say which extra, not a trace
                err = train_extra_error(e)
                if err is None:
                    raise
                console.print(f"[bold red]error:[/] {escape(err.message)}", highlight=False, soft_wrap=True)
                raise typer.Exit(err.exit_code) from None

    return wrapper


class _Typer(typer.Typer):
    """typer.Typer whose commands all run through :func:`_guarded`."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        register = super().command(*args, **kwargs)

        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            register(_guarded(fn))
            return fn

        return decorator


def _version(value: bool) -> None:
    if value:
        typer.echo(f"malaria-cells {__version__}")
        raise typer.Exit(0)


app = _Typer(
    help="Train, evaluate and deploy malaria cell classifiers (Parasitized vs Uninfected) with patient-disjoint "
    "splits. Research and education use only; not for diagnosis.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = _Typer(help="Inspect, split and download the cell images.", no_args_is_help=True)


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Train, evaluate and deploy malaria cell classifiers. Research and education use only; not for diagnosis.

    Exit codes: 0 ok; 1 some inputs failed (each has an error row); 2 usage, config or model error; 3 data error;
    4 something needed cannot be had here (pretrained weights); 5 nothing found to count (smear); 130 interrupted.
    """


app.add_typer(data_app, name="data")
detector_app = _Typer(help="Train the red blood cell detector used by `smear`.", no_args_is_help=True)
app.add_typer(detector_app, name="detector")

DataOpt = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="Folder with Parasitized/ and Uninfected/, or cell_images.zip. Default: $MALARIA_CELLS_DATA, "
        "./data/cell_images, ../shared/nih-cell-images.",
    ),
]


def _fail(msg: str) -> None:
    """A usage error found by the CLI itself: one line, exit 2."""
    from rich.markup import escape

    from malaria_cells.errors import EXIT_USAGE
    from malaria_cells.terminal import console

    console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_USAGE)


def _data(path: Path | None) -> Path:
    from malaria_cells.data import resolve_data_dir

    return resolve_data_dir(path)  # DataError: exit 3 with the way to get the data (see _guarded)


@app.command("models")
def models_cmd() -> None:
    """List the models in the registry with their defaults."""
    from malaria_cells.models import MODELS
    from malaria_cells.render import models_table
    from malaria_cells.terminal import console

    console.print(models_table(MODELS))


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

    from malaria_cells.data import check
    from malaria_cells.terminal import console

    report = check(source, n_workers=workers)
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
    """Make a patient-disjoint, class-stratified train/val/test split and save it as CSV (for train --split-file)."""
    from malaria_cells.data import scan
    from malaria_cells.render import split_table
    from malaria_cells.split import LEAKY, PATIENT, describe, make_split, save_split
    from malaria_cells.terminal import console

    found = scan(_data(data))
    found.require_images(hint="a split by patient needs NIH patient ids in the file names (C<number>...)")
    split = make_split(
        found.images,
        kind=LEAKY if by_image else PATIENT,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
    )
    save_split(split, found.images, out)
    title = f"{split.kind} split{' (LEAKY: for the audit only)' if by_image else ''} -> {out}"
    console.print(split_table(describe(split, found.images), title=title))
    console.print(f"next: malaria-cells train --split-file {out}   (trains on exactly these patients)")


@data_app.command("audit")
def data_audit(
    cv_dir: Annotated[Path, typer.Argument(help="Output folder of `reproduce --cv K` (its out-of-fold predictions).")],
    data: DataOpt = None,
    row: Annotated[str | None, typer.Option(help="The CV row whose predictions to audit (default: the best).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: CV_DIR/audit).")] = None,
) -> None:
    """Rank suspect labels from out-of-fold predictions (confident learning); estimate the label-noise rate.

    Writes suspects.csv (ranked), audit.json, audit.md and a contact sheet PNG per given label. Train without the
    suspects with `train --exclude-suspects CV_DIR/audit/suspects.csv`; CV figures stay on the original labels.
    """
    from malaria_cells.audit import audit_labels
    from malaria_cells.cv import read_results
    from malaria_cells.terminal import console

    res = read_results(cv_dir)
    key = row or res["best"]
    match = [r for r in res["rows"] if r["key"] == key]
    if not match:
        _fail(f"row {key!r} is not in {cv_dir}/cv.json (rows: {', '.join(r['key'] for r in res['rows'])})")
    result = audit_labels(
        oof_paths=[Path(p) for p in match[0]["oof"]], data_dir=_data(data), out_dir=out or cv_dir / "audit"
    )
    console.print(
        f"{result.n_suspects:,} suspect labels of {result.n_cells:,} cells; estimated noise rate "
        f"{100 * result.noise_rate:.2f} %  ->  {result.out_dir / 'audit.md'}"
    )


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
    from malaria_cells.terminal import console

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


# Flags whose name differs from their config field (kept for scripts written against earlier versions).
_FLAG_NAMES = {"time_budget_s": "--time-budget"}


def _config_flags() -> list[inspect.Parameter]:
    """One ``--flag`` per :class:`~malaria_cells.config.TrainConfig` field, its help and type from the field.

    The config model is the one home of the defaults and their help: a flag left unset is ``None`` and never
    overrides the YAML file or the default.
    """
    import types
    import typing

    from malaria_cells.config import TrainConfig

    params = []
    for name, field in TrainConfig.model_fields.items():
        base = field.annotation
        if isinstance(base, types.UnionType) or typing.get_origin(base) is typing.Union:
            base = next(a for a in typing.get_args(base) if a is not type(None))
        if typing.get_origin(base) is typing.Literal:
            choices = typing.get_args(base)
            base = str
        else:
            choices = None
        flag = _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        default = "" if field.default is None else f" (default {field.default})"  # not [..]: rich markup
        extra = f" One of: {', '.join(choices)}." if choices and "|" not in (field.description or "") else ""
        decls = (f"{flag}/--no-{name.replace('_', '-')}",) if base is bool else (flag,)
        option = typer.Option(*decls, help=f"{field.description}{extra}{default}", show_default=False)
        params.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[base | None, option]
            )
        )
    return params


def train_cmd(
    *,
    data: Path | None = None,
    config: Path | None = None,
    out: Path | None = None,
    resume: Path | None = None,
    **fields: Any,
) -> None:
    """Train a model on a patient-disjoint split; writes a resumable run folder.

    Config precedence: defaults < --config YAML < flags, validated before anything is read or written. The resolved
    config is saved in the run folder. --split-file trains on the splits of a `data split` CSV. --resume RUN goes on
    with the run's own config.yaml; with --epochs N (more than it has done) a finished run trains on to N epochs.
    """
    from malaria_cells.config import resolve_config
    from malaria_cells.terminal import console

    if resume is not None:
        other = sorted(f"--{k.replace('_', '-')}" for k, v in fields.items() if v is not None and k != "epochs")
        if other or config is not None or out is not None:
            given = other + ["--config"] * (config is not None) + ["--out"] * (out is not None)
            _fail(
                "--resume goes on with the run's own config.yaml; only --epochs (and --data) may be given, not "
                + ", ".join(given)
            )
        epochs = fields.get("epochs")
        if epochs is not None:
            resolve_config(overrides={"epochs": epochs})  # the same range check as a new run's --epochs
        from malaria_cells.train import train

        run_dir = train(config=None, data_dir=_data(data), run_dir=resume, resume=True, epochs=epochs)
    else:
        cfg = resolve_config(yaml_path=config, overrides=fields)  # a bad value stops here: nothing written yet
        from malaria_cells.train import train  # torch: imported after the cheap checks

        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = train(config=cfg, data_dir=_data(data), run_dir=out or Path("runs") / f"{cfg.model}-{stamp}")
    console.print(f"[green]run folder:[/] {run_dir}   next: malaria-cells evaluate {run_dir}")


train_cmd.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [
        inspect.Parameter("data", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=DataOpt),
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[Path | None, typer.Option("--config", "-c", help="YAML file of config fields.")],
        ),
        inspect.Parameter(
            "out",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[Path | None, typer.Option(help="Run folder (default runs/<model>-<date-time>).")],
        ),
        inspect.Parameter(
            "resume",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[Path | None, typer.Option(help="Continue this run folder from its last epoch.")],
        ),
        *_config_flags(),
    ]
)
app.command("train")(train_cmd)


@app.command("evaluate")
def evaluate_cmd(
    run: Annotated[Path, typer.Argument(help="A finished run folder, or an exported .onnx file (then --split all).")],
    data: DataOpt = None,
    split: Annotated[
        str, typer.Option(help="test | val | train (the run's split) | all (every image: other patients' data).")
    ] = "test",
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default RUN/eval-<split>, or MODEL-eval-<split> beside a file).")
    ] = None,
    n_boot: Annotated[int, typer.Option(help="Patient-bootstrap resamples for 95% CIs.")] = 1000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    patients: Annotated[
        Path | None,
        typer.Option(
            "--patients",
            help="CSV with columns file,patient (file: path relative to the data folder, or a file name). "
            "Default: NIH file names (C<number>...).",
        ),
    ] = None,
    patient_regex: Annotated[
        str | None,
        typer.Option(help="Regex searched in each file name; its first group is the patient id, e.g. '^(P\\d+)_'."),
    ] = None,
    no_patient_ids: Annotated[
        bool,
        typer.Option(
            "--no-patient-ids",
            help="No patient ids: every file is its own group (the CIs then ignore patient clustering).",
        ),
    ] = False,
) -> None:
    """Clinical metrics with patient-bootstrap CIs, per-patient table, report.md and PNG plots.

    A run folder is scored on its own test split (or --split val/train/all); an exported ONNX file carries no
    split, so it is scored with --split all on cells of patients it never saw. Any labelled folder works
    (Parasitized/ and Uninfected/, any file names): patient ids come from NIH file names, --patients or
    --patient-regex; files without one are skipped and named. Exit code 2 for an unusable model or run folder
    (the message names the file), 3 when no file of the data can be used.
    """
    from malaria_cells.data import PatientIds
    from malaria_cells.evaluate import default_out_dir, evaluate_run
    from malaria_cells.render import evaluation_table
    from malaria_cells.terminal import console

    if sum((patients is not None, patient_regex is not None, no_patient_ids)) > 1:
        _fail("pass one of --patients, --patient-regex and --no-patient-ids")
    if patients is not None:
        rule = PatientIds.from_csv(patients)
    elif patient_regex is not None:
        rule = PatientIds.from_regex(patient_regex)
    else:
        rule = PatientIds.none() if no_patient_ids else PatientIds.nih()
    out_dir = out or default_out_dir(run, split)
    try:
        result = evaluate_run(
            model=run, data_dir=_data(data), split=split, out_dir=out_dir, n_boot=n_boot, seed=seed, patients=rule
        )
    except ValueError as e:  # an unknown split, or none of its images in this data
        _fail(str(e))
    console.print(evaluation_table(result))
    console.print(f"[green]report:[/] {out_dir / 'report.md'}")


@app.command("reproduce")
def reproduce_cmd(
    data: DataOpt = None,
    out: Annotated[Path | None, typer.Option(help="Output folder.")] = None,
    quick: Annotated[bool, typer.Option(help="Subset and few epochs: minutes instead of an hour.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for split and training.")] = 0,
    n_boot: Annotated[int, typer.Option(help="Patient-bootstrap resamples.")] = 1000,
    strict: Annotated[
        bool, typer.Option(help="Fail (before training) when a row's pretrained weights cannot be had.")
    ] = False,
    weights: Annotated[
        list[str] | None,
        typer.Option(help="MODEL=FILE: local timm-format weights for a model, e.g. resnet50v2=r50.safetensors."),
    ] = None,
    cv: Annotated[
        int | None,
        typer.Option(
            min=2, max=20, help="Patient-level K-fold cross-validation of the candidate models instead (hours)."
        ),
    ] = None,
    rows: Annotated[
        str | None, typer.Option(help="--cv: comma-separated rows (default custom-cnn-48,custom-cnn-48-tta,...).")
    ] = None,
    seeds: Annotated[
        str, typer.Option(help="--cv: comma-separated training seeds; every seed uses the same folds.")
    ] = "0",
    final_fit: Annotated[
        Path | None,
        typer.Option(help="--cv: then train the best row on every patient into this run folder (final fit)."),
    ] = None,
    final_row: Annotated[str | None, typer.Option(help="--final-fit: the row to fit (default: the CV's best).")] = None,
    skip_cv: Annotated[
        bool,
        typer.Option(
            help="--final-fit: fit from the cross-validation already in --out (its cv.json), training nothing else."
        ),
    ] = False,
) -> None:
    """Train and compare the published project's models on one patient-level split; writes results.md.

    With --cv K: patient-level K-fold cross-validation instead (per-fold, mean ± SD, pooled out-of-fold metrics with
    patient-bootstrap CIs, paired differences; cv.md, cv.json, out-of-fold predictions), resumable fold by fold;
    --final-fit then trains the chosen recipe on every patient with the epochs and thresholds the CV chose.

    Also runs the leakage audit (one model on a LEAKY by-image split). Rows whose pretrained weights cannot be
    had are reported as "ImageNet weights unavailable" and the others complete (exit 0 with a warning);
    with --strict that is an error (exit 4) before anything trains.
    """
    if cv is not None:
        from malaria_cells import cv as CV
        from malaria_cells.terminal import console

        keys = tuple(k.strip() for k in rows.split(",") if k.strip()) if rows else CV.DEFAULT_ROWS
        try:
            seed_list = tuple(int(x) for x in seeds.split(",") if x.strip())
        except ValueError:
            _fail(f"--seeds takes comma-separated integers, not {seeds!r}")
        out_dir = out or Path("runs") / f"cv{cv}"
        if skip_cv:
            if final_fit is None:
                _fail("--skip-cv goes with --final-fit RUN")
            CV.read_results(out_dir)  # no CV to take the recipe from: say so before looking for the data
            CV.final_fit(cv_dir=out_dir, data_dir=_data(data), run_dir=final_fit, row_key=final_row)
            console.print(f"final fit (every patient; figures from the CV in {out_dir}): {final_fit}")
            return
        command = (
            f"malaria-cells reproduce --cv {cv} --data {_data(data)} --out {out_dir}"
            + (f" --rows {','.join(keys)}" if rows else "")
            + (f" --seeds {seeds}" if seeds != "0" else "")
        )
        CV.cross_validate(
            data_dir=_data(data),
            out_dir=out_dir,
            folds=cv,
            rows=CV.rows_by_key(keys),
            seeds=seed_list,
            split_seed=seed,
            n_boot=n_boot,
            command=command,
        )
        console.print(f"cross-validation results: {out_dir / 'cv.md'}")
        if final_fit is not None:
            CV.final_fit(cv_dir=out_dir, data_dir=_data(data), run_dir=final_fit, row_key=final_row)
            console.print(f"final fit (every patient; figures from the CV): {final_fit}")
        return
    from malaria_cells.reproduce import reproduce

    sources = {}
    for item in weights or []:
        name, sep, path = item.partition("=")
        if not sep or not path:
            _fail(f"--weights takes MODEL=FILE, not {item!r}")
        sources[name] = path
    reproduce(
        data_dir=_data(data),
        out_dir=out or Path("runs") / ("reproduce-quick" if quick else "reproduce"),
        quick=quick,
        strict=strict,
        seed=seed,
        n_boot=n_boot,
        weights=sources,
    )


StainNormalizeOpt = Annotated[
    bool | None,
    typer.Option(
        "--stain-normalize/--no-stain-normalize",
        help="Move each photo's cells to the NIH training cells' stain before classifying (another lab's photos, a "
        "model trained on NIH cells). Default: the model's choice (on for a model adapted with --stain-normalize).",
    ),
]
OperatingPointOpt = Annotated[
    str | None,
    typer.Option(help="A named threshold stored with the model (adapt stores high_specificity, balanced, ...)."),
]
ThresholdOpt = Annotated[
    float | None, typer.Option(min=0, max=1, help="Decision threshold on P(Parasitized) (default: the model's).")
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="An exported .onnx file or a run folder. Default: $MALARIA_CELLS_MODEL, else the shipped model.",
    ),
]


@app.command("predict")
def predict_cmd(
    paths: Annotated[list[str], typer.Argument(help="Image files, folders (recursive) and globs ('cells/**/*.png').")],
    model: ModelOpt = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table | csv | jsonl | json")] = "table",
    out: Annotated[Path | None, typer.Option(help="Write the results here instead of standard output.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per model call.")] = 64,
    threads: Annotated[
        int | None, typer.Option(help="Inference threads (default: all cores, or those decoding processes leave).")
    ] = None,
    decode_processes: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Processes that decode files while the model runs (default: half the cores from 4 batches of "
            "files up, the model getting the other half; else 0 = decode in this process).",
        ),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(
            help="i/n: classify only the i-th of n contiguous parts of the inputs (1 <= i <= n), e.g. one per "
            "process or machine; the parts' csv/jsonl outputs concatenate, in order, to the unsharded output."
        ),
    ] = None,
    header: Annotated[
        bool, typer.Option(help="Write the CSV header line (--no-header for shards after the first).")
    ] = True,
    operating_point: OperatingPointOpt = None,
    threshold: ThresholdOpt = None,
    segment: Annotated[
        str,
        typer.Option(
            help="auto | on | off: put a loosely cropped cell (background not black) on black first, as the training "
            "cells are (auto: when the border is not black)."
        ),
    ] = "auto",
    raw_labels: Annotated[
        bool,
        typer.Option(
            "--raw-labels",
            help="Keep the model's label for inputs that do not look like a single stained cell on black (they are "
            "labelled Unknown by default; the flag column says why either way).",
        ),
    ] = False,
    tta: Annotated[
        bool,
        typer.Option(
            "--tta",
            help="Test-time augmentation: mean over the 8 rotations/reflections of each cell, at the model's own TTA "
            "threshold (8x slower).",
        ),
    ] = False,
) -> None:
    """Classify cell images; a file that cannot be read gets a row with its error and the rest go on.

    csv, jsonl and json are written as the images are classified (constant memory, any number of images);
    a table is laid out at the end. In folders, symbolic link loops, dangling links and unreadable subfolders get
    error rows too. Exit code 0 when every image was classified, 1 when any failed, 2 on a usage or model error.
    """
    import contextlib
    import itertools
    import shutil

    from malaria_cells.errors import EXIT_OK, EXIT_SOME_INPUTS_FAILED
    from malaria_cells.inputs import iter_inputs, shard_bounds
    from malaria_cells.io import atomic_write
    from malaria_cells.predict import Classifier, decode_plan
    from malaria_cells.progress import task
    from malaria_cells.render import FORMATS, render_predictions
    from malaria_cells.terminal import console

    if fmt not in FORMATS:
        _fail(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    index, count = 0, 1
    if shard is not None:
        try:
            i, n = (int(x) for x in shard.split("/"))
            index, count = i - 1, n
            shard_bounds(0, index=index, count=count)
        except ValueError:
            _fail(f"--shard takes i/n with 1 <= i <= n (e.g. 2/4), not {shard!r}")
    # Walk the inputs twice (names only, cheap) rather than hold the list: the first pass counts for the shard
    # bounds and the progress bar, the second streams the files to the model.
    n_files = sum(1 for _ in iter_inputs(paths))
    start, stop = shard_bounds(n_files, index=index, count=count)
    if n_files == 0:
        _fail("no input files")
    threads, decode_processes = decode_plan(
        stop - start, batch_size=batch_size, threads=threads, decode_processes=decode_processes
    )
    # An unusable model raises ModelError: one line naming the file, exit code 2 (see _guarded).
    if segment not in ("auto", "on", "off"):
        _fail(f"--segment must be auto, on or off, not {segment!r}")
    clf = Classifier.load(
        model,
        threads=threads,
        decode_processes=decode_processes,
        unknown_when_flagged=not raw_labels,
        segment=segment,
        operating_point=operating_point,
        threshold=threshold,
        tta=tta,
    )
    failed = total = 0

    def counted(preds):
        nonlocal failed, total
        for p in preds:
            total += 1
            failed += not p.ok
            yield p

    width = shutil.get_terminal_size((160, 24)).columns if out is None and sys.stdout.isatty() else 160

    def write(fh) -> None:
        files = itertools.islice(iter_inputs(paths), start, stop)
        # A bar only where it is worth watching.
        bar = task(f"classifying {stop - start:,} images", total=stop - start) if stop - start > batch_size else None
        with bar or contextlib.nullcontext():
            advance = bar.advance if bar is not None else None
            preds = clf.iter_predict(files, batch_size=batch_size, progress=advance)
            for piece in render_predictions(counted(preds), fmt=fmt, card=clf.card, width=width, header=header):
                fh.write(piece)

    try:
        if out is not None:

            def to_file(tmp: Path) -> None:
                with open(tmp, "w", encoding="utf-8", newline="") as fh:
                    write(fh)

            atomic_write(out, to_file)  # a killed run leaves no half-written results file
        else:
            write(sys.stdout)
    finally:
        clf.close()
    part = f" (shard {index + 1}/{count}: inputs {start + 1}-{stop} of {n_files:,})" if shard else ""
    summary = f"{total - failed} classified, {failed} failed{part}"
    console.print(f"[{'yellow' if failed else 'green'}]{summary}[/]" + (f" -> {out}" if out else ""))
    raise typer.Exit(EXIT_SOME_INPUTS_FAILED if failed else EXIT_OK)


@app.command("explain")
def explain_cmd(
    images: Annotated[list[str], typer.Argument(help="Image files, folders or globs.")],
    model: ModelOpt = None,
    out: Annotated[Path, typer.Option(help="Folder for the <name>_<method>.png figures.")] = Path("heatmaps"),
) -> None:
    """Heatmaps of what drove each prediction: one PNG per image, the label and P(Parasitized) above it.

    A run folder (torch) gets Grad-CAM; an ONNX model (the shipped one by default) gets occlusion sensitivity (each
    patch of the cell painted over in turn, how far the logit moves), which needs no gradients and no torch.

    Exit code 1 when any image could not be read, 2 for an unusable model (the message names the file).
    """
    from malaria_cells.errors import EXIT_OK, EXIT_SOME_INPUTS_FAILED
    from malaria_cells.inputs import collect_inputs
    from malaria_cells.predict import Classifier
    from malaria_cells.terminal import console

    # ModelError (unusable model) -> one line naming the file, exit code 2.
    clf = Classifier.load(model)
    if clf.explainable:
        from malaria_cells.explain import explain_files
    else:
        from malaria_cells.heatmaps import explain_files

    results = explain_files(clf, collect_inputs(images), out_dir=out)
    for pred, path in results:
        if path is None:
            console.print(f"[red]error[/] {pred.error}", markup=True, highlight=False)
        else:
            console.print(f"{pred.label:12s} P(Parasitized)={pred.probability:.4f}  {path}")
    raise typer.Exit(EXIT_SOME_INPUTS_FAILED if any(p is None for _, p in results) else EXIT_OK)


@app.command("export")
def export_cmd(
    run: Annotated[Path, typer.Argument(help="A finished run folder.")],
    fmt: Annotated[str, typer.Option("--format", help="Export format (onnx).")] = "onnx",
    int8: Annotated[bool, typer.Option("--int8", help="Static int8 quantization (needs the run's data).")] = False,
    out: Annotated[Path | None, typer.Option(help="Output file (default RUN/model.onnx or model-int8.onnx).")] = None,
    data: DataOpt = None,
    quant_format: Annotated[str, typer.Option(help="int8 graph: qdq | qoperator.")] = "qdq",
    calibration_images: Annotated[int, typer.Option(help="int8: training images for calibration.")] = 512,
) -> None:
    """Export to ONNX with metadata inside, check parity with torch; optionally quantize to int8.

    The graph takes letterboxed uint8 RGB (N, S, S, 3); normalisation is inside. An int8 model whose test
    accuracy drops by more than 0.5 points is exported with a warning recorded in its metadata. Exit code 2 for an
    unusable run folder (the message names the file) or a failed check.
    """
    from malaria_cells.export import export_run

    if fmt != "onnx":
        _fail(f"--format {fmt!r} is not supported; only onnx")
    # ModelError (not a finished run, broken metadata.json or weights) and ExportError (a failed check) -> one line
    # and exit code 2 (see _guarded).
    try:
        export_run(
            run_dir=run,
            out=out,
            int8=int8,
            data_dir=data,
            quant_format=quant_format,
            calibration_images=calibration_images,
        )
    except ValueError as e:  # e.g. --quant-format of another name
        _fail(str(e))


@app.command("serve")
def serve_cmd(
    model: ModelOpt = None,
    operating_point: OperatingPointOpt = None,
    detector: Annotated[
        Path | None, typer.Option(help="Cell detector ONNX for field photos (default: the shipped one).")
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to bind; 127.0.0.1 is this machine only.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (1-65535).")] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted image file, in MB.")] = 10.0,
    max_files: Annotated[int, typer.Option(help="Most files in one request.")] = 32,
    workers: Annotated[int, typer.Option(help="Model calls at once; others wait their turn.")] = 1,
    threads: Annotated[int | None, typer.Option(help="Model threads per call (default: cores // workers).")] = None,
    max_request_megapixels: Annotated[
        float, typer.Option(help="Most decoded megapixels in one request; files beyond get 413.")
    ] = 64.0,
    max_requests: Annotated[int, typer.Option(help="Predictions admitted at once; more get 503.")] = 32,
    max_inflight_mb: Annotated[
        float | None, typer.Option(help="Upload MB admitted at once; more get 503 (default: two largest requests).")
    ] = None,
    body_timeout: Annotated[float, typer.Option(help="Seconds to receive one request body; slower gets 408.")] = 60.0,
    decode_timeout: Annotated[float, typer.Option(help="Seconds one request may spend decoding its files.")] = 30.0,
    header_timeout: Annotated[
        float, typer.Option(help="Seconds to receive a request's headers; slower connections are closed.")
    ] = 10.0,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(help="Another Host name to serve besides localhost and --host (DNS rebinding check); repeat."),
    ] = None,
    tta: Annotated[
        bool,
        typer.Option(
            "--tta", help="Test-time augmentation for every cell (8 views, the model's own TTA threshold; 8x the work)."
        ),
    ] = False,
) -> None:
    """Serve the web page (cell images, or a field photo with its cells counted) and the JSON API (/docs)."""
    from malaria_cells.serve import ServeConfig, check_port, serve

    # Checked here, before anything loads: a bad value is one error line and exit code 2 (a ConfigError).
    check_port(port)
    config = ServeConfig(
        max_upload_mb=max_upload_mb,
        max_files=max_files,
        workers=workers,
        threads=threads,
        max_request_megapixels=max_request_megapixels,
        max_requests=max_requests,
        max_inflight_mb=max_inflight_mb,
        body_timeout_s=body_timeout,
        decode_timeout_s=decode_timeout,
        header_timeout_s=header_timeout,
        allowed_hosts=tuple(allowed_host or ()),
        operating_point=operating_point,
        tta=tta,
    )
    serve(model=model, detector=detector, host=host, port=port, config=config)


@app.command("model-card")
def model_card_cmd(
    run: Annotated[Path, typer.Argument(help="The finished run folder the card describes.")],
    onnx: Annotated[
        list[Path] | None, typer.Option(help="The run's ONNX file(s), fp32 first; repeat the option.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Where to write the card (default RUN/MODEL_CARD.md). The shipped card is replaced only when named "
            "here: --out models/MODEL_CARD.md."
        ),
    ] = None,
    eval_json: Annotated[
        Path | None, typer.Option(help="The run's test evaluation (default RUN/eval-test/metrics.json).")
    ] = None,
    command: Annotated[
        list[str] | None, typer.Option(help="A command that made the model, shown in the card; repeatable.")
    ] = None,
    results_root: Annotated[
        Path, typer.Option(help="Folder holding benchmarks/results and results/smear (the measured failure modes).")
    ] = Path("."),
) -> None:
    """Render a run's MODEL_CARD.md: Hugging Face metadata header and model-card sections, every number read from
    the run's metadata, its evaluation or a committed results file named beside it."""
    from malaria_cells.card import is_final_fit, write_model_card
    from malaria_cells.run import Run
    from malaria_cells.terminal import console

    ev: Path | None = eval_json or run / "eval-test" / "metrics.json"
    if not ev.exists():
        if eval_json is None and is_final_fit(Run.open(run).meta):
            ev = None  # a final fit has no test patients: the card shows its cross-validation estimate
        else:
            _fail(f"{ev} not found; run `malaria-cells evaluate {run}` first")
    written = write_model_card(
        run_dir=run, eval_json=ev, onnx_paths=onnx or [], commands=command or [], out=out, results_root=results_root
    )
    console.print(f"[green]wrote[/] {written}")


@app.command("smear")
def smear_cmd(
    paths: Annotated[list[str], typer.Argument(help="Field photos or folders of them; a folder is one slide.")],
    model: ModelOpt = None,
    detector: Annotated[
        Path | None, typer.Option(help="Detector ONNX file (default: $MALARIA_CELLS_DETECTOR, else the shipped one).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("smear-out"),
    boxes: Annotated[
        Path | None,
        typer.Option(help="Classify these boxes instead of detecting: IML-Malaria's JSON or COCO JSON."),
    ] = None,
    threshold: ThresholdOpt = None,
    operating_point: OperatingPointOpt = None,
    overlays: Annotated[bool, typer.Option("--overlays/--no-overlays", help="Write an overlay per photo.")] = True,
    shard: Annotated[str | None, typer.Option(help="i/n: only the i-th of n equal parts of the photos.")] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Photos analysed at once (default: the available cores).")
    ] = None,
    stain_normalize: StainNormalizeOpt = None,
) -> None:
    """Find every red blood cell in field photos, classify it, and report parasitemia per photo and per slide.

    Writes cells.csv, fields.csv, summary.json, overlays/ and infected_cells.png into --out. Exit code 0 when every
    photo was read and had cells, 1 when some photo failed or had none, 5 when no photo had any cell.
    """
    from malaria_cells.boxes import load_annotations
    from malaria_cells.errors import EXIT_NOTHING_FOUND, EXIT_OK, EXIT_SOME_INPUTS_FAILED
    from malaria_cells.inputs import shard_bounds
    from malaria_cells.progress import available_cores, task
    from malaria_cells.render import parasitemia_table
    from malaria_cells.smear import SmearAnalyzer, group_slides, run_smear
    from malaria_cells.terminal import console

    slides = group_slides(paths)
    if shard is not None:
        try:
            i, n = (int(x) for x in shard.split("/"))
            flat = [(s, p) for s, ps in slides for p in ps]
            start, stop = shard_bounds(len(flat), index=i - 1, count=n)
        except ValueError:
            _fail(f"--shard takes i/n with 1 <= i <= n (e.g. 2/4), not {shard!r}")
        part: dict[str, list[Path]] = {}
        for s, p in flat[start:stop]:
            part.setdefault(s, []).append(p)
        slides = list(part.items())
    n_photos = sum(len(ps) for _, ps in slides)
    if n_photos == 0:
        _fail("no field photos (JPEG, PNG, TIFF, WebP) in the given paths")
    given = load_annotations(boxes) if boxes is not None else None
    workers = min(workers or available_cores(), n_photos)
    analyzer = SmearAnalyzer.load(
        model=model,
        detector=detector,
        threshold=threshold,
        operating_point=operating_point,
        workers=workers,
        stain_normalize=stain_normalize,
    )
    with task(f"analyzing {n_photos:,} photos", total=n_photos) as bar:
        run = run_smear(
            slides,
            out=out,
            analyzer=analyzer,
            boxes=given,
            overlays=overlays,
            on_done=lambda _: bar.advance(),
            workers=workers,
        )
    console.print(parasitemia_table(run.slides, boxes=run.model["boxes"]))
    if run.failed or run.empty:
        console.print(f"[yellow]{run.failed} photo(s) unreadable, {run.empty} with 0 cells found (see fields.csv)[/]")
    console.print(f"[green]wrote[/] {out}/cells.csv, fields.csv, summary.json, infected_cells.png")
    if run.empty + run.failed == run.photos:
        raise typer.Exit(EXIT_NOTHING_FOUND)
    raise typer.Exit(EXIT_SOME_INPUTS_FAILED if run.failed or run.empty else EXIT_OK)


@app.command("smear-eval")
def smear_eval_cmd(
    photos: Annotated[Path, typer.Argument(help="Folder of annotated field photos.")],
    annotations: Annotated[Path, typer.Option(help="Their boxes: IML-Malaria's JSON or COCO JSON.")],
    model: ModelOpt = None,
    detector: Annotated[Path | None, typer.Option(help="Detector ONNX file (default: the shipped one).")] = None,
    out: Annotated[Path, typer.Option(help="Output folder (metrics.json, report.md, errors/).")] = Path("smear-eval"),
    given_boxes: Annotated[
        bool, typer.Option("--given-boxes", help="Classify the annotated boxes (classification judged alone).")
    ] = False,
    threshold: ThresholdOpt = None,
    first: Annotated[
        str | None, typer.Option(help="Only photos whose name sorts at or after this one (a split of your own).")
    ] = None,
    last: Annotated[str | None, typer.Option(help="Only photos whose name sorts at or before this one.")] = None,
    stain_normalize: StainNormalizeOpt = None,
) -> None:
    """Score the smear pipeline against annotated photos: detection, classification, counts and parasitemia."""
    from malaria_cells.boxes import load_annotations
    from malaria_cells.detect import Detector
    from malaria_cells.predict import Classifier
    from malaria_cells.smear import SmearAnalyzer
    from malaria_cells.smear_eval import evaluate_smear, render_report
    from malaria_cells.terminal import console

    names = [n for n in load_annotations(annotations) if (first is None or n >= first) and (last is None or n <= last)]
    analyzer = SmearAnalyzer(
        classifier=Classifier.load(model),
        detector=Detector(detector),
        threshold=threshold,
        stain_normalize=stain_normalize,
    )
    m = evaluate_smear(
        photos_dir=photos, annotations=annotations, analyzer=analyzer, out=out, given_boxes=given_boxes, names=names
    )
    console.print(render_report(m), markup=False, highlight=False)
    console.print(f"[green]wrote[/] {out}/metrics.json, report.md")


@app.command("adapt")
def adapt_cmd(
    data: Annotated[
        Path, typer.Option(help="The lab's field photos (with --annotations) or a folder of labelled cells.")
    ],
    out: Annotated[Path, typer.Option(help="The adapted run folder (with model.onnx).")],
    model: Annotated[
        Path | None,
        typer.Option(
            "--model", "-m", help="The run folder to adapt (its torch weights). Default: the shipped model's."
        ),
    ] = None,
    annotations: Annotated[
        Path | None, typer.Option(help="Boxes of the photos: IML-Malaria's JSON or COCO JSON.")
    ] = None,
    epochs: Annotated[
        int, typer.Option(min=1, help="Fine-tuning epochs (the best on the lab's validation photos).")
    ] = 8,
    val_fraction: Annotated[
        float, typer.Option(min=0.05, max=0.45, help="Photos choosing epoch and thresholds.")
    ] = 0.2,
    test_fraction: Annotated[float, typer.Option(min=0, max=0.45, help="Photos held out for before/after.")] = 0.2,
    target_specificity: Annotated[
        float, typer.Option(min=0.5, max=0.9999, help="Specificity of the high-specificity operating point.")
    ] = 0.995,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    stain_normalize: Annotated[
        bool,
        typer.Option(
            "--stain-normalize",
            help="Move each photo's cells to the NIH cells' stain before training; the adapted model says so, and "
            "smear then does the same to every photo (photos with --annotations only).",
        ),
    ] = False,
) -> None:
    """Fine-tune a model on a lab's labelled cells; thresholds chosen on held-out photos of that lab.

    Photos are split by consecutive names into train / validation / test blocks. The adapted run's threshold is the
    high-specificity point (for low-prevalence smears); the balanced and high-sensitivity points are stored beside it.
    """
    from malaria_cells.adapt import AdaptConfig, adapt
    from malaria_cells.render import adapt_table
    from malaria_cells.terminal import console

    cfg = AdaptConfig(
        epochs=epochs, val_fraction=val_fraction, test_fraction=test_fraction,
        target_specificity=target_specificity, seed=seed, stain_normalize=stain_normalize,
    )  # fmt: skip
    from malaria_cells.backends import SHIPPED_RUN

    result = adapt(run=model or SHIPPED_RUN, data=data, annotations=annotations, out=out, config=cfg)
    test = result.report.get("test")
    if test:
        console.print(adapt_table(test))
    console.print(f"[green]wrote[/] {result.out} (threshold {result.threshold:.4f}) and {result.onnx}")


@app.command("operating-points")
def operating_points_cmd(
    run: Annotated[Path, typer.Argument(help="A finished run folder.")],
    data: DataOpt = None,
    specificity: Annotated[float, typer.Option(min=0.5, max=0.9999, help="Of the high-specificity point.")] = 0.995,
    sensitivity: Annotated[float, typer.Option(min=0.5, max=0.9999, help="Of the high-sensitivity point.")] = 0.95,
    temperature: Annotated[
        bool,
        typer.Option(
            "--temperature/--no-temperature",
            help="Fit a temperature on the validation patients (calibrated probabilities); --no-temperature stores "
            "none (raw probabilities).",
        ),
    ] = True,
) -> None:
    """Fit a temperature and choose named thresholds (balanced, high_specificity, high_sensitivity) on the run's
    validation patients.

    The temperature T calibrates P(Parasitized) = sigmoid(logit / T); the thresholds are chosen on those
    probabilities and the default threshold is moved to them (same decisions). All are stored in the run's
    metadata.json; export the run again to carry them into its ONNX file.
    """
    from malaria_cells.adapt import store_operating_points
    from malaria_cells.terminal import console

    stored = store_operating_points(
        run=run, data=_data(data), specificity=specificity, sensitivity=sensitivity, temperature=temperature
    )
    if stored.fit is not None:
        f = stored.fit
        console.print(
            f"temperature       {f.temperature:.4f}  (validation NLL {f.nll_before:.4f} -> {f.nll_after:.4f})"
        )
    else:
        console.print("temperature       none (raw probabilities)")
    console.print(f"threshold         {stored.threshold:.4f}")
    for name, t in stored.operating_points.items():
        console.print(f"{name:17s} {t:.4f}")
    console.print(f"[green]stored in[/] {run}/metadata.json; re-export the run to carry them into its ONNX file")


@detector_app.command("train")
def detector_train_cmd(
    photos: Annotated[Path, typer.Argument(help="Folder of field photos.")],
    annotations: Annotated[Path, typer.Option(help="Their boxes: IML-Malaria's JSON or COCO JSON.")],
    out: Annotated[Path, typer.Option(help="Output folder (detector.onnx, metrics.json, history.jsonl).")],
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 30,
    width: Annotated[int, typer.Option(min=8, max=256, help="Channels of the network's body.")] = 32,
    scale: Annotated[float, typer.Option(min=0.1, max=1.0, help="Photo -> detector input scale.")] = 1 / 3,
    val_fraction: Annotated[
        float, typer.Option(min=0, max=0.9, help="Last share of the sorted photo names held out for validation.")
    ] = 0.2,
    threshold: Annotated[
        float | None, typer.Option(min=0.01, max=0.99, help="Heatmap threshold (default: chosen on validation).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """Train the centre-heatmap cell detector on annotated field photos; writes detector.onnx."""
    from malaria_cells.detect_train import DetectorConfig, train_detector
    from malaria_cells.terminal import console

    cfg = DetectorConfig(
        epochs=epochs, width=width, scale=scale, val_fraction=val_fraction, threshold=threshold, seed=seed
    )
    result = train_detector(photos_dir=photos, annotations=annotations, out=out, config=cfg)
    m = result.val_metrics
    if m:
        console.print(
            f"validation ({m['photos']} photos, {m['cells']:,} boxed cells) at threshold {result.threshold}: "
            f"recall {m['recall_iou50']:.3f} / precision {m['precision_iou50']:.3f} "
            f"(inner {m['precision_iou50_inner']:.3f}, where boxed {m['precision_iou50_boxed']:.3f}) at IoU 0.5; "
            f"recall {m['recall_iou30']:.3f} at IoU 0.3"
        )
    console.print(f"[green]wrote[/] {result.onnx}")


def main() -> None:
    """Console-script entry point."""
    from malaria_cells.errors import EXIT_INTERRUPTED

    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; a training run can be continued with `malaria-cells train --resume RUN`\n")
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()

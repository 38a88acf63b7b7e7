"""``POST /api/v1/adapt``: adapt the model to a lab over REST, as ``malaria-cells adapt`` does on the command line.

A lab uploads one zip of its labelled cells (``Parasitized/`` and ``Uninfected/`` folders of crops) or of its field
photos with their boxes (``annotations.json``: the IML JSON or COCO). Fine-tuning takes minutes, so the request
starts a **job** and answers ``202`` at once with its address; ``GET /api/v1/adapt/{job}`` reports its state and,
when done, the before/after report on the lab's held-out photos, the threshold and operating points;
``GET /api/v1/adapt/{job}/model.onnx`` downloads the adapted model (``serve --model`` it, or ``predict``/``smear``
with it). One job runs at a time (a second gets ``503`` with ``Retry-After``); jobs live in a temporary folder for
the life of the service.

The zip is checked before anything is unpacked: at most :data:`MAX_ENTRIES` files and :data:`MAX_UNPACKED_MB`
unpacked, no absolute paths or ``..`` (zip-slip), no links. Adapting needs the training extra (torch) and a run
folder to start from (the served model when it is one, else ``ServeConfig.adapt_base``, else the shipped model's
run); without them the request gets a clear error code, never a traceback.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import tempfile
import threading
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field

from malaria_cells.errors import ConfigError, MalariaCellsError

log = logging.getLogger(__name__)

ADAPT_PATH = "/api/v1/adapt"
MAX_ENTRIES = 50_000  # files in the zip: a lab labels hundreds to a few thousand cells
MAX_UNPACKED_MB = 2_000.0  # unpacked bytes: a zip bomb stops here, before anything is written
ANNOTATION_NAMES = ("annotations.json", "coco.json")
RETRY_AFTER_S = 60  # a fine-tuning job takes minutes


class AdaptUploadError(MalariaCellsError):
    """The uploaded zip is not a usable set of labelled cells or boxed photos."""

    code = "adapt_upload_invalid"
    status = 422


class AdaptUnavailableError(MalariaCellsError):
    """Adapting cannot run in this service (no run folder to start from, or no training extra)."""

    code = "adapt_unavailable"
    status = 409


class AdaptBusyError(MalariaCellsError):
    """Another adapt job is running."""

    code = "adapt_busy"
    status = 503


class AdaptJobInfo(BaseModel):
    """An adapt job's state and, when done, what it measured."""

    job: str = Field(description="The job id.")
    status: str = Field(description="queued | running | done | failed")
    created: str
    finished: str | None = None
    base_model: str = Field(description="The run folder it started from.")
    data: str = Field(description="What was uploaded: labelled cells or boxed photos, and how many files.")
    epochs: int
    stain_normalize: bool = Field(
        False, description="The photos' cells were moved to the NIH cells' stain (and smear will do the same)."
    )
    error: dict[str, str] | None = Field(None, description="code and message, when failed")
    threshold: float | None = Field(None, description="The adapted model's default (high-specificity) threshold.")
    operating_points: dict[str, float] | None = None
    report: dict[str, Any] | None = Field(None, description="Before/after on the lab's held-out photos, with CIs.")
    model_url: str | None = Field(None, description="Where the adapted ONNX model is downloaded, when done.")


@dataclass
class _Job:
    id: str
    folder: Path
    data: Path
    annotations: Path | None
    described: str
    epochs: int
    base: Path
    stain_normalize: bool = False
    status: str = "queued"
    created: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    finished: str | None = None
    error: dict[str, str] | None = None
    result: Any = None

    def info(self) -> AdaptJobInfo:
        r = self.result
        return AdaptJobInfo(
            job=self.id,
            status=self.status,
            created=self.created,
            finished=self.finished,
            base_model=str(self.base),
            data=self.described,
            epochs=self.epochs,
            stain_normalize=self.stain_normalize,
            error=self.error,
            threshold=r.threshold if r is not None else None,
            operating_points=r.operating_points if r is not None else None,
            report=r.report if r is not None else None,
            model_url=f"{ADAPT_PATH}/{self.id}/model.onnx" if r is not None else None,
        )


def unpack(
    data: bytes, dest: Path, *, max_entries: int = MAX_ENTRIES, max_unpacked_mb: float = MAX_UNPACKED_MB
) -> Path:
    """Check and unpack an uploaded zip into ``dest``; the folder that holds the cells or photos.

    Args:
        data: the zip's bytes.
        dest: an empty folder.
        max_entries: most files.
        max_unpacked_mb: most unpacked megabytes (declared sizes, checked before writing; reads stop there too).

    Returns:
        The data folder: where ``Parasitized/`` and ``Uninfected/`` (or the photos and annotations) are, also when
        the zip wraps them in one top folder.

    Raises:
        AdaptUploadError: not a zip, too many or too large entries, unsafe paths or links.
    """
    import io

    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError):
        raise AdaptUploadError("the upload is not a zip file") from None
    infos = [i for i in zf.infolist() if not i.is_dir()]
    if not infos:
        raise AdaptUploadError("the zip is empty")
    if len(infos) > max_entries:
        raise AdaptUploadError(f"the zip holds {len(infos):,} files; at most {max_entries:,}")
    total = sum(i.file_size for i in infos)
    if total > max_unpacked_mb * 1e6:
        raise AdaptUploadError(f"the zip unpacks to {total / 1e6:,.0f} MB; at most {max_unpacked_mb:,.0f} MB")
    budget = int(max_unpacked_mb * 1e6)
    for info in infos:
        name = PurePosixPath(info.filename.replace("\\", "/"))
        if name.is_absolute() or ".." in name.parts or not name.parts:
            raise AdaptUploadError(f"unsafe path in the zip: {info.filename!r}")
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise AdaptUploadError(f"links are not accepted in the zip: {info.filename!r}")
        target = dest.joinpath(*name.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(target, "wb") as out:
            # Declared sizes can lie: count what is really written.
            while chunk := src.read(1 << 20):
                budget -= len(chunk)
                if budget < 0:
                    raise AdaptUploadError(f"the zip unpacks to more than {max_unpacked_mb:,.0f} MB")
                out.write(chunk)
    root = dest
    while True:  # one wrapping folder (zip of a folder) is looked through
        entries = [p for p in root.iterdir() if not p.name.startswith((".", "__MACOSX"))]
        if len(entries) == 1 and entries[0].is_dir() and entries[0].name not in ("Parasitized", "Uninfected"):
            root = entries[0]
            continue
        return root


def describe_data(root: Path) -> tuple[Path | None, str]:
    """Which kind of labelled data a folder holds: its annotation file (photos) or None (cells), and a description.

    Raises:
        AdaptUploadError: neither labelled cell folders nor photos with an annotation file.
    """
    ann = next((root / n for n in ANNOTATION_NAMES if (root / n).is_file()), None)
    if ann is not None:
        photos = sum(1 for p in root.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".tif", ".tiff"))
        return ann, f"{photos} field photos with {ann.name}"
    counts = {c: sum(1 for p in (root / c).glob("*") if p.is_file()) for c in ("Parasitized", "Uninfected")}
    if all(counts.values()):
        return None, f"{counts['Parasitized']} Parasitized and {counts['Uninfected']} Uninfected cells"
    raise AdaptUploadError(
        "the zip must hold Parasitized/ and Uninfected/ folders of cell images (both non-empty), or field photos with "
        f"an {' or '.join(ANNOTATION_NAMES)} of their boxes (IML JSON or COCO)"
    )


class AdaptJobs:
    """The adapt jobs of one service: a work folder and one worker thread at a time."""

    def __init__(self, *, base: Path | None, work_dir: Path | None = None) -> None:
        """Args:
        base: the run folder to adapt (None: adapting is unavailable, and says why).
        work_dir: where jobs live (default: a temporary folder, made by the first job, removed by :meth:`close`).
        """
        self.base = base
        self._work_dir = Path(work_dir) if work_dir is not None else None
        self._own = work_dir is None
        self.jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def work_dir(self) -> Path:
        """The jobs' folder, made on first use (a service that never adapts makes none)."""
        if self._work_dir is None:
            self._work_dir = Path(tempfile.mkdtemp(prefix="malaria-adapt-"))
        return self._work_dir

    def submit(self, data: bytes, *, epochs: int, stain_normalize: bool = False) -> _Job:
        """Unpack an upload and start adapting it in the background.

        Args:
            data: the zip (labelled cells, or boxed photos with their annotations).
            epochs: fine-tuning epochs, 1-50.
            stain_normalize: photos only: train on cells moved to the NIH stain (see ``AdaptConfig``).

        Returns:
            The queued job.

        Raises:
            AdaptUnavailableError: no base run or no training extra.
            AdaptBusyError: a job is running.
            AdaptUploadError: the upload is unusable.
        """
        if self.base is None:
            raise AdaptUnavailableError(
                "this service has no run folder to adapt: start it with a run folder as --model (the ONNX model "
                "cannot be fine-tuned), or give ServeConfig.adapt_base"
            )
        try:
            import torch  # noqa: F401  # adapting fine-tunes the network's weights
        except ImportError:
            raise AdaptUnavailableError(
                "adapting needs the training extra: pip install 'malaria-cells[train]'", code="train_extra_missing"
            ) from None
        if not 1 <= epochs <= 50:
            raise ConfigError(f"epochs must be in [1, 50], not {epochs}")
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                raise AdaptBusyError("an adapt job is running; try again when it is done")
            job_id = uuid.uuid4().hex[:12]
            folder = self.work_dir / job_id
            folder.mkdir()
            try:
                root = unpack(data, folder / "upload")
                annotations, described = describe_data(root)
            except Exception:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            job = _Job(job_id, folder, root, annotations, described, epochs, self.base, stain_normalize)
            self.jobs[job_id] = job
            self._thread = threading.Thread(target=self._run, args=(job,), name=f"adapt-{job_id}", daemon=True)
            self._thread.start()
        return job

    def _run(self, job: _Job) -> None:
        from malaria_cells.adapt import AdaptConfig, adapt

        job.status = "running"
        try:
            job.result = adapt(
                run=job.base,
                data=job.data,
                annotations=job.annotations,
                out=job.folder / "run",
                config=AdaptConfig(epochs=job.epochs, stain_normalize=job.stain_normalize),
            )
            job.status = "done"
        except MalariaCellsError as e:
            job.status, job.error = "failed", {"code": e.code, "message": e.message}
        except Exception as e:  # a job must end in a state a client can read, whatever went wrong
            log.exception("adapt job %s failed", job.id)
            job.status, job.error = "failed", {"code": "adapt_failed", "message": f"{type(e).__name__}: {e}"}
        finally:
            job.finished = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")

    def get(self, job_id: str) -> _Job:
        """The job, or a 404 error."""
        job = self.jobs.get(job_id)
        if job is None:
            raise MalariaCellsError(f"no adapt job {job_id!r}", code="adapt_job_not_found", status=404)
        return job

    def close(self) -> None:
        """Remove the work folder when this object made it (a running job's thread is a daemon)."""
        if self._own and self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)


def _jobs(request: Request) -> AdaptJobs:
    return request.app.state.adapt_jobs


async def start_adapt(request: Request, epochs: int = 8, stain_normalize: bool = False) -> JSONResponse:
    """Start adapting the model to the uploaded labelled cells (the raw request body is the zip)."""
    from starlette.concurrency import run_in_threadpool

    body = await request.body()
    if not body:
        raise AdaptUploadError("send the zip as the request body (Content-Type: application/zip)")
    try:
        job = await run_in_threadpool(
            lambda: _jobs(request).submit(body, epochs=epochs, stain_normalize=stain_normalize)
        )
    except AdaptBusyError as e:  # the error body every error has, plus when to come back
        error = {"error": {"code": e.code, "message": e.message}}
        return JSONResponse(error, status_code=e.status, headers={"Retry-After": str(RETRY_AFTER_S)})
    info = job.info()
    return JSONResponse(info.model_dump(), status_code=202, headers={"Location": f"{ADAPT_PATH}/{job.id}"})


async def adapt_status(request: Request, job: str) -> AdaptJobInfo:
    """An adapt job's state; when done, its report, thresholds and the model's address."""
    return _jobs(request).get(job).info()


async def adapt_model(request: Request, job: str) -> FileResponse:
    """The adapted ONNX model of a finished job."""
    j = _jobs(request).get(job)
    if j.result is None:
        raise MalariaCellsError(f"adapt job {job} is {j.status}; no model yet", code="adapt_job_not_done", status=409)
    return FileResponse(j.result.onnx, media_type="application/octet-stream", filename=f"adapted-{job}.onnx")


def adapt_router() -> APIRouter:
    """The adapt routes (prefix /api/v1/adapt)."""
    router = APIRouter(prefix=ADAPT_PATH)
    router.add_api_route(
        "",
        start_adapt,
        methods=["POST"],
        status_code=202,
        response_model=AdaptJobInfo,
        summary="Adapt the model to a lab: upload a zip of labelled cells or boxed photos; a job starts",
        description="The request body is a zip: `Parasitized/` and `Uninfected/` folders of the lab's cell crops, "
        "or field photos with `annotations.json` (IML JSON or COCO). Answers 202 with the job; poll its address. "
        f"At most {MAX_ENTRIES:,} files and {MAX_UNPACKED_MB:,.0f} MB unpacked.",
        responses={
            409: {"description": "no run folder to adapt, or no training extra"},
            422: {"description": "not a usable zip (adapt_upload_invalid)"},
            503: {"description": "another adapt job is running (adapt_busy)"},
        },
    )
    router.add_api_route(
        "/{job}",
        adapt_status,
        methods=["GET"],
        response_model=AdaptJobInfo,
        summary="An adapt job's state, and its before/after report when done",
        responses={404: {"description": "no such job"}},
    )
    router.add_api_route(
        "/{job}/model.onnx",
        adapt_model,
        methods=["GET"],
        summary="Download the adapted ONNX model",
        responses={409: {"description": "the job is not done"}},
    )
    return router

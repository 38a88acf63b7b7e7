"""The JSON shapes of the web service's answers (pydantic models): what /openapi.json documents."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # the smear modules load scipy: imported when the service starts, not with this module
    pass


# Longest side of a smear overlay, px: a 40 MP photo drawn at full size is a ~50 MB PNG that no page can show; field
# photos (1280 x 960 here, up to ~2500 px from common microscope cameras) are drawn at their own size.
OVERLAY_MAX_SIDE = 2560


# --------------------------------------------------------------------------------------------- response models


class ErrorInfo(BaseModel):
    """What went wrong, for a program (``code``) and for a person (``message``)."""

    code: str = Field(
        description="Stable machine code: no_files, not_a_file, too_many_files, file_too_large, request_too_large, "
        "request_too_many_pixels, decode_timeout, empty_file, not_an_image, too_many_pixels, image_too_small, "
        "unreadable_image, unusable_image, server_busy, request_timeout, invalid_host, method_not_allowed, ..."
    )
    message: str = Field(description="What happened, in words (names the file where there is one).")


class ErrorResponse(BaseModel):
    """The body of every error answer."""

    error: ErrorInfo


class FileSuccess(BaseModel):
    """One classified image."""

    filename: str = Field(description="The upload's file name (or 'file N' when it has none).")
    ok: Literal[True] = True
    label: str = Field(
        description="Parasitized or Uninfected; Unknown when the image does not look like a single stained cell on "
        "black (the flag says why)."
    )
    prob_parasitized: float = Field(
        ge=0, le=1, description="P(Parasitized), as the CSV column and smear cells name it."
    )
    threshold: float = Field(description="Parasitized when prob_parasitized >= threshold.")
    flag: str = Field(
        default="",
        description="Why the input is unlike the training cells ('not a single cell', 'background not black', "
        "'grayscale', 'unusual colours', ...); empty when it looks like one.",
    )
    raw_label: str | None = Field(default=None, description="The model's label, also when label is Unknown.")
    heatmap: str | None = Field(
        default=None,
        description="With heatmap=true: the evidence for the label over the model input, a PNG data URL (Grad-CAM "
        "for a torch model, occlusion sensitivity for ONNX; see the model card's heatmap_method), else null.",
    )


class FileFailure(BaseModel):
    """One image that could not be classified, with the reason."""

    filename: str = Field(description="The upload's file name (or 'file N' when it has none).")
    ok: Literal[False] = False
    status: int = Field(description="The HTTP status this failure alone would have (413, 415, 422, 503, ...).")
    error: ErrorInfo


class ModelSummary(BaseModel):
    """The model that answered."""

    name: str | None = Field(description="Architecture name, e.g. custom-cnn.")
    backend: str = Field(description="onnx or torch.")
    threshold: float = Field(description="Parasitized when P(Parasitized) >= threshold.")


class PredictResponse(BaseModel):
    """One result per uploaded file, in upload order."""

    results: list[Annotated[FileSuccess | FileFailure, Field(discriminator="ok")]]
    model: ModelSummary
    error: ErrorInfo | None = Field(
        default=None, description="Only when some file failed: the count and the first failure (its code)."
    )
    warning: str | None = Field(
        default=None,
        description="Only when the model is not meant for single cells (e.g. adapted on stain-normalized field "
        "photos: use /api/v1/smear).",
    )


class SmearCellResult(BaseModel):
    """One cell found in a field photo."""

    cell: int = Field(description="Index of the cell in this photo (detections, most confident first).")
    x: int = Field(description="Box left edge, px of the uploaded photo.")
    y: int = Field(description="Box top edge, px.")
    w: int = Field(description="Box width, px.")
    h: int = Field(description="Box height, px.")
    area: int = Field(description="Pixels of the cell's mask, in the photo.")
    on_border: bool = Field(description="Cut by the photo's edge: listed but not counted (counted in the next field).")
    prob_parasitized: float | None = Field(
        ge=0, le=1, description="P(Parasitized); null for a cell that was not classified (Unknown, Other)."
    )
    label: str = Field(
        description="Parasitized or Uninfected (red cells, counted unless on_border); Other (a white cell, platelet "
        "clump or debris: not counted) or Unknown (no usable cell outline: not classified, not counted)."
    )
    crop: str | None = Field(
        default=None,
        description="Only with crops=true: the classifier's input for this cell (the cell on black, the model's "
        "input size) as a PNG data URL; null for cells that were not classified.",
    )


class SmearSummary(BaseModel):
    """The photo's counts and parasitemia."""

    cells: int = Field(description="Red cells counted: Parasitized or Uninfected and not cut by the border.")
    infected: int = Field(description="Counted cells called Parasitized.")
    parasitemia_pct: float | None = Field(description="infected / cells in %; null when no cell was counted.")
    ci95_pct: list[float] | None = Field(
        description="[low, high]: exact binomial 95 % interval of the parasitemia in %; null when no cell was counted."
    )
    border_cells: int = Field(description="Cells cut by the photo's edge (listed, not counted).")
    unknown_cells: int = Field(description="Cells found but not classified (no usable outline; not counted).")
    other_objects: int = Field(description="White cells, platelet clumps, debris found by the detector (not counted).")
    warning: str | None = Field(description="Set when the result needs a look, e.g. 0 cells found.")


class SmearModelSummary(BaseModel):
    """The models that answered."""

    name: str | None = Field(description="Cell classifier architecture, e.g. custom-cnn.")
    backend: str = Field(description="onnx or torch.")
    threshold: float = Field(description="Parasitized when P(Parasitized) >= threshold.")
    detector: str = Field(description="The detector file's name.")
    detector_threshold: float = Field(description="Heatmap probability above which a cell centre is a detection.")
    stain_normalized: bool = Field(
        default=False, description="The photo's cells were moved to the NIH training cells' stain before classifying."
    )


class SmearResponse(BaseModel):
    """Every cell found in the photo, the counts, and (on request) the photo with the cells outlined."""

    filename: str = Field(description="The upload's file name (or 'photo' when it has none).")
    width: int = Field(description="The photo's width, px (boxes are in these pixels).")
    height: int = Field(description="The photo's height, px.")
    cells: list[SmearCellResult]
    summary: SmearSummary
    model: SmearModelSummary
    overlay: str | None = Field(
        default=None,
        description="Only with overlay=true: the photo with each cell's box (infected red with its probability, "
        "uninfected green, cut by the border grey, other objects purple, unknown yellow) as a PNG (or JPEG) data "
        f"URL, at the photo's size (photos longer than {OVERLAY_MAX_SIDE} px: scaled to {OVERLAY_MAX_SIDE} px).",
    )
    disclaimer: str = Field(description="Research and education use only; not for diagnosis.")


class DetectorInfo(BaseModel):
    """The cell detector used by /api/v1/smear."""

    source: str = Field(description="The detector file's name.")
    threshold: float = Field(description="Heatmap probability of a cell centre.")
    scale: float = Field(description="Photo scale the detector sees (0.25: a 1280 px photo becomes 320 px).")
    cell_px: float = Field(description="Median cell side in the detector's training photos, px.")
    trained_on: str = Field(description="What it was trained on.")
    metrics: dict[str, Any] = Field(description="Its held-out detection metrics (recall, precision at IoU 0.5).")


class ServiceLimits(BaseModel):
    """What one request may hold, and what the service admits at once."""

    max_upload_mb: float = Field(description="Largest file, in MB (10**6 bytes).")
    max_files: int = Field(description="Most files per request.")
    max_request_mb: float = Field(description="Largest request body, in MB.")
    max_image_megapixels: float = Field(description="Most pixels in one image, in MP.")
    max_request_megapixels: float = Field(description="Most decoded pixels in one request, in MP.")
    max_requests_in_flight: int = Field(description="Predictions admitted at once; more get 503 + Retry-After.")
    max_inflight_mb: float = Field(description="Upload MB admitted at once; more get 503 + Retry-After.")
    body_timeout_s: float = Field(description="Most seconds to send one request body; slower gets 408.")
    decode_timeout_s: float = Field(description="Most seconds one request may spend decoding its files.")


class ModelInfo(BaseModel):
    """The model card: name, classes, threshold, preprocessing, provenance, and this service's limits."""

    model_config = ConfigDict(extra="allow")  # every card field of the model file is passed on

    model: str | None = Field(default=None, description="Architecture name.")
    backend: str = Field(description="onnx or torch.")
    source: str = Field(description="The model file or run folder's name (not its path on the server).")
    class_names: list[str] = Field(description="Class names; index 1 is usually Parasitized.")
    positive_class: str | None = Field(default=None, description="The class whose probability is reported.")
    threshold: float = Field(description="Parasitized when P(Parasitized) >= threshold.")
    preprocessing: dict[str, Any] = Field(description="Input size (px), mean, std, resize method.")
    explainable: bool = Field(description="Whether heatmap=true gives Grad-CAM overlays (torch models).")
    heatmap_method: Literal["grad-cam", "occlusion"] = Field(
        description="What heatmap=true draws: Grad-CAM (torch models) or occlusion sensitivity (any model: the "
        "logit's change when each patch of the cell is painted over)."
    )
    disclaimer: str
    detector: DetectorInfo | None = Field(default=None, description="The cell detector of /api/v1/smear.")
    limits: ServiceLimits


class HealthResponse(BaseModel):
    """Liveness, readiness and load."""

    status: Literal["ok", "busy", "saturated", "loading"] = Field(
        description="loading: model not loaded yet; saturated: the admission limit is reached (new predictions get "
        "503); busy: work is queued (model slots all busy or waited for, or decoding threads all taken); else ok."
    )
    model_loaded: bool
    version: str
    requests_in_flight: int = Field(description="Predictions admitted and not finished.")
    max_requests_in_flight: int
    upload_mb_in_flight: float = Field(description="Declared upload MB of the admitted predictions.")
    max_inflight_mb: float
    model_slots: int = Field(description="Model calls that may run at once (--workers).")
    model_slots_busy: int
    model_queue: int = Field(description="Model calls waiting for a slot.")
    decodes_in_progress: int = Field(description="Files decoding or waiting for a decoding thread.")
    decode_threads: int
    refused_busy: int = Field(description="Predictions refused with 503 since the start.")

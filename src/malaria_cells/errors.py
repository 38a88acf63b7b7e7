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

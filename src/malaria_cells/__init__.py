"""malaria-cells: honest, patient-disjoint malaria cell classifiers, from training to a model you can ship.

The public API, importable from the package top (loaded on first use, so ``import malaria_cells`` stays light and
never imports torch)::

    from malaria_cells import Classifier, analyze_smear
    clf = Classifier.load()                     # the shipped ONNX cell model
    result = analyze_smear("field.jpg")         # every red cell of a field photo, counted
    from malaria_cells.adapt import adapt       # fine-tune on a lab's cells (the training extra)

Research and education use only; not a medical device and not for diagnosis.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = {
    "Classifier": "malaria_cells.predict",
    "Prediction": "malaria_cells.predict",
    "analyze_smear": "malaria_cells.smear",
    "SmearAnalyzer": "malaria_cells.smear",
    "AdaptConfig": "malaria_cells.adapt",  # adapt() itself: from malaria_cells.adapt import adapt (training extra)
    "Run": "malaria_cells.run",
    "MalariaCellsError": "malaria_cells.errors",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    # PEP 562: the public names import their module on first use.
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'malaria_cells' has no attribute {name!r}")

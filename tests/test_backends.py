"""The ONNX backend's probabilities come from the graph's logit: fine-grained even for the int8 shipped model."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from malaria_cells.backends import ONNX_INPUT, SHIPPED_MODEL, OnnxBackend


def test_int8_probabilities_are_not_stuck_at_0_and_1(share):
    files = sorted((share / "Parasitized").glob("*.webp"))[:100] + sorted((share / "Uninfected").glob("*.webp"))[:100]
    from malaria_cells.predict import Classifier

    clf = Classifier.load(SHIPPED_MODEL)
    x = np.stack([clf.prepare(f) for f in files])
    session = ort.InferenceSession(str(SHIPPED_MODEL), providers=["CPUExecutionProvider"])
    logit, graph_prob = session.run(None, {ONNX_INPUT: x})
    p = OnnxBackend(SHIPPED_MODEL)(x)
    assert ((graph_prob >= 1) | (graph_prob <= 0)).mean() > 0.2  # the int8 graph's own output: 1/255 steps
    assert not ((p >= 1) | (p <= 0)).any()  # ours: none exactly 0 or 1
    assert np.allclose(p, 1 / (1 + np.exp(-logit.astype(np.float64))), atol=1e-6)
    assert np.abs(p - graph_prob).max() < 3 / 255  # the same probabilities, finer

"""The decoded-image cache: built once, then memory-mapped; keyed by files and size; bad images flagged."""

from __future__ import annotations

import logging
import re

import numpy as np

from malaria_cells import cache as cache_module
from malaria_cells.cache import build_or_load, cache_key
from malaria_cells.data import scan
from malaria_cells.preprocess import letterbox, load_image


def test_cache_builds_once_then_loads(tmp_path, synthetic_data):
    found = scan(synthetic_data)
    first = build_or_load(images=found.images, size=32, root=found.root, cache_dir=tmp_path, n_workers=1)
    assert first.built and first.ok.all()
    second = build_or_load(images=found.images, size=32, root=found.root, cache_dir=tmp_path, n_workers=1)
    assert not second.built
    assert isinstance(second.array, np.memmap)
    for i in (0, 7, len(found.images) - 1):
        assert np.array_equal(second.array[i], letterbox(load_image(found.images[i].path), 32))


def test_parallel_build_matches_serial(tmp_path, synthetic_data):
    found = scan(synthetic_data)
    serial = build_or_load(images=found.images, size=24, root=found.root, cache_dir=tmp_path / "a", n_workers=1)
    parallel = build_or_load(images=found.images, size=24, root=found.root, cache_dir=tmp_path / "b", n_workers=2)
    assert np.array_equal(np.asarray(serial.array), np.asarray(parallel.array))


def test_key_depends_on_size_and_file_list(synthetic_data):
    found = scan(synthetic_data)
    k = cache_key(found.images, 32, found.root)
    assert cache_key(found.images, 48, found.root) != k
    assert cache_key(found.images[1:], 32, found.root) != k


def test_corrupt_image_is_flagged_not_fatal(tmp_path, synthetic_data):
    bad = next((synthetic_data / "Parasitized").glob("*.png"))
    bad.write_bytes(bad.read_bytes()[:50])
    found = scan(synthetic_data)
    cache = build_or_load(images=found.images, size=32, root=found.root, cache_dir=tmp_path, n_workers=1)
    i = next(k for k, im in enumerate(found.images) if im.path == str(bad))
    assert not cache.ok[i] and cache.ok.sum() == len(found.images) - 1
    assert str(bad) in cache.errors[i]
    # the error survives a reload from disk
    again = build_or_load(images=found.images, size=32, root=found.root, cache_dir=tmp_path, n_workers=1)
    assert not again.ok[i] and not again.built


def test_unreadable_images_are_logged_not_printed(tmp_path, synthetic_data, caplog, capsys):
    bad = sorted((synthetic_data / "Uninfected").glob("*.png"))[:2]
    for p in bad:
        p.write_bytes(b"")
    found = scan(synthetic_data)
    with caplog.at_level(logging.WARNING, logger="malaria_cells.cache"):
        cache = build_or_load(images=found.images, size=16, root=found.root, cache_dir=tmp_path, n_workers=1)
    assert (~cache.ok).sum() == 2
    warned = [r for r in caplog.records if r.name == "malaria_cells.cache" and r.levelno == logging.WARNING]
    assert len(warned) == 2 and all(r.getMessage().startswith("skipped ") for r in warned)
    for p in bad:
        assert sum(str(p) in r.getMessage() for r in warned) == 1
    assert not any(re.search(r"\[/?(yellow|red|green|bold)", r.getMessage()) for r in warned)  # no rich markup
    assert capsys.readouterr() == ("", "")


def test_many_unreadable_images_are_summarised(tmp_path, synthetic_data, caplog, monkeypatch):
    monkeypatch.setattr(cache_module, "SHOWN_ERRORS", 1)
    for p in sorted((synthetic_data / "Uninfected").glob("*.png"))[:3]:
        p.write_bytes(b"")
    found = scan(synthetic_data)
    with caplog.at_level(logging.WARNING, logger="malaria_cells.cache"):
        build_or_load(images=found.images, size=16, root=found.root, cache_dir=tmp_path, n_workers=1)
    messages = [r.getMessage() for r in caplog.records if r.name == "malaria_cells.cache"]
    assert len(messages) == 2 and messages[1].startswith("... and 2 more unreadable images")

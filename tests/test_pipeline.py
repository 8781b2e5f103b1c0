"""The classify pipeline: input order, per-image errors, fixed batches, cancelling, laziness."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import quench
from conftest import NUM_CLASSES, TINY_BUILD, make_image
from quench.imaging import Normalizer, load_pixels
from quench.model import Model
from quench.pipeline import Prediction


@pytest.fixture(scope="module")
def model(tiny_artifact: Path) -> Iterator[Model]:
    m = quench.load(str(tiny_artifact))
    yield m
    m.close()


@pytest.fixture(scope="module")
def fixed_model(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tiny_labels: Path
) -> Iterator[Model]:
    from quench.builder import build

    out = tmp_path_factory.mktemp("fixed") / "tiny-b4.quench"
    build(tiny_model, out, labels=str(tiny_labels), batch=4, **TINY_BUILD)
    m = quench.load(str(out))
    yield m
    m.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """15 good images (various sizes/formats) and 5 bad files."""
    d = tmp_path_factory.mktemp("pipeline-images")
    good = [
        make_image(d / f"good{i:02d}.{'png' if i % 3 == 0 else 'jpg'}", (30 + 5 * i, 60 - 2 * i), i)
        for i in range(15)
    ]
    empty = d / "empty.jpg"
    empty.write_bytes(b"")
    text = d / "text.jpg"
    text.write_text("not an image\n")
    data = good[1].read_bytes()
    truncated = d / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    missing = d / "missing.jpg"
    folder = d / "folder.png"
    folder.mkdir()
    return {"good": good, "bad": [empty, text, truncated, missing, folder]}


def expected(model: Model, path: Path | bytes, topk: int = 5) -> tuple[list[int], np.ndarray]:
    """Top-k classes and scores straight from predict() on normalised pixels."""
    norm = Normalizer(model.data)
    scores = model.scores(model.predict(norm.batch([load_pixels(path, model.data)])))[0]
    order = np.argsort(-scores, kind="stable")[:topk]
    return [int(c) for c in order], scores[order]


def assert_same(a: Prediction, b: Prediction) -> None:
    assert a.source == b.source
    assert a.error == b.error
    assert a.classes == b.classes
    assert a.names == b.names
    np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-5)


def interleave(good: list[Path], bad: list[Path]) -> list[Path]:
    out: list[Path] = []
    it = iter(bad)
    for i, g in enumerate(good):
        out.append(g)
        if i % 3 == 1:
            out.append(next(it))
    return out


def test_results_in_input_order(model: Model, files: dict[str, list[Path]]) -> None:
    paths = interleave(files["good"], files["bad"])
    assert len(paths) == 20
    preds = model.classify(paths, topk=5, batch_size=3, workers=2)
    assert [p.source for p in preds] == [str(p) for p in paths]
    bad = {str(p) for p in files["bad"]}
    for path, pred in zip(paths, preds, strict=True):
        if str(path) in bad:
            assert not pred.ok and pred.classes == []
            assert str(path) in pred.error
            continue
        assert pred.ok
        cls, scores = expected(model, path)
        assert pred.classes == cls
        assert pred.names == [f"class-{c}" for c in cls]
        np.testing.assert_allclose(pred.scores, scores, rtol=0, atol=1e-5)
        assert pred.scores == sorted(pred.scores, reverse=True)
        (single,) = model.classify([path], topk=5)
        assert_same(single, pred)
    # the images are really different: not every image gets the same answer
    assert len({tuple(p.classes) for p in preds if p.ok}) > 1


def test_error_reasons(model: Model, files: dict[str, list[Path]]) -> None:
    empty, text, truncated, missing, folder = files["bad"]
    preds = model.classify([empty, text, truncated, missing, folder])
    reasons = ["empty", "not an image", "truncated", "no such file", "directory"]
    for path, pred, reason in zip(files["bad"], preds, reasons, strict=True):
        assert pred.error is not None and str(path) in pred.error and reason in pred.error
        assert pred.to_dict() == {"file": str(path), "error": pred.error}


def test_bad_file_does_not_shift_batch(model: Model, files: dict[str, list[Path]]) -> None:
    good = files["good"][:8]
    alone = model.classify(good, batch_size=4, workers=2)
    mixed_paths = [*good[:2], files["bad"][2], *good[2:5], files["bad"][0], *good[5:]]
    mixed = model.classify(mixed_paths, batch_size=4, workers=2)
    assert [p.ok for p in mixed] == [True, True, False, True, True, True, False, True, True, True]
    for a, b in zip(alone, [p for p in mixed if p.ok], strict=True):
        assert_same(a, b)


def test_fixed_batch_padding(
    model: Model, fixed_model: Model, files: dict[str, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert fixed_model.fixed_batch == 4 and model.fixed_batch is None
    shapes: list[tuple[int, ...]] = []
    runner = fixed_model.runner
    orig = runner.infer

    def infer(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shapes.extend(v.shape for v in feed.values())
        return orig(feed)

    monkeypatch.setattr(runner, "infer", infer)
    paths = files["good"][:7]
    fixed = fixed_model.classify(paths, batch_size=2)  # ignored: the model's batch is fixed
    assert shapes == [(4, 3, 32, 32), (4, 3, 32, 32)]  # 4 + 3 padded to 4
    dynamic = model.classify(paths)
    assert len(fixed) == 7
    for a, b in zip(fixed, dynamic, strict=True):
        assert_same(a, b)


def test_bytes_inputs(model: Model, files: dict[str, list[Path]]) -> None:
    good = files["good"][:3]
    blobs = [p.read_bytes() for p in good]
    preds = model.classify([blobs[0], b"garbage bytes", blobs[1], blobs[2]])
    assert [p.source for p in preds] == ["<image 0>", "<image 1>", "<image 2>", "<image 3>"]
    assert not preds[1].ok and "not an image" in preds[1].error
    for blob, path, pred in zip(blobs, good, [preds[0], preds[2], preds[3]], strict=True):
        cls, scores = expected(model, blob)
        assert pred.classes == cls
        np.testing.assert_allclose(pred.scores, scores, atol=1e-5)
        (by_path,) = model.classify([path])
        assert by_path.classes == pred.classes


def test_empty_and_topk(model: Model, files: dict[str, list[Path]]) -> None:
    assert model.classify([]) == []
    assert list(model.iter_classify(iter([]))) == []
    path = files["good"][0]
    (all_,) = model.classify([path], topk=50)
    assert len(all_.classes) == NUM_CLASSES and sorted(all_.classes) == list(range(NUM_CLASSES))
    assert sum(all_.scores) == pytest.approx(1.0, abs=1e-5)  # softmax over every class
    (one,) = model.classify([path], topk=1)
    assert one.classes == all_.classes[:1] and one.names == all_.names[:1]
    assert one.scores == pytest.approx(all_.scores[:1], abs=1e-6)
    (three,) = model.classify([path], topk=3)
    assert three.classes == all_.classes[:3]
    with pytest.raises(ValueError, match="topk"):
        model.classify([path], topk=0)


def _decode_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("quench-decode")]


def test_cancel_stops_decode_threads(model: Model, files: dict[str, list[Path]]) -> None:
    assert _decode_threads() == []
    gen = model.iter_classify([files["good"][3]] * 200, batch_size=4, workers=2)
    first = next(gen)
    assert first.ok
    assert _decode_threads()  # the workers are running
    started = time.monotonic()
    gen.close()
    while _decode_threads() and time.monotonic() - started < 2.0:
        time.sleep(0.02)
    assert _decode_threads() == []


def test_cancel_by_break(model: Model, files: dict[str, list[Path]]) -> None:
    n = 0
    for _ in model.iter_classify([files["good"][4]] * 200, batch_size=4, workers=2):
        n += 1
        break
    assert n == 1
    started = time.monotonic()
    while _decode_threads() and time.monotonic() - started < 2.0:
        time.sleep(0.02)
    assert _decode_threads() == []


def test_source_is_pulled_lazily(model: Model, files: dict[str, list[Path]]) -> None:
    pulled = 0
    total = 500

    def source() -> Iterator[Path]:
        nonlocal pulled
        for i in range(total):
            pulled += 1
            yield files["good"][i % 5]

    prefetch, batch = 6, 4
    gen = model.iter_classify(source(), batch_size=batch, workers=2, prefetch=prefetch)
    first = next(gen)
    assert first.ok
    assert 1 <= pulled <= prefetch + batch
    for _ in range(batch):  # the second batch: still bounded
        next(gen)
    assert pulled <= prefetch + 2 * batch
    gen.close()
    assert pulled < total

"""Image lists, ground-truth files, top-1/top-5 scoring and result files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from quench.errors import QuenchError
from quench.evaluate import (
    EvalResult,
    GroundTruth,
    NoImagesError,
    expand_inputs,
    list_images,
    read_ground_truth,
    score,
    write_result_dir,
)
from quench.pipeline import Prediction

# -- list_images -----------------------------------------------------------------------------


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_list_images_folder_is_recursive_and_skips_non_images(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    wanted = [
        _touch(root / "a.jpg"),
        _touch(root / "B.PNG"),
        _touch(root / "sub" / "c.jpeg"),
        _touch(root / "sub" / "deep" / "d.webp"),
        _touch(root / "sub" / "e.bmp"),
        _touch(root / "x.tiff"),
        _touch(root / "folder.jpg" / "f.gif"),  # an image inside a folder named like one
    ]
    for junk in ("notes.txt", "model.onnx", "sub/a.jpg.bak", "sub/deep/README", ".hidden"):
        _touch(root / junk)
    got = list_images(root)
    assert got == sorted(wanted)
    assert root / "folder.jpg" not in got
    assert list_images(tmp_path / "imgs" / "sub" / "deep") == [root / "sub" / "deep" / "d.webp"]


def test_list_images_empty_folder(tmp_path: Path) -> None:
    _touch(tmp_path / "only.txt")
    assert list_images(tmp_path) == []


def test_list_images_from_a_list_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative entries must not depend on the working directory
    absolute = tmp_path / "abs" / "z.jpg"
    listing = lists / "val.txt"
    listing.write_text(
        "# validation images\n"
        "img/a.jpg\n"
        "\n"
        "   img/b.png   \n"
        f"{absolute}\n"
        "  # indented comment\n"
        "img/c.jpg\t3\n"
        "img/d.jpg,4\n"
        "../up.jpg\n"
    )
    assert list_images(listing) == [
        lists / "img" / "a.jpg",
        lists / "img" / "b.png",
        absolute,
        lists / "img" / "c.jpg",
        lists / "img" / "d.jpg",
        lists / ".." / "up.jpg",
    ]


def test_list_images_errors(tmp_path: Path) -> None:
    with pytest.raises(QuenchError, match="no such folder or list file") as exc:
        list_images(tmp_path / "missing.txt")
    assert str(tmp_path / "missing.txt") in str(exc.value)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(QuenchError, match="cannot read image list"):
        list_images(binary)


def test_expand_inputs(tmp_path: Path) -> None:
    a = _touch(tmp_path / "d" / "a.jpg")
    b = _touch(tmp_path / "d" / "s" / "b.png")
    _touch(tmp_path / "d" / "c.txt")
    single = tmp_path / "given.xyz"  # files given explicitly are kept whatever their suffix
    assert expand_inputs([single, tmp_path / "d"]) == [single, a, b]


# -- read_ground_truth -----------------------------------------------------------------------


def test_ground_truth_tsv_with_header(tmp_path: Path) -> None:
    gt = tmp_path / "gt" / "val.tsv"
    gt.parent.mkdir()
    gt.write_text("file\tlabel\nimg/a.jpg\t3\nimg/b.jpg\t7\n\n# comment\nc.png\t0\n")
    truth = read_ground_truth(gt)
    assert truth.get(tmp_path / "gt" / "img" / "a.jpg") == 3
    assert truth.get(tmp_path / "gt" / "img" / "b.jpg") == 7
    assert truth.get(tmp_path / "gt" / "c.png") == 0  # 0 is a label, not "missing"
    # same bare file name somewhere else: matched by name
    assert truth.get(tmp_path / "elsewhere" / "b.jpg") == 7
    assert truth.get(tmp_path / "gt" / "img" / "zzz.jpg") is None
    assert len(truth.by_path) == 3


def test_ground_truth_csv(tmp_path: Path) -> None:
    gt = tmp_path / "val.csv"
    gt.write_text("a.jpg,1\nsub/b.jpg, 2\n/data/c.jpg,999\n")
    truth = read_ground_truth(gt)
    assert truth.get(tmp_path / "a.jpg") == 1
    assert truth.get(tmp_path / "sub" / "b.jpg") == 2
    assert truth.get(Path("/data/c.jpg")) == 999


def test_ground_truth_imagenet_space_form(tmp_path: Path) -> None:
    gt = tmp_path / "val.txt"
    gt.write_text(
        "ILSVRC2012_val_00000001.JPEG 65\nILSVRC2012_val_00000002.JPEG   970\nmy photo.jpg 5\n"
    )
    truth = read_ground_truth(gt)
    assert truth.get(tmp_path / "ILSVRC2012_val_00000001.JPEG") == 65
    assert truth.get(Path("/val/ILSVRC2012_val_00000002.JPEG")) == 970
    assert truth.get(tmp_path / "my photo.jpg") == 5


def test_ground_truth_duplicate_names_need_the_path(tmp_path: Path) -> None:
    gt = tmp_path / "gt.tsv"
    gt.write_text("x/a.jpg\t1\ny/a.jpg\t2\n")
    truth = read_ground_truth(gt)
    assert truth.get(tmp_path / "x" / "a.jpg") == 1
    assert truth.get(tmp_path / "y" / "a.jpg") == 2
    assert truth.get(tmp_path / "z" / "a.jpg") is None  # ambiguous by name


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("file\tlabel\na.jpg\t1\nb.jpg\tcat\n", 3),
        ("a.jpg\t1\nb.jpg\n", 2),
        ("a.jpg 1\nb.jpg 2\nc.jpg 1.5\n", 3),
        ("a.jpg,1\n,\n", 2),
    ],
)
def test_ground_truth_bad_line(tmp_path: Path, text: str, line: int) -> None:
    gt = tmp_path / "bad.tsv"
    gt.write_text(text)
    with pytest.raises(QuenchError) as exc:
        read_ground_truth(gt)
    assert str(exc.value).startswith(f"{gt}:{line}: expected 'file<TAB>class_index'")


def test_ground_truth_empty_or_missing(tmp_path: Path) -> None:
    empty = tmp_path / "empty.tsv"
    empty.write_text("file\tlabel\n\n# nothing\n")
    with pytest.raises(QuenchError, match="no labels found"):
        read_ground_truth(empty)
    with pytest.raises(QuenchError, match="cannot read labels"):
        read_ground_truth(tmp_path / "missing.tsv")


# -- scoring ---------------------------------------------------------------------------------


@pytest.fixture
def handmade(tmp_path: Path) -> tuple[Path, list[Prediction]]:
    gt = tmp_path / "gt.tsv"
    gt.write_text("a.jpg\t1\nb.jpg\t2\nc.jpg\t3\nd.jpg\t4\nf.jpg\t0\n")
    src = {n: str(tmp_path / n) for n in ("a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg")}
    preds = [
        Prediction(src["a.jpg"], [1, 0, 5, 6, 7]),  # top-1 hit
        Prediction(src["b.jpg"], [2, 9, 8, 7, 6]),  # top-1 hit
        Prediction(src["c.jpg"], [0, 1, 2, 5, 3]),  # top-5 hit at rank 5
        Prediction(src["e.jpg"], [1, 2, 3, 4, 5]),  # no ground truth
        Prediction(src["d.jpg"], [0, 1, 2, 3, 5, 4]),  # label is 6th: a miss
        Prediction(src["f.jpg"], error=f"{src['f.jpg']}: not an image"),  # unreadable
    ]
    return gt, preds


def test_top1_top5_exact(handmade: tuple[Path, list[Prediction]], tmp_path: Path) -> None:
    gt, preds = handmade
    res = score(preds, read_ground_truth(gt))
    assert (res.top1, res.top5) == (0.5, 0.75)
    assert (res.evaluated, res.correct1, res.correct5) == (4, 2, 3)
    assert res.failed == [f"{tmp_path / 'f.jpg'}: not an image"]
    assert res.unlabeled == [str(tmp_path / "e.jpg")]
    assert [(r["file"], r["label"], r["top1_correct"], r["top5_correct"]) for r in res.rows] == [
        (str(tmp_path / "a.jpg"), 1, True, True),
        (str(tmp_path / "b.jpg"), 2, True, True),
        (str(tmp_path / "c.jpg"), 3, False, True),
        (str(tmp_path / "d.jpg"), 4, False, False),
    ]
    assert res.rows[3]["top5"] == [0, 1, 2, 3, 5]
    assert res.summary() == {
        "top1": 0.5,
        "top5": 0.75,
        "images": 4,
        "correct_top1": 2,
        "correct_top5": 3,
        "failed": 1,
        "unlabeled": 1,
    }


def test_score_with_nothing_evaluable(tmp_path: Path) -> None:
    gt = tmp_path / "gt.tsv"
    gt.write_text("a.jpg\t1\n")
    preds = [Prediction(str(tmp_path / "a.jpg"), error="broken"), Prediction("b.jpg", [1])]
    with pytest.raises(QuenchError, match="no image could be evaluated"):
        score(preds, read_ground_truth(gt))


def test_write_result_dir(handmade: tuple[Path, list[Prediction]], tmp_path: Path) -> None:
    gt, preds = handmade
    res = score(preds, read_ground_truth(gt))
    out = write_result_dir(res, tmp_path / "results" / "run1", {"model": "tiny", "engine": "ort"})
    assert out == tmp_path / "results" / "run1"
    assert sorted(p.name for p in out.iterdir()) == [
        "eval.json",
        "labels.txt",
        "top1.txt",
        "top5.txt",
    ]
    a, b, c, d = (str(tmp_path / n) for n in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"))
    assert (out / "labels.txt").read_text() == f"{a}\t1\n{b}\t2\n{c}\t3\n{d}\t4\n"
    assert (out / "top1.txt").read_text() == f"{a}\t1\t1\n{b}\t2\t1\n{c}\t0\t0\n{d}\t0\t0\n"
    assert (out / "top5.txt").read_text() == (
        f"{a}\t1 0 5 6 7\t1\n{b}\t2 9 8 7 6\t1\n{c}\t0 1 2 5 3\t1\n{d}\t0 1 2 3 5\t0\n"
    )
    assert json.loads((out / "eval.json").read_text()) == {
        "model": "tiny",
        "engine": "ort",
        "top1": 0.5,
        "top5": 0.75,
        "images": 4,
        "correct_top1": 2,
        "correct_top5": 3,
        "failed": 1,
        "unlabeled": 1,
    }


def test_write_result_dir_overwrites(tmp_path: Path) -> None:
    first = EvalResult(1.0, 1.0, 1, 1, 1, rows=[])
    (tmp_path / "labels.txt").write_text("stale\n")
    write_result_dir(first, tmp_path, {})
    assert (tmp_path / "labels.txt").read_text() == ""
    assert json.loads((tmp_path / "eval.json").read_text())["images"] == 1


# -- hardening -------------------------------------------------------------------------------


def test_ground_truth_not_utf8_is_one_line(tmp_path: Path) -> None:
    gt = tmp_path / "gt.tsv"
    gt.write_bytes(b"a.jpg\t1\nb\xff\xfe.jpg\t2\n")
    with pytest.raises(QuenchError) as exc:
        read_ground_truth(gt)
    msg = str(exc.value)
    assert msg.startswith(f"{gt}: cannot read labels: not UTF-8 text") and "\n" not in msg


def test_ground_truth_and_image_list_that_are_fifos_are_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "gt.tsv"
    os.mkfifo(fifo)
    with pytest.raises(QuenchError, match="not a regular file"):
        read_ground_truth(fifo)
    with pytest.raises(QuenchError, match="not a regular file"):
        list_images(fifo)


def test_negative_class_index_is_refused(tmp_path: Path) -> None:
    gt = tmp_path / "gt.tsv"
    gt.write_text("file\tlabel\na.jpg\t3\nb.jpg\t-1\n")
    with pytest.raises(QuenchError, match=rf"^{gt}:3: class index -1 is negative$"):
        read_ground_truth(gt)


def test_class_index_out_of_the_models_range(tmp_path: Path) -> None:
    gt = tmp_path / "gt.tsv"
    gt.write_text("a.jpg\t3\nb.jpg\t1000\nc.jpg\t1000\nd.jpg\t7\n")
    truth = read_ground_truth(gt)
    truth.check_classes(1001)
    with pytest.raises(QuenchError) as exc:
        truth.check_classes(1000)
    assert str(exc.value) == (
        f"{gt}:2: class index 1000 is out of range for a model with 1000 classes (0..999)"
    )


def test_no_readable_image_lists_the_reasons() -> None:
    preds = [Prediction("a.jpg", error="a.jpg: empty file"), Prediction("b.jpg", error="b: x")]
    truth = GroundTruth({}, {"a.jpg": 1, "b.jpg": 2})
    with pytest.raises(NoImagesError) as exc:
        score(preds, truth)
    assert exc.value.failed == ["a.jpg: empty file", "b: x"]
    assert "2 unreadable" in str(exc.value)


def test_write_result_dir_over_a_file_is_one_line(tmp_path: Path) -> None:
    res = EvalResult(1.0, 1.0, 1, 1, 1, rows=[])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "labels.txt").mkdir()  # cannot be opened for writing
    with pytest.raises(QuenchError, match="cannot write results"):
        write_result_dir(res, tmp_path / "out", {})

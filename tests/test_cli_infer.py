"""``quench infer``: bad files are reported and skipped, every valid image is classified."""

from __future__ import annotations

import csv
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import NUM_CLASSES, make_image
from quench.cli import app

runner = CliRunner()


def good_images(d: Path, n: int = 4) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    return [make_image(d / f"good{i}.jpg", (40 + 9 * i, 50 - 4 * i), seed=i) for i in range(n)]


@pytest.fixture
def messy(tmp_path: Path) -> tuple[Path, list[Path], dict[Path, str]]:
    """The issue's folder: good images, a 1x1 PNG, a 10000x10 JPEG, and three bad files."""
    d = tmp_path / "photos"
    good = good_images(d)
    tiny = d / "tiny.png"
    Image.new("RGB", (1, 1), (200, 30, 60)).save(tiny)
    wide = d / "wide.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (10, 10000, 3), dtype=np.uint8)).save(wide)
    data = good[0].read_bytes()
    truncated = d / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    text = d / "readme.jpg"
    text.write_text("this is a text file\n")
    empty = d / "empty.jpg"
    empty.write_bytes(b"")
    bad = {truncated: "truncated", text: "not an image", empty: "empty"}
    return d, [*good, tiny, wide], bad


def test_infer_reports_bad_files_and_classifies_the_rest(
    tiny_artifact: Path, messy: tuple[Path, list[Path], dict[Path, str]], tmp_path: Path
) -> None:
    folder, valid, bad = messy
    out = tmp_path / "results.jsonl"
    res = runner.invoke(app, ["infer", str(tiny_artifact), str(folder), "--output", str(out)])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_file = {r["file"]: r for r in rows}
    assert len(rows) == len(valid) + len(bad) == len(by_file)
    assert [r["file"] for r in rows] == sorted(by_file)  # folder order: sorted
    for p in valid:
        top = by_file[str(p)]["top"]
        assert "error" not in by_file[str(p)]
        assert len(top) == 5
        assert [t["name"] for t in top] == [f"class-{t['class']}" for t in top]
        assert all(0 <= t["class"] < NUM_CLASSES for t in top)
        scores = [t["score"] for t in top]
        assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1
    for p, reason in bad.items():
        entry = by_file[str(p)]
        assert "top" not in entry
        assert str(p) in entry["error"] and reason in entry["error"]

    stderr_lines = res.stderr.splitlines()
    for p, reason in bad.items():
        hits = [ln for ln in stderr_lines if str(p) in ln]
        assert len(hits) == 1, res.stderr
        assert reason in hits[0] and "skipped" in hits[0]
    for p in valid:
        assert str(p) not in res.stderr
    assert f"classified {len(valid)} of {len(valid) + len(bad)} images, 3 failed" in res.stderr


def test_infer_good_images_exit_zero(tiny_artifact: Path, tmp_path: Path) -> None:
    imgs = good_images(tmp_path / "ok", 3)
    res = runner.invoke(app, ["infer", str(tiny_artifact), *map(str, imgs)])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    for p in imgs:
        i = lines.index(str(p))
        ranks = lines[i + 1 : i + 6]
        for rank, line in enumerate(ranks):
            assert re.fullmatch(rf"  {rank} \[class-\d\] class \d score \d\.\d{{4}}", line), line
    assert len(lines) == 3 * 6
    assert "classified 3 of 3 images" in res.stderr
    assert "skipped" not in res.stderr


def test_infer_text_output_matches_api(tiny_artifact: Path, tmp_path: Path) -> None:
    import quench

    (img,) = good_images(tmp_path / "one", 1)
    res = runner.invoke(app, ["infer", str(tiny_artifact), str(img), "--topk", "3"])
    assert res.exit_code == 0, res.output
    with quench.load(str(tiny_artifact)) as m:
        (pred,) = m.classify([img], topk=3)
    assert res.stdout.splitlines() == [str(img)] + [
        f"  {r} [{n}] class {c} score {s:.4f}"
        for r, (c, n, s) in enumerate(zip(pred.classes, pred.names, pred.scores, strict=True))
    ]
    assert f"0 [class-{pred.classes[0]}]" in res.stdout


def test_infer_csv_output(tiny_artifact: Path, tmp_path: Path) -> None:
    imgs = good_images(tmp_path / "csv", 2)
    bad = tmp_path / "csv" / "broken.png"
    bad.write_text("nope")
    out = tmp_path / "x.csv"
    res = runner.invoke(
        app, ["infer", str(tiny_artifact), *map(str, [*imgs, bad]), "-o", str(out), "--topk", "3"]
    )
    assert res.exit_code == 1
    with out.open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == [
        "file",
        "error",
        *[f"{k}{i}" for i in (1, 2, 3) for k in ("class", "name", "score")],
    ]
    assert [r[0] for r in rows[1:]] == [str(p) for p in [*imgs, bad]]
    for r in rows[1:3]:
        assert r[1] == "" and len(r) == 11
        assert r[3] == f"class-{r[2]}" and r[6] == f"class-{r[5]}"
        assert float(r[4]) >= float(r[7]) >= float(r[10]) > 0
    assert str(bad) in rows[3][1] and "not an image" in rows[3][1] and len(rows[3]) == 2


def test_infer_json_lines(tiny_artifact: Path, tmp_path: Path) -> None:
    imgs = good_images(tmp_path / "json", 3)
    res = runner.invoke(app, ["infer", str(tiny_artifact), str(tmp_path / "json"), "--json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["file"] for r in rows] == [str(p) for p in imgs]
    assert all(len(r["top"]) == 5 for r in rows)
    res3 = runner.invoke(app, ["infer", str(tiny_artifact), str(imgs[0]), "--json", "--topk", "3"])
    (row,) = [json.loads(line) for line in res3.stdout.splitlines()]
    assert row["top"] == rows[0]["top"][:3]


def test_infer_quiet_prints_nothing(tiny_artifact: Path, tmp_path: Path) -> None:
    imgs = good_images(tmp_path / "quiet", 2)
    res = runner.invoke(app, ["infer", str(tiny_artifact), *map(str, imgs), "-q"])
    assert res.exit_code == 0
    assert res.stdout == "" and res.stderr == ""


def _one_line_error(res: object, path: Path, reason: str) -> None:
    assert res.exit_code == 1  # type: ignore[attr-defined]
    assert isinstance(res.exception, SystemExit)  # type: ignore[attr-defined]
    out = res.output  # type: ignore[attr-defined]
    assert "Traceback" not in out
    lines = res.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1, out
    assert lines[0].startswith("error: ") and str(path) in lines[0] and reason in lines[0]
    assert res.stdout == ""  # type: ignore[attr-defined]


def test_infer_missing_artifact(tmp_path: Path) -> None:
    (img,) = good_images(tmp_path / "imgs", 1)
    missing = tmp_path / "nope.quench"
    res = runner.invoke(app, ["infer", str(missing), str(img)])
    _one_line_error(res, missing, "no such")


@pytest.mark.parametrize("kind", ["text", "truncated", "zip-without-manifest"])
def test_infer_corrupt_artifact(tiny_artifact: Path, tmp_path: Path, kind: str) -> None:
    (img,) = good_images(tmp_path / "imgs", 1)
    bad = tmp_path / "bad.quench"
    if kind == "text":
        bad.write_text("not an artifact\n")
    elif kind == "truncated":
        data = tiny_artifact.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        with zipfile.ZipFile(bad, "w") as zf:
            zf.writestr("something.txt", "hello")
    res = runner.invoke(app, ["infer", str(bad), str(img)])
    _one_line_error(res, bad, "")


def test_infer_no_images(tiny_artifact: Path, tmp_path: Path) -> None:
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    res = runner.invoke(app, ["infer", str(tiny_artifact), str(empty)])
    assert res.exit_code == 1
    assert "no images" in res.stderr and "Traceback" not in res.output


def test_names_with_brackets_are_printed_verbatim(tiny_artifact: Path, tmp_path: Path) -> None:
    """File names are not rich markup: '[draft]' or '[bold]' must survive in messages."""
    d = tmp_path / "brackets"
    d.mkdir()
    good = make_image(d / "ok[red].jpg", seed=1)
    bad = d / "photo[draft].jpg"
    bad.write_bytes(b"")
    res = runner.invoke(app, ["infer", str(tiny_artifact), str(d)])
    assert res.exit_code == 1
    assert f"skipped: {bad}: empty file" in res.stderr
    assert str(good) in res.stdout
    missing = tmp_path / "[bold]model.quench"
    res = runner.invoke(app, ["infer", str(missing), str(good)])
    _one_line_error(res, missing, "no such artifact file")


def test_ctrl_c_keeps_partial_results(tmp_path: Path, tiny_artifact: Path) -> None:
    """SIGINT mid-run: exits 130 promptly, says so, and the results so far are in the file."""
    import signal
    import subprocess
    import sys
    import time

    big = make_image(tmp_path / "big.png", (1200, 900), seed=1)  # slow enough to interrupt
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(3000):
        (folder / f"{i:05d}.png").symlink_to(big)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "quench", "infer", str(tiny_artifact), str(folder)]
    proc = subprocess.Popen(
        [*cmd, "--json", "-q", "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    seen = [proc.stdout.readline() for _ in range(20)]  # results are flowing
    assert all(json.loads(line)["top"] for line in seen)
    proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    rest, stderr = proc.communicate(timeout=20)
    assert time.monotonic() - started < 10
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    printed = len(seen) + len(rest.splitlines())
    assert printed < 3000  # it really stopped early
    lines = out.read_text().splitlines()
    assert len(lines) >= printed - 1  # written before printed, file flushed on the way out
    assert all("top" in json.loads(line) for line in lines)


def test_fifo_and_device_among_inputs_do_not_hang(tiny_artifact: Path, tmp_path: Path) -> None:
    """`mkfifo d/x.jpg; quench infer ART d/ /dev/zero`: both are reported (not opened), the
    rest classified. Run as a process with a timeout: opening the FIFO would block forever."""
    import os
    import subprocess
    import sys

    d = tmp_path / "d"
    good = good_images(d, 2)
    os.mkfifo(d / "x.jpg")
    (d / "corrupt.jpg").write_bytes(good[0].read_bytes()[:300])
    cmd = [sys.executable, "-m", "quench", "infer", str(tiny_artifact), str(d), "/dev/zero"]
    try:
        res = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=120)
    finally:
        os.close(os.open(d / "x.jpg", os.O_RDWR))  # release a blocked reader, if any
    assert res.returncode == 1, res.stderr
    assert f"skipped: {d / 'x.jpg'}: not a regular file (a FIFO)" in res.stderr
    assert "skipped: /dev/zero: not a regular file (a character device)" in res.stderr
    assert f"skipped: {d / 'corrupt.jpg'}: " in res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert sorted(r["file"] for r in rows) == sorted(map(str, good))
    assert "classified 2 of 5 images, 3 failed" in res.stderr


@pytest.mark.parametrize(
    ("where", "reason"),
    [
        ("missing/x.jsonl", "cannot write there: the folder"),
        (".", "is a folder"),
        ("out.xlsx", "unknown output format '.xlsx'; use .csv, .json, .jsonl, .tsv"),
        ("noformat", "unknown output format '(no suffix)'"),
    ],
)
def test_bad_output_path_is_refused_before_any_work(
    tmp_path: Path, where: str, reason: str
) -> None:
    (img,) = good_images(tmp_path / "imgs", 1)
    out = tmp_path / where
    # the artifact does not even exist: the output is checked first
    res = runner.invoke(app, ["infer", str(tmp_path / "none.quench"), str(img), "-o", str(out)])
    _one_line_error(res, out, reason)
    assert not (tmp_path / "missing").exists()

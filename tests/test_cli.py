"""The ``quench`` command line, driven through typer's CliRunner."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

import quench
from conftest import NUM_CLASSES, make_image
from quench.cli import app
from quench.evaluate import list_images
from quench.model import Model

runner = CliRunner()


def invoke(*args: object, env: dict[str, str] | None = None) -> Result:
    return runner.invoke(app, [str(a) for a in args], env=env)


def _one_error_line(res: Result) -> str:
    assert res.exit_code == 1, (res.stdout, res.stderr)
    assert isinstance(res.exception, SystemExit)  # a clean exit, not a crash
    assert "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# -- help and version ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], ["build", "infer", "eval", "fetch", "info", "zoo", "--version"]),
        (["build"], ["--preset", "--dynamic-batch", "--mean", "--layout", "--output"]),
        (["infer"], ["--topk", "--output", "--json"]),
        (["eval"], ["--images", "--labels", "--result-dir"]),
        (["fetch"], ["--url", "--force", "--timeout"]),
        (["info"], ["--json", "artifact"]),
        (["zoo"], ["list", "synth"]),
        (["zoo", "list"], ["--json"]),
        (["zoo", "synth"], ["--output", "--seed"]),
    ],
)
def test_help(args: list[str], expected: list[str]) -> None:
    res = invoke(*args, "--help")
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.stdout
    assert f"root {' '.join(args)}".strip() in res.stdout
    for word in expected:
        assert word in res.stdout, word


def test_no_arguments_shows_help() -> None:
    res = invoke()
    assert res.exit_code in (0, 2)
    assert "Usage:" in res.output and "build" in res.output


def test_version() -> None:
    res = invoke("--version")
    assert res.exit_code == 0
    assert res.stdout == f"quench {quench.__version__}\n"


def test_zoo_list() -> None:
    res = invoke("zoo", "list")
    assert res.exit_code == 0
    names = [line.split()[0] for line in res.stdout.splitlines()]
    assert {"resnet50-v1-7", "efficientnet-lite0"} <= set(names)
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("efficientnet-lite0"))
    assert "crop 224" in line and "mean [127.5, 127.5, 127.5]" in line
    rows = json.loads(invoke("zoo", "list", "--json").stdout)
    by_name = {r["name"]: r for r in rows}
    assert by_name["resnet50-v1-7"]["input"] == "data"
    assert by_name["resnet50-v1-7"]["url"].endswith("resnet50-v1-7.onnx")
    assert by_name["efficientnet-lite0"]["preprocess"]["std"] == [128.0, 128.0, 128.0]


# -- build and info --------------------------------------------------------------------------

FLAGS = [
    "--preset",
    "imagenet",
    "--resize",
    "36",
    "--crop",
    "32",
    "--mean",
    "120,115,100",
    "--std",
    "60",
    "--engine",
    "onnxruntime",
]


@pytest.fixture(scope="module")
def cli_artifact(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tiny_labels: Path
) -> tuple[Path, Result]:
    out = tmp_path_factory.mktemp("cli") / "tiny.quench"
    res = invoke("build", tiny_model, "-o", out, *FLAGS, "--labels", tiny_labels, "--json")
    return out, res


def test_build_then_info(cli_artifact: tuple[Path, Result], tiny_model: Path) -> None:
    out, res = cli_artifact
    assert res.exit_code == 0, res.output
    assert out.is_file()
    built = json.loads(res.stdout)
    assert "preset: imagenet (named)" in res.stderr
    assert f"wrote {out}" in res.stderr

    info = invoke("info", out, "--json")
    assert info.exit_code == 0, info.output
    d = json.loads(info.stdout)
    assert d == built
    assert d["path"] == str(out)
    assert d["preprocess"] == {
        "resize": 36,
        "crop": 32,
        "interpolation": "bilinear",
        "mean": [120.0, 115.0, 100.0],
        "std": [60.0, 60.0, 60.0],
        "channel_order": "RGB",
        "layout": "NCHW",
    }
    assert d["classes"] == NUM_CLASSES
    assert d["batch"] == {"policy": "dynamic", "size": None}
    assert d["precision"]["mode"] == "force_float32"
    assert d["source"]["file"] == tiny_model.name
    assert d["quench_version"] == quench.__version__
    assert Model.load(out).labels == [f"class-{i}" for i in range(NUM_CLASSES)]

    text = invoke("info", out)
    assert text.exit_code == 0
    rows = dict(line.split(None, 1) for line in text.stdout.splitlines())
    assert rows["classes"] == str(NUM_CLASSES)
    assert json.loads(rows["preprocess"])["mean"] == [120.0, 115.0, 100.0]


def test_build_fixed_batch(tmp_path: Path, tiny_model: Path, tiny_labels: Path) -> None:
    out = tmp_path / "b2.quench"
    res = invoke(
        "build", tiny_model, "-o", out, *FLAGS, "--labels", tiny_labels, "-q", "--batch", 2
    )
    assert res.exit_code == 0, res.output
    assert res.stderr == "" and res.stdout == ""  # quiet and no --json
    assert json.loads(invoke("info", out, "--json").stdout)["batch"] == {
        "policy": "fixed",
        "size": 2,
    }


def test_batch_and_dynamic_batch_conflict(tmp_path: Path, tiny_model: Path) -> None:
    out = tmp_path / "x.quench"
    res = invoke("build", tiny_model, "-o", out, *FLAGS, "--batch", "2", "--dynamic-batch")
    assert res.exit_code == 2  # a usage error
    assert "--batch and --dynamic-batch exclude each other" in res.stderr
    assert "Traceback" not in res.output
    assert not out.exists()


@pytest.mark.parametrize(
    ("flag", "value", "phrase"),
    [
        ("--mean", "1,2", "--mean takes one or three numbers, got 2"),
        ("--std", "a,b,c", "--std takes three numbers"),
    ],
)
def test_build_bad_numbers(
    tmp_path: Path, tiny_model: Path, flag: str, value: str, phrase: str
) -> None:
    res = invoke("build", tiny_model, "-o", tmp_path / "x.quench", flag, value)
    assert phrase in _one_error_line(res)


def test_build_errors_are_one_line(tmp_path: Path, tiny_model: Path, tiny_labels: Path) -> None:
    line = _one_error_line(invoke("build", tmp_path / "missing.onnx", "-o", tmp_path / "x.quench"))
    assert f"{tmp_path / 'missing.onnx'}: no such model file" in line
    res = invoke(
        "build",
        tiny_model,
        "-o",
        tmp_path / "x.quench",
        "-q",
        "--crop",
        40,
        "--labels",
        tiny_labels,
    )
    assert "expected [N, 3, 40, 40]" in _one_error_line(res)
    assert not (tmp_path / "x.quench").exists()


def test_info_on_a_damaged_artifact(tmp_path: Path, cli_artifact: tuple[Path, Result]) -> None:
    blob = bytearray(cli_artifact[0].read_bytes())
    blob[40] ^= 0xFF  # inside the compressed manifest
    bad = tmp_path / "bad.quench"
    bad.write_bytes(blob)
    assert str(bad) in _one_error_line(invoke("info", bad))
    assert "no such artifact file" in _one_error_line(invoke("info", tmp_path / "none.quench"))


# -- eval ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_predictions(cli_artifact: tuple[Path, Result], image_dir: Path) -> dict[Path, list[int]]:
    """Top-5 classes the model itself gives each image: ground truth with top-1 = 1.0."""
    paths = list_images(image_dir)
    with Model.load(cli_artifact[0], threads=1) as model:
        preds = model.classify(paths, topk=5)
    assert all(p.ok for p in preds)
    return {Path(p.source): p.classes for p in preds}


def _truth(path: Path, rows: dict[Path, int], header: bool = True) -> Path:
    path.write_text(
        ("file\tlabel\n" if header else "") + "".join(f"{p.name}\t{c}\n" for p, c in rows.items())
    )
    return path


def test_eval_perfect(
    tmp_path: Path,
    cli_artifact: tuple[Path, Result],
    image_dir: Path,
    own_predictions: dict[Path, list[int]],
) -> None:
    gt = _truth(tmp_path / "gt.tsv", {p: c[0] for p, c in own_predictions.items()})
    res = invoke("eval", cli_artifact[0], "--images", image_dir, "--labels", gt, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    n = len(own_predictions)
    assert n == 7
    assert {k: out[k] for k in ("top1", "top5", "images", "failed", "unlabeled")} == {
        "top1": 1.0,
        "top5": 1.0,
        "images": n,
        "failed": 0,
        "unlabeled": 0,
    }
    assert out["model"] == "imagenet" and out["artifact"] == str(cli_artifact[0])

    text = invoke("eval", cli_artifact[0], "--images", image_dir, "--labels", gt, "--batch", 3)
    assert text.exit_code == 0
    assert "top-1 1.0000  top-5 1.0000  (7 images)" in text.stdout


def test_eval_one_wrong_label_and_result_dir(
    tmp_path: Path,
    cli_artifact: tuple[Path, Result],
    image_dir: Path,
    own_predictions: dict[Path, list[int]],
) -> None:
    rows = {p: c[0] for p, c in own_predictions.items()}
    first = sorted(rows)[0]
    wrong = (rows[first] + 1) % NUM_CLASSES
    rows[first] = wrong
    gt = _truth(tmp_path / "gt.txt", rows, header=False)
    results = tmp_path / "results"
    res = invoke(
        "eval", cli_artifact[0], "--images", image_dir, "--labels", gt, "--json",
        "--result-dir", results,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    n = len(rows)
    top5_hit = wrong in own_predictions[first]
    assert out["top1"] == pytest.approx((n - 1) / n)
    assert out["correct_top1"] == n - 1
    assert out["top5"] == pytest.approx((n - 1 + top5_hit) / n)

    assert sorted(p.name for p in results.iterdir()) == [
        "eval.json",
        "labels.txt",
        "top1.txt",
        "top5.txt",
    ]
    assert json.loads((results / "eval.json").read_text()) == out
    labels = [line.split("\t") for line in (results / "labels.txt").read_text().splitlines()]
    assert {(Path(f), int(c)) for f, c in labels} == set(rows.items())
    top1 = [line.split("\t") for line in (results / "top1.txt").read_text().splitlines()]
    assert [(Path(f), int(ok)) for f, _, ok in top1 if ok == "0"] == [(first, 0)]
    top5 = [line.split("\t") for line in (results / "top5.txt").read_text().splitlines()]
    assert len(top5) == n
    for f, classes, _ in top5:
        assert [int(c) for c in classes.split()] == own_predictions[Path(f)]


def test_eval_with_unreadable_images(
    tmp_path: Path,
    cli_artifact: tuple[Path, Result],
    image_dir: Path,
    own_predictions: dict[Path, list[int]],
) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    truncated = make_image(tmp_path / "cut.png", seed=9)
    truncated.write_bytes(truncated.read_bytes()[:60])
    listing = tmp_path / "list.txt"
    good = sorted(own_predictions)
    listing.write_text("\n".join(str(p) for p in [good[0], broken, *good[1:], truncated]) + "\n")
    rows = {p: c[0] for p, c in own_predictions.items()} | {broken: 1, truncated: 2}
    gt = _truth(tmp_path / "gt.tsv", rows)

    res = invoke("eval", cli_artifact[0], "--images", listing, "--labels", gt, "--json")
    assert res.exit_code == 1
    assert "Traceback" not in res.output
    out = json.loads(res.stdout)
    assert (out["images"], out["failed"], out["top1"]) == (len(good), 2, 1.0)
    skipped = [line for line in res.stderr.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 2
    assert str(broken) in skipped[0] and str(truncated) in skipped[1]


def test_eval_bad_ground_truth(
    tmp_path: Path, cli_artifact: tuple[Path, Result], image_dir: Path
) -> None:
    gt = tmp_path / "gt.tsv"
    gt.write_text("img0.jpg\t1\nimg1.jpg\tone\n")
    res = invoke("eval", cli_artifact[0], "--images", image_dir, "--labels", gt)
    assert f"{gt}:2: expected" in _one_error_line(res)


# -- fetch -----------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fetch_unreachable(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/x.onnx"
    cache = tmp_path / "cache"
    res = invoke("fetch", "--url", url, "--timeout", 5, env={"QUENCH_CACHE": str(cache)})
    line = _one_error_line(res)
    assert "--model" in line
    assert url in line and "resnet50-v1-7" in line
    assert str(cache / "models" / "resnet50-v1-7.onnx") in line
    assert res.stdout == ""
    assert not (cache / "models" / "resnet50-v1-7.onnx").exists()
    assert not (cache / "models" / "resnet50-v1-7.onnx.part").exists()


def test_fetch_unknown_preset(tmp_path: Path) -> None:
    res = invoke("fetch", "resnet18", env={"QUENCH_CACHE": str(tmp_path)})
    assert "unknown preset 'resnet18'" in _one_error_line(res)


def test_info_shows_engine_selection(tmp_path: Path, tiny_model: Path, tiny_labels: Path) -> None:
    out = tmp_path / "m.quench"
    assert (
        invoke("build", tiny_model, "-o", out, *FLAGS, "--labels", tiny_labels, "-q").exit_code == 0
    )
    d = json.loads(invoke("info", out, "--json").stdout)
    assert d["engine_selection"]["chosen"] == "onnxruntime"
    assert "engine_selection" in invoke("info", out).stdout


def test_numpy_blas_on_one_thread_in_the_command_not_on_import() -> None:
    """A threaded OpenBLAS call can spin forever when another thread forks (OpenVINO's
    conversion does, for telemetry): the ``quench`` command and Quench's NumPy-heavy steps keep
    NumPy's BLAS on one thread; importing quench leaves the host process as it was."""
    code = "\n".join(
        [
            "import numpy, threadpoolctl",
            "def blas():",
            "    info = threadpoolctl.threadpool_info()",
            "    return sorted({i['num_threads'] for i in info if i['user_api'] == 'blas'})",
            "before = blas()",
            "import quench, quench.model, quench.builder, quench.cli",
            "assert blas() == before, (blas(), before)",
            "from quench.hw import one_blas_thread",
            "with one_blas_thread():",
            "    inside = blas()",
            "assert blas() == before, (blas(), before)",
            "quench.cli.app(['zoo', 'list'], standalone_mode=False)",
            "print(inside, blas())",
        ]
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[1] [1]", out


# -- hardening: output paths and labels, checked before the work -----------------------------


@pytest.mark.parametrize(
    ("where", "reason"),
    [("", "is a folder; give a file name"), ("missing/dir/x.quench", "the folder")],
)
def test_build_output_checked_first(tmp_path: Path, where: str, reason: str) -> None:
    out = tmp_path / where if where else tmp_path
    # the model does not exist either: the output path is checked before anything else
    line = _one_error_line(invoke("build", tmp_path / "none.onnx", "-o", out))
    assert str(out) in line and reason in line, line
    assert not (tmp_path / "missing").exists()  # no folders created


def test_build_into_a_missing_folder_creates_nothing(tmp_path: Path, tiny_model: Path) -> None:
    out = tmp_path / "a" / "b" / "x.quench"
    line = _one_error_line(invoke("build", tiny_model, "-o", out, *FLAGS, "-q"))
    assert f"{out}: cannot write there: the folder {out.parent} does not exist" in line
    assert not (tmp_path / "a").exists()


def test_eval_result_dir_that_is_a_file(
    tmp_path: Path, cli_artifact: tuple[Path, Result], image_dir: Path
) -> None:
    f = tmp_path / "results"
    f.write_text("not a folder")
    gt = _truth(tmp_path / "gt.tsv", {image_dir / "img0.jpg": 1})
    line = _one_error_line(
        invoke("eval", cli_artifact[0], "--images", image_dir, "--labels", gt, "--result-dir", f)
    )
    assert line == f"error: {f}: exists and is not a folder"


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        (b"img0.jpg\t1\nimg1.jpg\t\xff2\n", "cannot read labels: not UTF-8 text"),
        (b"img0.jpg\t1\nimg1.jpg\t10\n", ":2: class index 10 is out of range for a model with 10"),
        (b"img0.jpg\t-3\n", ":1: class index -3 is negative"),
    ],
)
def test_eval_bad_labels_are_one_line(
    tmp_path: Path, cli_artifact: tuple[Path, Result], image_dir: Path, content: bytes, phrase: str
) -> None:
    gt = tmp_path / "gt.tsv"
    gt.write_bytes(content)
    line = _one_error_line(invoke("eval", cli_artifact[0], "--images", image_dir, "--labels", gt))
    assert str(gt) in line and phrase in line, line


def test_eval_with_no_readable_image_lists_them(
    tmp_path: Path, cli_artifact: tuple[Path, Result]
) -> None:
    d = tmp_path / "bad"
    d.mkdir()
    (d / "a.jpg").write_bytes(b"not an image")
    (d / "b.png").write_bytes(b"")
    gt = _truth(tmp_path / "gt.tsv", {d / "a.jpg": 1, d / "b.png": 2})
    res = invoke("eval", cli_artifact[0], "--images", d, "--labels", gt, "-q")
    assert res.exit_code == 1 and "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert lines == [
        f"skipped: {d / 'a.jpg'}: not an image (unrecognised format)",
        f"skipped: {d / 'b.png'}: empty file",
        "error: no image could be evaluated: none was both readable and labelled "
        "(2 unreadable, 0 without label)",
    ]


def test_eval_a_corrupt_image_loses_nothing_else(
    tmp_path: Path, cli_artifact: tuple[Path, Result], own_predictions: dict[Path, list[int]]
) -> None:
    d = tmp_path / "mixed"
    d.mkdir()
    rows = {}
    for p, classes in own_predictions.items():
        (d / p.name).write_bytes(p.read_bytes())
        rows[d / p.name] = classes[0]
    (d / "corrupt.jpg").write_bytes(next(iter(own_predictions)).read_bytes()[:200])
    gt = _truth(tmp_path / "gt.tsv", {**rows, d / "corrupt.jpg": 0})
    res = invoke("eval", cli_artifact[0], "--images", d, "--labels", gt, "--json", "-q")
    assert res.exit_code == 1
    out = json.loads(res.stdout)
    assert (out["images"], out["top1"], out["failed"]) == (len(rows), 1.0, 1)
    assert f"skipped: {d / 'corrupt.jpg'}: " in res.stderr


def test_perf_json_output_checked_first(tmp_path: Path) -> None:
    line = _one_error_line(
        invoke("perf", tmp_path / "none.quench", "--json", tmp_path / "no" / "p.json")
    )
    assert "cannot write there" in line


def test_sigterm_during_build_leaves_no_temporary_file(
    tmp_path: Path, tiny_model: Path, tiny_labels: Path
) -> None:
    """SIGTERM while the artifact is being written: exit 143, no .tmp file, no artifact."""
    import signal
    import time

    out = tmp_path / "x.quench"
    script = (
        "import sys, time\n"
        "from quench import artifact\n"
        "from quench.cli import app\n"
        "real = artifact._write\n"
        "def slow(zf, name, data, method):\n"
        "    real(zf, name, data, method)\n"
        "    if name.startswith('payload/'):\n"
        "        time.sleep(60)\n"
        "artifact._write = slow\n"
        "app(sys.argv[1:], prog_name='quench')\n"
    )
    args = ["build", str(tiny_model), "-o", str(out), *FLAGS, "--labels", str(tiny_labels), "-q"]
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".x.quench.*.tmp")):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the build never started writing"
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == []

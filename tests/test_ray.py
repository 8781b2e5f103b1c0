"""``--ray``: batch classification on Ray Data, on a local instance and a two-node cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_image
from quench.cli import app
from quench.errors import QuenchError
from quench.model import Model
from quench.ray.cluster import plan_pool
from quench.ray.inputs import resolve

needs_ray = pytest.mark.skipif(
    find_spec("ray") is None, reason='Ray is not installed: pip install "quench[ray]"'
)
runner = CliRunner()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 images in two folders, a corrupt one, and a list file naming some plus a missing one."""
    d = tmp_path_factory.mktemp("photos")
    (d / "a").mkdir()
    (d / "b").mkdir()
    for i in range(8):
        make_image(d / "a" / f"p{i}.jpg", size=(40 + 5 * i, 50), seed=10 + i)
    for i in range(4):
        make_image(d / "b" / f"q{i}.png", size=(60, 36 + 4 * i), seed=30 + i)
    (d / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (d / "list.txt").write_text("# some of b\nb/q0.png\nb/q1.png\t3\nb/gone.png\n")
    return d


def read_rows(folder: Path) -> dict[str, dict]:
    """Every result row in a --ray output folder (Parquet or JSON lines shards), by file."""
    import pyarrow.parquet as pq

    rows: list[dict] = []
    for f in sorted(folder.rglob("*")):
        if f.suffix == ".parquet":
            rows += pq.read_table(f).to_pylist()
        elif f.suffix == ".json":
            rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    by_file = {r["file"]: r for r in rows}
    assert len(by_file) == len(rows), "a file has two rows"
    return by_file


def assert_equal_to_local(rows: dict[str, dict], artifact: Path, topk: int = 5) -> None:
    """Class ids exactly, scores within 1e-5 of local ``Model.classify`` on the same files."""
    good = sorted(f for f, r in rows.items() if r["error"] is None)
    assert good
    with Model.load(artifact) as m:
        local = m.classify(good, topk=topk)
    for p in local:
        r = rows[p.source]
        assert p.ok, p.error
        assert [r[f"class{i}"] for i in range(1, topk + 1)] == p.classes
        assert [r[f"name{i}"] for i in range(1, topk + 1)] == p.names
        for i, s in enumerate(p.scores, 1):
            assert abs(r[f"score{i}"] - s) <= 1e-5


# -- without a cluster -----------------------------------------------------------------------


@pytest.mark.skipif(find_spec("fsspec") is None, reason="fsspec comes with quench[ray]")
def test_resolve_folders_lists_globs_and_uris(photos: Path) -> None:
    got = resolve([str(photos / "a"), str(photos / "list.txt"), f"file://{photos}/b/q3.*"])
    assert got.files[:9] == sorted(str(p) for p in (photos / "a").glob("*.jpg"))
    assert got.files[9:] == [
        str(photos / "b" / n) for n in ("q0.png", "q1.png", "gone.png", "q3.png")
    ]
    assert resolve([str(photos / "nope.jpg")]).missing == [str(photos / "nope.jpg")]
    assert resolve([f"{photos}/b/*.png"]).files == [
        str(photos / "b" / f"q{i}.png") for i in range(4)
    ]


@pytest.mark.parametrize(
    ("free", "actors", "want"),
    [
        (2.0, None, (2, 1)),
        (2.0, 1, (1, 2)),
        (1.0, None, (1, 1)),
        (8.0, 3, (3, 2)),
    ],
)
def test_pool_never_reserves_every_cpu(free: float, actors: int | None, want: tuple) -> None:
    n, threads, reserve = plan_pool(free, actors)
    assert (n, threads) == want
    assert 0 < reserve < threads  # room is left on every node for the read and write tasks
    assert n * reserve <= free


@pytest.mark.parametrize(("free", "actors"), [(0.4, None), (2.0, 3)])
def test_pool_that_cannot_start_is_refused(free: float, actors: int | None) -> None:
    with pytest.raises(QuenchError, match="free"):
        plan_pool(free, actors)


@pytest.mark.parametrize("command", ["infer", "eval", "serve"])
def test_without_ray_one_line_says_how_to_install(
    command: str, tiny_artifact: Path, image_dir: Path, tmp_path: Path
) -> None:
    truth = tmp_path / "gt.tsv"
    truth.write_text("img0.jpg\t1\n")
    args = {
        "infer": [str(image_dir), "--output", str(tmp_path / "o")],
        "eval": ["--images", str(image_dir), "--labels", str(truth)],
        "serve": ["--replicas", "2"],
    }[command]
    code = (
        "import sys; sys.modules['ray'] = None\n"  # as if Ray were not installed
        "import quench, quench.ray\n"
        "from quench.cli import app\n"
        "app(sys.argv[1:], prog_name='quench')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, command, str(tiny_artifact), *args, "--ray", "auto"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        'error: Ray is not installed: pip install "quench[ray]"'
    ]


def test_import_quench_ray_does_not_import_ray() -> None:
    code = "import sys, quench, quench.ray; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--format", "jsonl"], "--format and --actors go with --ray"),
        (["--ray", "auto"], "--ray needs --output"),
        (["--ray", "auto", "--output", "o", "--threads", "2"], "--threads does not go with --ray"),
    ],
)
def test_ray_flag_usage_errors(tiny_artifact: Path, image_dir: Path, args: list, words: str):
    res = runner.invoke(app, ["infer", str(tiny_artifact), str(image_dir), *args])
    assert res.exit_code == 2
    assert words in res.output


# -- on the local instance -------------------------------------------------------------------


@needs_ray
def test_infer_on_ray_equals_local(
    ray_local: object, tiny_artifact: Path, photos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "results"
    args = [str(photos / "a"), str(photos / "list.txt"), f"{photos}/b/q3.*"]
    res = runner.invoke(
        app, ["infer", str(tiny_artifact), *args, "--ray", "auto", "-o", str(out), "--json", "-q"]
    )
    assert res.exit_code == 1, res.output  # two files failed
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["files"] == 13 and summary["ok"] == 11 and summary["failed"] == 2
    assert summary["skipped"] == 0 and summary["images_per_s"] > 0
    rows = read_rows(out)
    assert len(rows) == 13 and all(Path(f).is_absolute() for f in rows)
    broken, gone = str(photos / "a" / "broken.jpg"), str(photos / "b" / "gone.png")
    assert rows[broken]["error"].startswith(f"{broken}: ")
    assert rows[broken]["class1"] is None
    assert rows[gone]["error"] == f"{gone}: no such file"
    assert_equal_to_local(rows, tiny_artifact)
    assert list(rows[broken]) == ["file", "error"] + [
        f"{c}{i}" for i in range(1, 6) for c in ("class", "name", "score")
    ]  # the columns of `quench infer --output x.csv`


@needs_ray
def test_infer_reads_and_writes_s3(
    ray_local: object, s3_endpoint: str | None, tiny_artifact: Path, photos: Path, tmp_path: Path
) -> None:
    """s3:// in and out, through a local S3 server (moto) set up as a user points boto3,
    s3fs and pyarrow at an S3-compatible store ($AWS_ENDPOINT_URL and credentials)."""
    if s3_endpoint is None:
        pytest.skip("moto and s3fs make the local S3 server (the test extra installs them)")
    import boto3
    import s3fs

    boto3.client("s3").create_bucket(Bucket="photos")
    for f in sorted((photos / "a").iterdir()):
        boto3.client("s3").upload_file(str(f), "photos", f"in/{f.name}")
    args = ["infer", str(tiny_artifact), "s3://photos/in/", "--ray", "auto"]
    res = runner.invoke(app, [*args, "-o", "s3://photos/out/", "--json", "-q"])
    assert res.exit_code == 1, res.output  # broken.jpg
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert (summary["files"], summary["ok"], summary["failed"]) == (9, 8, 1)
    s3fs.S3FileSystem(skip_instance_cache=True).get(
        "photos/out/", f"{tmp_path}/out/", recursive=True
    )
    rows = read_rows(tmp_path / "out")
    assert set(rows) == {f"s3://photos/in/{f.name}" for f in (photos / "a").iterdir()}
    assert rows["s3://photos/in/broken.jpg"]["error"].startswith("s3://photos/in/broken.jpg: ")
    assert_equal_to_local(
        {str(photos / "a" / Path(k).name): r for k, r in rows.items()}, tiny_artifact
    )
    again = runner.invoke(app, [*args, "-o", "s3://photos/out/", "--json", "-q"])
    assert json.loads(again.stdout.strip().splitlines()[-1])["skipped"] == 9  # resumable on S3


@needs_ray
def test_rerun_skips_what_is_done(
    ray_local: object, tiny_artifact: Path, photos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "results"
    base = ["infer", str(tiny_artifact), "--ray", "auto", "-o", str(out), "--format", "jsonl"]
    first = runner.invoke(app, [*base[:2], str(photos / "b"), *base[2:], "--json", "-q"])
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["ok"] == 4
    (out / "crashed-shard.json").write_text('{"file": "/x.jpg", "err')  # a crash mid-write
    res = runner.invoke(app, [*base[:2], str(photos / "a"), str(photos / "b"), *base[2:], "--json"])
    assert res.exit_code == 1  # broken.jpg
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert (summary["files"], summary["skipped"], summary["ok"], summary["failed"]) == (13, 4, 8, 1)
    assert "crashed-shard.json: unreadable result shard" in res.stderr
    assert (out / "crashed-shard.json.incomplete").exists()
    rows = read_rows(out)
    assert len(rows) == 13
    assert_equal_to_local({f: r for f, r in rows.items() if "/a/" in f}, tiny_artifact)
    again = runner.invoke(
        app, [*base[:2], str(photos / "a"), str(photos / "b"), *base[2:], "--json"]
    )
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert (summary["skipped"], summary["ok"], summary["failed"]) == (13, 0, 0)
    assert len(read_rows(out)) == 13


@needs_ray
def test_eval_on_ray_equals_local(ray_local: object, tiny_artifact: Path, image_dir: Path) -> None:
    truth = image_dir.parent / f"{image_dir.name}-truth.tsv"
    truth.write_text(
        "".join(f"{p.name}\t{i % 3}\n" for i, p in enumerate(sorted(image_dir.iterdir())))
    )
    args = [
        "eval",
        str(tiny_artifact),
        "--images",
        str(image_dir),
        "--labels",
        str(truth),
        "--json",
    ]
    local = runner.invoke(app, args)
    on_ray = runner.invoke(app, [*args, "--ray", "auto", "--actors", "1", "-q"])
    assert local.exit_code == 0 and on_ray.exit_code == 0, on_ray.output
    a, b = json.loads(local.stdout), json.loads(on_ray.stdout)
    for key in ("top1", "top5", "images", "correct_top1", "correct_top5"):
        assert a[key] == b[key]


@needs_ray
def test_classify_dataset_chains(ray_local: object, tiny_artifact: Path, photos: Path) -> None:
    from quench.ray import classify_dataset

    ds = classify_dataset(tiny_artifact, [str(photos / "a")], topk=1, progress=False)
    rows = ds.filter(lambda r: r["error"] is None).take_all()
    assert len(rows) == 8
    assert set(rows[0]) == {"file", "error", "class1", "name1", "score1"}

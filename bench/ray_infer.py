#!/usr/bin/env python3
"""``quench infer`` on one host vs ``quench infer --ray``: images/s on the same artifact, batch
and files, and the results of a two-node cluster checked against local.

Runs, each as a user would (``quench`` commands in their own processes):

1. local ``quench infer ART FILES... --batch B -o local.jsonl`` (timed: the whole command);
2. ``--ray`` on a one-node cluster with every core of this machine (``ray start --head``, token
   auth), timed by the job itself (``--json``: from its start to its last shard written);
3. ``--ray`` on two nodes of one CPU each on this machine (``ray start --head`` plus
   ``ray start --address``);

each on the first ``--small`` images and on all of them, fitted to time = fixed + images / rate,
and every row of both clusters checked against local (class ids equal, scores within 1e-5);

then writes a section of BENCHMARKS.md (between ``<!-- ray_infer -->`` markers) with the
figures and a model of images/s against nodes.

    .venv/bin/python bench/ray_infer.py [--artifact A.quench] [--images val.txt] [--batch 8]
        [--md BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the clusters the tests make: same setup, same teardown

from common import timed_quench, write_section  # noqa: E402

from quench.evaluate import list_images  # noqa: E402
from raycluster import cluster_env, start_cluster, stop  # noqa: E402

SAMPLE = REPO.parent / "shared" / "data" / "imagenet-sample"
MARK = "<!-- ray_infer -->"


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def quench(args: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    seconds, done = timed_quench(args, env)
    if done.returncode not in (0, 1):
        raise SystemExit(f"quench {' '.join(args[:2])} failed:\n{done.stderr[-3000:]}")
    return seconds, done


def artifact(path: Path | None, work: Path, env: dict[str, str]) -> Path:
    """The given artifact, or the ResNet-50 replica built fp32 on ONNX Runtime."""
    if path:
        return path
    onnx, art = work / "resnet50.onnx", work / "resnet50.quench"
    say("building the ResNet-50 replica (fp32, onnxruntime)")
    quench(["zoo", "synth", "resnet50-v1-7", "-o", str(onnx)], env)
    quench(["build", str(onnx), "-o", str(art), "--engine", "onnxruntime", "-q"], env)
    return art


def ray_run(art: Path, images: Path, batch: int, address: str, out: Path, env: dict[str, str]):
    args = ["infer", str(art), str(images), "--batch", str(batch), "--ray", address]
    seconds, done = quench([*args, "-o", str(out), "--json", "-q"], env)
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise SystemExit(f"quench infer --ray printed no summary:\n{done.stderr[-3000:]}")
    return seconds, json.loads(lines[-1])


def compare(local: Path, out: Path) -> tuple[int, float]:
    """(rows compared, largest score difference); raises on a different class id."""
    import pyarrow.parquet as pq

    ref = {}
    for line in local.read_text().splitlines():
        d = json.loads(line)
        if "top" in d:
            ref[os.path.normpath(os.path.abspath(d["file"]))] = d["top"]
    rows = pq.read_table(out).to_pylist()
    worst = 0.0
    for r in rows:
        if r["error"] is not None:
            continue
        top = ref[r["file"]]
        ids = [r[f"class{i}"] for i in range(1, len(top) + 1)]
        if ids != [t["class"] for t in top]:
            raise SystemExit(f"{r['file']}: classes {ids} on Ray, {top} locally")
        for i, t in enumerate(top, 1):
            worst = max(worst, abs(r[f"score{i}"] - t["score"]))
    if len(rows) != len(ref):
        raise SystemExit(f"{len(rows)} rows on Ray, {len(ref)} classified locally")
    if worst > 1e-5:
        raise SystemExit(f"a score differs by {worst:.2e} from local (> 1e-5)")
    return len(rows), worst


def fit(small: int, t_small: float, n: int, t_n: float) -> dict[str, Any]:
    """time(images) = fixed + images / rate, through two runs of ``small`` and ``n`` images.
    ``rate`` is None when the longer run was not the slower one (start-up noise dominates:
    use more images)."""
    if t_n <= t_small:
        return {"rate": None, "fixed_s": None, "seconds": t_n}
    rate = (n - small) / (t_n - t_small)
    return {"rate": rate, "fixed_s": max(t_small - small / rate, 0.0), "seconds": t_n}


def num(v: float | None, fmt: str = ".1f") -> str:
    return "n/a" if v is None else format(v, fmt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", type=Path, help="default: the ResNet-50 replica, fp32")
    ap.add_argument("--images", type=Path, default=SAMPLE / "val.txt")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument(
        "--small",
        type=int,
        help="images of the shorter run (default: half): it should start up as the full run "
        "does (every actor busy), so the difference of the two is steady work",
    )
    ap.add_argument("--md", type=Path, default=REPO / "BENCHMARKS.md")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="quench-ray-bench-"))
    env = cluster_env(work)
    art = artifact(a.artifact, work, env)
    files = [str(Path(p).resolve()) for p in list_images(a.images)]
    n = len(files)
    k = min(a.small or n // 2, n - 1)
    short = work / "short.txt"
    short.write_text("\n".join(files[:k]) + "\n")
    figures: dict[str, Any] = {"images": n, "small": k, "batch": a.batch, "cores": os.cpu_count()}

    say(f"local quench infer: {k} then {n} images, batch {a.batch}")
    local_out = work / "local.jsonl"
    base = ["infer", str(art), "--batch", str(a.batch), "-q"]
    t_k, _ = quench([*base, *files[:k], "-o", str(work / "local-short.jsonl")], env)
    t_n, _ = quench([*base, *files, "-o", str(local_out)], env)
    figures["local"] = fit(k, t_k, n, t_n)

    for name, nodes in (("one_node", [os.cpu_count() or 1]), ("two_nodes", [1, 1])):
        say(f"--ray on {len(nodes)} node(s) of {nodes} CPUs: {k} then {n} images")
        address, marks = start_cluster(work / name[:3], nodes, env)  # short: socket paths
        try:
            _, small = ray_run(art, short, a.batch, address, work / f"{name}-short", env)
            s, summary = ray_run(art, a.images, a.batch, address, work / f"{name}-out", env)
            rows, worst = compare(local_out, work / f"{name}-out")
        finally:
            stop(marks)
        figures[name] = {
            **fit(k, small["seconds"], n, summary["seconds"]),
            "nodes": nodes,
            "actors": summary["actors"],
            "command_seconds": s,
            "rows_checked": rows,
            "max_score_diff": worst,
        }
    section = report(figures, a)
    (work / "figures.json").write_text(json.dumps(figures, indent=2))
    write_section(a.md, MARK, section)
    print(section)
    say(f"wrote the section to {a.md}; figures in {work / 'figures.json'}")


def report(f: dict[str, Any], a: argparse.Namespace) -> str:
    local, one, two = f["local"], f["one_node"], f["two_nodes"]
    n = f["images"]
    fitted = all(r["rate"] for r in (local, one, two))
    # per image, the CPU time the Ray path adds on the same cores (reads, object store, hand-off)
    overhead_ms = (
        (1 / one["rate"] - 1 / local["rate"]) * 1000 * (f["cores"] or 1) if fitted else None
    )
    per_cpu = two["rate"] / 2 if two["rate"] else None

    def row(name: str, r: dict[str, Any]) -> str:
        ratio = r["rate"] / local["rate"] if r["rate"] and local["rate"] else None
        return (
            f"| {name} | {n / r['seconds']:.1f} | {num(r['rate'])} | {num(r['fixed_s'])} | "
            f"{num(ratio, '.2f')}{'x' if ratio else ''} |"
        )

    lines = [
        MARK,
        "## Quench on Ray: `quench infer --ray` vs `quench infer`",
        "",
        f"Produced {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
        f"`.venv/bin/python bench/ray_infer.py --batch {a.batch}` on this machine "
        f"({f['cores']} cores): {n} images of `{a.images.name}`, batch {a.batch}, the same "
        f"artifact. Each row is two runs, {f['small']} images and {n}, fitted to "
        "time = fixed + images / rate: the rate is the steady throughput, the fixed part is "
        "starting up (local: loading the model; Ray: the job's actors loading the artifact).",
        "",
        f"| run | images/s over {n} images | steady images/s | fixed s | steady / local |",
        "|---|---:|---:|---:|---:|",
        row("local `quench infer`", local),
        row(f"`--ray`, one node of {one['nodes'][0]} CPUs, {one['actors']} actors", one),
        row(f"`--ray`, two nodes of 1 CPU on this machine, {two['actors']} actors", two),
        "",
        f"Both clusters' {n} rows equal local (class ids exact; largest score difference "
        f"{max(one['max_score_diff'], two['max_score_diff']):.1e}). Ray's figures are the "
        "job's own (`--json`: from its start to its last shard written); the command also "
        f"connects to the cluster ({one['command_seconds']:.1f} s and "
        f"{two['command_seconds']:.1f} s in all).",
        "",
        f"Model: through Ray a CPU classifies about {num(per_cpu)} images/s (two-node run), so "
        f"N nodes of C CPUs reach about {num(per_cpu)} x N x C images/s while the driver and "
        "the object store keep up, after a fixed start of "
        f"{num(two['fixed_s'], '.0f')} s; on one node the Ray path costs {num(overhead_ms)} ms "
        "of CPU per image more than local (reading the bytes into the object store, handing "
        "them to an actor, writing the shards). On a real cluster: `quench infer model.quench "
        "s3://bucket/images/ --ray HEAD:6379 -o s3://bucket/results/`.",
        MARK,
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""Batch classification on Ray Data: files read as bytes by Ray, classified by a pool of actors
that each load the artifact once, results written as sharded Parquet or JSON lines.

Each actor decodes and preprocesses with the same code as ``quench infer`` (``Model.iter_classify``
on the file bytes: ``quench.imaging`` and ``quench.pipeline``), so its results are local results.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from quench.errors import QuenchError
from quench.pipeline import Prediction
from quench.ray.cluster import (
    IO_CPUS,
    connect,
    free_cpus,
    load_shipped,
    plan_pool,
    put_artifact,
    require,
)
from quench.ray.inputs import Inputs, resolve, scheme_of

FORMATS = {"parquet": ".parquet", "jsonl": ".json"}
ROWS_PER_CALL = 64  # images handed to an actor per call (decoding overlaps inference within it)


def columns(k: int) -> list[str]:
    """The result columns: ``quench infer --output x.csv``'s (file, error, class/name/score
    per rank)."""
    return ["file", "error"] + [
        f"{c}{i}" for i in range(1, k + 1) for c in ("class", "name", "score")
    ]


def schema(k: int) -> Any:
    import pyarrow as pa

    types = {"class": pa.int64(), "name": pa.string(), "score": pa.float64()}
    fields = [pa.field("file", pa.string()), pa.field("error", pa.string())]
    for name in columns(k)[2:]:
        fields.append(pa.field(name, types[name.rstrip("0123456789")]))
    return pa.schema(fields)


def to_table(preds: list[Prediction], k: int) -> Any:
    """Predictions -> a result table (error rows have null classes)."""
    import pyarrow as pa

    cols: dict[str, list[Any]] = {c: [] for c in columns(k)}
    for p in preds:
        cols["file"].append(p.source)
        cols["error"].append(p.error)
        for i in range(k):
            ok = p.error is None
            cols[f"class{i + 1}"].append(p.classes[i] if ok else None)
            cols[f"name{i + 1}"].append(p.names[i] if ok else None)
            cols[f"score{i + 1}"].append(p.scores[i] if ok else None)
    return pa.Table.from_pydict(cols, schema=schema(k))


def from_row(row: dict[str, Any], k: int) -> Prediction:
    if row.get("error") is not None:
        return Prediction(row["file"], error=row["error"])
    return Prediction(
        row["file"],
        [int(row[f"class{i}"]) for i in range(1, k + 1)],
        [float(row[f"score{i}"]) for i in range(1, k + 1)],
        [row[f"name{i}"] for i in range(1, k + 1)],
    )


class Classifier:
    """The actor: loads the shipped artifact once, then classifies batches of file bytes."""

    def __init__(
        self, holder: list[Any], name: str, topk: int, batch: int | None, threads: int, check: str
    ) -> None:
        self.model = load_shipped(holder, name, threads, check)
        self.model.runner  # noqa: B018  (activate the engine now, not on the first batch)
        self.topk, self.batch, self.threads = topk, batch, threads
        self.k = min(topk, len(self.model.labels))

    def __call__(self, batch: Any) -> Any:
        files = [str(p) for p in batch.column("file").to_pylist()]
        data = batch.column("bytes").to_pylist()
        preds = []
        it = self.model.iter_classify(data, self.topk, self.batch, workers=self.threads)
        for file, p in zip(files, it, strict=True):
            p.source = file
            if p.error is not None:  # "<bytes>: reason" -> "FILE: reason"
                p.error = f"{file}: {p.error.split(': ', 1)[-1]}"
            preds.append(p)
        return to_table(preds, self.k)


def _with_scheme(batch: Any, prefix: str) -> Any:
    """Ray's ``path`` column (the path within its filesystem) -> the ``file`` URI."""
    import pyarrow as pa
    import pyarrow.compute as pc

    paths = batch.column("path")
    file = pc.binary_join_element_wise(pa.scalar(prefix), paths, "") if prefix else paths
    return pa.table({"file": file, "bytes": batch.column("bytes")})


def classify_dataset(
    artifact: str | Path,
    images: Iterable[str] | Inputs,
    topk: int = 5,
    batch_size: int | None = None,
    actors: int | None = None,
    rows_per_call: int = ROWS_PER_CALL,
    check: str = "auto",
    address: str | None = "auto",
    progress: bool = True,
) -> Any:
    """A Ray Dataset of results (columns :func:`columns`), one row per image: chain it, write
    it, or iterate it. ``images``: folders, list files, globs or files, local or any
    filesystem fsspec knows (or resolved :class:`~quench.ray.inputs.Inputs`). Files that do
    not exist are left out (see :func:`infer` for rows that say so)."""
    ray = connect(address)
    ray.data.DataContext.get_current().enable_progress_bars = progress
    inputs = images if isinstance(images, Inputs) else resolve([str(s) for s in images])
    if not inputs.files:
        raise QuenchError("no images found in the given paths")
    holder = put_artifact(artifact)
    n, threads, reserve = plan_pool(free_cpus(ray), actors)
    groups: dict[str, list[str]] = {}
    for f in inputs.files:  # one read per filesystem (Ray reads one filesystem per call)
        groups.setdefault(scheme_of(f), []).append(f)
    parts = []
    for scheme, files in groups.items():
        ds = ray.data.read_binary_files(
            files, include_paths=True, ignore_missing_paths=True, num_cpus=IO_CPUS
        )
        prefix = f"{scheme}://" if scheme else ""
        parts.append(
            ds.map_batches(
                _with_scheme,
                batch_format="pyarrow",
                fn_kwargs={"prefix": prefix},
                num_cpus=IO_CPUS,
            )
        )
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return ds.map_batches(
        Classifier,
        fn_constructor_args=(holder, str(artifact), topk, batch_size, threads, check),
        batch_size=rows_per_call,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=n),
        num_cpus=reserve,
    )


def classify(
    artifact: str | Path, images: Iterable[str] | Inputs, **options: Any
) -> Iterator[Prediction]:
    """Predictions for every image (in completion order), streamed from the cluster; then one
    with its error for each file that was not there."""
    require()
    inputs = images if isinstance(images, Inputs) else resolve([str(s) for s in images])
    seen: set[str] = set()
    if inputs.files:
        for row in classify_dataset(artifact, inputs, **options).iter_rows():
            seen.add(row["file"])
            yield from_row(row, sum(1 for c in row if c.startswith("class")))
    for f in [*inputs.files, *inputs.missing]:
        if f not in seen:
            yield Prediction(f, error=f"{f}: no such file")


@dataclass
class BatchResult:
    """What a ``--ray`` run did: ``files`` named, ``skipped`` (already in the output), then of
    the rest ``ok`` and ``failed`` (rows with an error), in ``seconds``."""

    output: str
    format: str
    files: int
    skipped: int
    ok: int
    failed: int
    seconds: float
    actors: int
    threads_per_actor: int

    @property
    def images_per_s(self) -> float:
        return (self.ok + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": round(self.images_per_s, 2)}


def _out_fs(output: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(output)


def shards(output: str, fmt: str) -> list[str]:
    """The result files in ``output`` (paths within its filesystem)."""
    fs, root = _out_fs(output)
    if not fs.exists(root):
        return []
    return sorted(p for p in fs.find(root) if p.endswith(FORMATS[fmt]))


def read_shard(fs: Any, path: str, fmt: str, columns_: list[str] | None = None) -> Any:
    """One result file as a pyarrow Table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as fh:
        if fmt == "parquet":
            return pq.read_table(fh, columns=columns_)
        rows = [json.loads(line) for line in fh.read().decode().splitlines() if line.strip()]
    table = pa.Table.from_pylist(rows) if rows else pa.table({"file": pa.array([], pa.string())})
    return table.select(columns_) if columns_ else table


def done_files(output: str, fmt: str, warn: Any = None) -> set[str]:
    """Files that already have a row in ``output``. An unreadable shard (a crash while it was
    written) is renamed ``*.incomplete`` so its files run again and the output stays readable."""
    fs, _ = _out_fs(output)
    done: set[str] = set()
    for path in shards(output, fmt):
        try:
            done.update(read_shard(fs, path, fmt, ["file"]).column("file").to_pylist())
        except Exception as exc:
            fs.mv(path, path + ".incomplete")
            if warn:
                warn(f"{path}: unreadable result shard, its files run again ({exc})")
    return done


def _count(output: str, fmt: str, paths: list[str]) -> tuple[set[str], int]:
    """(files, error rows) in the given shards."""
    fs, _ = _out_fs(output)
    files: set[str] = set()
    failed = 0
    for path in paths:
        t = read_shard(fs, path, fmt, ["file", "error"])
        files.update(t.column("file").to_pylist())
        failed += t.num_rows - t.column("error").null_count
    return files, failed


def infer(
    artifact: str | Path,
    images: Iterable[str],
    output: str,
    fmt: str = "parquet",
    topk: int = 5,
    batch_size: int | None = None,
    actors: int | None = None,
    address: str | None = "auto",
    check: str = "auto",
    progress: bool = True,
    warn: Any = None,
) -> BatchResult:
    """Classify ``images`` on a Ray cluster into result shards under ``output`` (a folder,
    local or any fsspec URI). Files already in ``output`` are skipped (rerun after a crash to
    finish); a file that cannot be read or decoded is a row with its ``error``."""
    if fmt not in FORMATS:
        raise QuenchError(f"--format must be parquet or jsonl, got {fmt!r}")
    ray = connect(address)
    inputs = resolve([str(s) for s in images])
    if not inputs.files and not inputs.missing:
        raise QuenchError("no images found in the given paths")
    done = done_files(output, fmt, warn)
    todo = Inputs([f for f in inputs.files if f not in done], inputs.missing)
    skipped = len(inputs.files) - len(todo.files)
    before = set(shards(output, fmt))
    n, threads, _ = plan_pool(free_cpus(ray), actors)
    t0 = time.perf_counter()
    if todo.files:
        ds = classify_dataset(
            artifact,
            todo,
            topk,
            batch_size,
            n,
            check=check,
            address=address,
            progress=progress,
        )
        write = ds.write_parquet if fmt == "parquet" else ds.write_json
        write(output, ray_remote_args={"num_cpus": IO_CPUS})
    written = [p for p in shards(output, fmt) if p not in before]
    seen, failed = _count(output, fmt, written)
    missing = [f for f in todo.files if f not in seen] + [m for m in todo.missing if m not in done]
    if missing:  # Ray's read leaves out files that are not there: they get their error rows
        from quench.model import Model

        k = min(topk, len(Model.load(artifact, check="off").labels))
        rows = [Prediction(m, error=f"{m}: no such file") for m in missing]
        table = to_table(rows, k)
        fs, root = _out_fs(output)
        fs.makedirs(root, exist_ok=True)
        name = f"{root.rstrip('/')}/missing-{uuid.uuid4().hex}{FORMATS[fmt]}"
        with fs.open(name, "wb") as fh:
            if fmt == "parquet":
                import pyarrow.parquet as pq

                pq.write_table(table, fh)
            else:
                fh.write("".join(json.dumps(r) + "\n" for r in table.to_pylist()).encode())
        failed += len(missing)
        seen.update(missing)
    seconds = time.perf_counter() - t0
    return BatchResult(
        output,
        fmt,
        len(inputs.files) + len(inputs.missing),
        skipped,
        len(seen) - failed,
        failed,
        round(seconds, 3),
        n,
        threads,
    )

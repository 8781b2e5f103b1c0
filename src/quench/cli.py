"""The ``quench`` command line: a thin layer over the Python API."""

from __future__ import annotations

import csv
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from quench import __version__, selfcheck, signing
from quench.artifact import load as artifact_load
from quench.builder import BuildOptions
from quench.builder import build as do_build
from quench.clock import core_clock
from quench.destination import check_file, check_folder
from quench.errors import QuenchError
from quench.evaluate import (
    NoImagesError,
    evaluate,
    expand_inputs,
    list_images,
    read_ground_truth,
    score,
    write_result_dir,
)
from quench.hw import clock_source, cpu_info, one_blas_thread, parse_cpus, pinned
from quench.model import Model
from quench.perf import (
    PERF_COLUMNS,
    ROUNDS,
    PerfResult,
    latency_line,
    load_inputs,
    peak_macs,
    perf_images,
    perf_model,
    perf_onnx,
    perf_row,
    startup,
    startup_line,
)
from quench.pipeline import Prediction
from quench.precision import NAMES as PRECISION_NAMES
from quench.presets import PRESETS
from quench.profile import profile_model
from quench.progress import Bar
from quench.run import TOPK, RunOptions, run_job
from quench.stats import CV_BOUND
from quench.zoo.fetch import fetch_model
from quench.zoo.sample import NAME as SAMPLE
from quench.zoo.sample import fetch_sample
from quench.zoo.synth import synth

app = typer.Typer(
    help="Build ONNX image classifiers into fast artifacts; classify, evaluate and benchmark them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
zoo_app = typer.Typer(help="Known models: list them, make offline replicas.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")

err = Console(stderr=True, highlight=False)
F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}", markup=True, soft_wrap=True)
    return typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """QuenchError -> one red line on stderr and exit code 1; Ctrl-C -> exit 130."""
    try:
        yield
    except QuenchError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None


@contextmanager
def sigterm_exits() -> Iterator[None]:
    """SIGTERM -> SystemExit(143) while the block runs, so its cleanup runs (a build's
    temporary file is removed) instead of the process vanishing."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (the CLI called from a library)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def info(msg: str) -> None:
    err.print(msg, soft_wrap=True, markup=False)


def _version(value: bool) -> None:
    if value:
        print(f"quench {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Quench: ONNX classifier -> fast artifact -> classify / eval / perf."""
    one_blas_thread()  # for the whole command: see quench.hw.one_blas_thread


# -- fetch / zoo ----------------------------------------------------------------------------


@app.command()
def fetch(
    name: Annotated[
        str, typer.Argument(help="Model name, e.g. resnet50-v1-7, or imagenet-sample.")
    ] = "resnet50-v1-7",
    url: Annotated[str | None, typer.Option(help="Download from this URL (a mirror).")] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Where to save (default: the cache).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Download again even if cached.")] = False,
    timeout: Annotated[float, typer.Option(help="Network timeout in seconds.")] = 30.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Download an official model (or `imagenet-sample`: 1,000 real ImageNet photos with
    ground truth, calib.txt and val.txt) into the cache, and check it."""
    if name == SAMPLE:
        with user_errors():
            s = fetch_sample(url=url, dest=output, force=force, timeout=timeout, progress=not quiet)
        doc = {
            "path": str(s.root),
            "images": s.images,
            "calib": str(s.calib),
            "val": str(s.val),
            "ground_truth": str(s.ground_truth),
            "cached": s.cached,
        }
        if as_json:
            print(json.dumps(doc))
        else:
            info(
                f"{'cached' if s.cached else 'downloaded'}: {s.images} images in {s.root}; "
                f"calibrate on {s.calib.name}, measure on {s.val.name} with {s.ground_truth.name}"
            )
            print(s.root)
        return
    with user_errors():
        res = fetch_model(
            name, url=url, dest=output, force=force, timeout=timeout, progress=not quiet
        )
    if as_json:
        print(
            json.dumps(
                {
                    "path": str(res.path),
                    "sha256": res.sha256,
                    "size": res.size,
                    "url": res.url,
                    "cached": res.cached,
                }
            )
        )
    else:
        info(
            f"{'cached' if res.cached else 'downloaded'}: {res.path} ({res.size:,} bytes, "
            f"sha256 {res.sha256})"
        )
        print(res.path)


@zoo_app.command("list")
def zoo_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the known model presets."""
    rows = [
        {
            "name": p.name,
            "input": p.input_name,
            "output": p.output_name,
            "preprocess": p.data.to_dict(),
            "url": p.url,
            "description": p.description,
        }
        for p in PRESETS.values()
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        d = r["preprocess"]
        print(
            f"{r['name']:<20} resize {d['resize']} crop {d['crop']} {d['interpolation']}, "
            f"mean {[round(v, 3) for v in d['mean']]} std {[round(v, 3) for v in d['std']]}"
            f"  {r['description']}"
        )


@zoo_app.command("synth")
def zoo_synth(
    name: Annotated[str, typer.Argument(help="Model to replicate, e.g. resnet50-v1-7.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the ONNX file.")],
    seed: Annotated[int, typer.Option(help="Seed of the synthetic weights.")] = 0,
) -> None:
    """Write a structurally identical replica with synthetic weights (offline, for speed)."""
    with user_errors():
        synth(name, output, seed=seed)
    info(f"wrote {output}: synthetic-weights replica of {name} (not for accuracy)")


# -- build ----------------------------------------------------------------------------------


def _names(text: str | None) -> tuple[str, ...]:
    """A comma-separated list of names (an empty one for None)."""
    return tuple(n.strip() for n in (text or "").split(",") if n.strip())


def _floats3(text: str | None, what: str) -> tuple[float, float, float] | None:
    if text is None:
        return None
    try:
        vals = tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise fail(f"--{what} takes three numbers, e.g. 123.675,116.28,103.53") from None
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise fail(f"--{what} takes one or three numbers, got {len(vals)}")
    return vals  # type: ignore[return-value]


@app.command()
def build(
    model: Annotated[Path, typer.Argument(help="The ONNX model.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The .quench artifact to write.")],
    precision: Annotated[
        str,
        typer.Option(help=" | ".join(PRECISION_NAMES) + " (see the README's precision table)."),
    ] = "force_float32",
    preset: Annotated[
        str | None, typer.Option(help="Model preset (see 'quench zoo list'); detected if omitted.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Model name (default: the preset's).")] = None,
    labels: Annotated[
        str | None, typer.Option(help="Label file (index<TAB>name or one per line).")
    ] = None,
    batch: Annotated[int | None, typer.Option(help="Fixed batch size.")] = None,
    dynamic_batch: Annotated[
        bool,
        typer.Option(
            "--dynamic-batch",
            help="Mutable batch size (the default where the model declares a symbolic batch "
            "and runs any); rewrites a Reshape that hard-codes the batch where that is checked "
            "to be exact.",
        ),
    ] = False,
    engine: Annotated[
        str,
        typer.Option(
            help="auto | onnxruntime | openvino | torch-cuda (auto: every engine that runs it, "
            "timed in interleaved rounds; the fastest beyond the noise, else the first in "
            "preference)."
        ),
    ] = "auto",
    select_budget: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="--engine auto: seconds of timing rounds at most (at least 3 rounds run); "
            "stops earlier once the ranking is clear.",
        ),
    ] = 30.0,
    threads: Annotated[
        int | None, typer.Option(help="Engine threads (default: all cores).")
    ] = None,
    mean: Annotated[str | None, typer.Option(help="Pixel mean, 0..255 units: R,G,B.")] = None,
    std: Annotated[str | None, typer.Option(help="Pixel std, 0..255 units: R,G,B.")] = None,
    resize: Annotated[int | None, typer.Option(help="Resize the shorter side to this.")] = None,
    crop: Annotated[int | None, typer.Option(help="Centre crop size.")] = None,
    interpolation: Annotated[
        str | None, typer.Option(help="bilinear|bicubic|nearest|lanczos")
    ] = None,
    channel_order: Annotated[str | None, typer.Option(help="RGB or BGR.")] = None,
    layout: Annotated[str | None, typer.Option(help="NCHW or NHWC.")] = None,
    input_kind: Annotated[
        str,
        typer.Option(
            "--input",
            help="The engine's input: float32 (normalised tensors, the default) or uint8 "
            "(N,H,W,3 RGB pixels; channel order, mean/std and layout folded into the engine "
            "graph: the pipeline skips its normalise step).",
        ),
    ] = "float32",
    calib_images: Annotated[
        str | None, typer.Option(help="INT8: calibration images (folder or list file).")
    ] = None,
    calib_count: Annotated[int, typer.Option(min=1, help="INT8: images to calibrate on.")] = 200,
    calib_method: Annotated[
        str | None,
        typer.Option(help="INT8: minmax | entropy | percentile | mse (default: percentile)."),
    ] = None,
    calib_cache: Annotated[
        str | None, typer.Option(help="INT8: calibration cache file to reuse / write.")
    ] = None,
    bias_correction: Annotated[
        bool | None,
        typer.Option("--bias-correction/--no-bias-correction", help="INT8: correct conv biases."),
    ] = None,
    float_first_layer: Annotated[
        bool | None,
        typer.Option(
            "--float-first-layer/--quantize-first-layer",
            help="INT8: keep the first conv in float, or quantize it on the pixel grid with "
            "GPTQ rounding (the default where the model starts with a plain conv: about 10% "
            "faster, as accurate by KL to fp32).",
        ),
    ] = None,
    target: Annotated[
        str,
        typer.Option(
            help="INT8: portable (7-bit weights, exact on every CPU: AVX2, AVX-512, VNNI, AMX, "
            "ARM) or native (8-bit weights where this CPU accumulates int8 in int32: VNNI, "
            "AMX, ARM; such an artifact loses accuracy on AVX2-class CPUs)."
        ),
    ] = "portable",
    fp16_compute: Annotated[
        bool,
        typer.Option(
            "--fp16-compute",
            help="force_float16: compute in float16 even where it is measured slower than "
            "float32 here (by default such a build stores float16 and computes float32).",
        ),
    ] = False,
    check_images: Annotated[
        str | None, typer.Option(help="Measure accuracy on these images at build time.")
    ] = None,
    check_labels: Annotated[
        str | None,
        typer.Option(help="Ground truth for --check-images (else: agreement with fp32)."),
    ] = None,
    max_top1_drop: Annotated[
        float | None, typer.Option(help="Fail the build if top-1 drops more (percentage points).")
    ] = None,
    min_top1_agreement: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Fail the build (nothing written) when its top-1 agreement with fp32 on "
            "calibration images held out of calibration is lower (random input without images). "
            "Default 0.8; bf16/fp16 builds with images 0.98.",
        ),
    ] = None,
    float_layers: Annotated[
        str | None,
        typer.Option(
            help="Layers (ONNX node names, comma separated; `quench diagnose` lists them) kept "
            "in float: INT8 builds, or fp32 inside a bf16/fp16 build."
        ),
    ] = None,
    int8_layers: Annotated[
        str | None,
        typer.Option(help="INT8: layers kept in INT8 whatever the repair finds (comma separated)."),
    ] = None,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair/--no-repair",
            help="INT8, bf16, fp16: when the build misses --min-top1-agreement or --max-top1-drop, "
            "keep its most sensitive layers in float (the fewest that pass) instead of failing.",
        ),
    ] = True,
    sign: Annotated[
        Path | None,
        typer.Option(
            "--sign",
            help="Sign the artifact with this Ed25519 private key (PEM, e.g. from "
            "'quench keygen'); 'quench verify --key' and 'quench serve --trusted-keys' check it.",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the manifest summary as JSON.")
    ] = False,
) -> None:
    """Check, optimise and convert an ONNX classifier into one .quench artifact."""
    if batch is not None and dynamic_batch:
        raise fail("--batch and --dynamic-batch exclude each other", code=2)  # usage error
    with user_errors(), sigterm_exits():
        check_file(output)
        key = signing.load_private_key(sign) if sign else None
        opts = BuildOptions(
            precision=precision,
            preset=preset,
            name=name,
            labels=labels,
            batch=batch,
            dynamic_batch=True if dynamic_batch else None,
            engine=engine,
            threads=threads,
            mean=_floats3(mean, "mean"),
            std=_floats3(std, "std"),
            resize=resize,
            crop=crop,
            interpolation=interpolation,
            channel_order=channel_order.upper() if channel_order else None,
            layout=layout.upper() if layout else None,
            input=input_kind.lower(),
            calib_images=calib_images,
            calib_count=calib_count,
            calib_method=calib_method,
            calib_cache=calib_cache,
            bias_correction=bias_correction,
            float_first_layer=float_first_layer,
            target=target,
            fp16_compute=fp16_compute,
            check_images=check_images,
            check_labels=check_labels,
            max_top1_drop=max_top1_drop,
            min_top1_agreement=min_top1_agreement,
            float_layers=_names(float_layers),
            int8_layers=_names(int8_layers),
            repair=repair,
            select_budget=select_budget,
            progress=not quiet,
        )
        m = do_build(model, output, opts, log=None if quiet else info, sign_key=key)
        if key is not None and not quiet:
            info(f"signed with Ed25519 key {signing.key_id(key.public_key())[:16]}")
    if as_json:
        print(json.dumps(m.describe(), indent=2))


@app.command()
def diagnose(
    model: Annotated[
        Path, typer.Argument(help="The ONNX model, or an INT8, bf16 or fp16 .quench artifact.")
    ],
    calib_images: Annotated[
        str | None,
        typer.Option(help="Calibration images (default for an artifact: those it was built on)."),
    ] = None,
    precision: Annotated[
        str,
        typer.Option(help="For an ONNX model: an INT8 mode, force_bfloat16 or force_float16."),
    ] = "qint8_mixed_float32",
    calib_count: Annotated[int, typer.Option(min=1, help="Images to calibrate on.")] = 200,
    check_images: Annotated[
        str | None, typer.Option(help="Also measure the top-1 drop on these images.")
    ] = None,
    check_labels: Annotated[
        str | None, typer.Option(help="Ground truth for --check-images (else: agreement).")
    ] = None,
    source: Annotated[
        Path | None, typer.Option(help="An artifact's source model, if not where it was built.")
    ] = None,
    preset: Annotated[str | None, typer.Option(help="Model preset (as for build).")] = None,
    labels: Annotated[
        str | None, typer.Option(help="Label file (index<TAB>name or one per line).")
    ] = None,
    mean: Annotated[str | None, typer.Option(help="Pixel mean, 0..255 units: R,G,B.")] = None,
    std: Annotated[str | None, typer.Option(help="Pixel std, 0..255 units: R,G,B.")] = None,
    resize: Annotated[int | None, typer.Option(help="Resize the shorter side to this.")] = None,
    crop: Annotated[int | None, typer.Option(help="Centre crop size.")] = None,
    engine: Annotated[
        str, typer.Option(help="Engine to profile a model with: openvino | onnxruntime.")
    ] = "openvino",
    top: Annotated[int | None, typer.Option(help="Print only the N most sensitive layers.")] = None,
    html_out: Annotated[
        Path | None, typer.Option("--html", help="Write a page with the plot and the table.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print every figure as JSON.")] = False,
) -> None:
    """Which layers cost accuracy: per layer, its precision, output SQNR against fp32, the
    sensitivity of the logits to it (only that layer in float) and its share of time."""
    from quench.builder import diagnose as dg

    with user_errors():
        if html_out is not None and html_out.is_dir():
            raise QuenchError(f"--html {html_out}: is a directory")
        manifest = built = None
        if model.suffix == ".quench":
            src, opts, manifest = dg.options_of(model, source)
            built = model
            if calib_images:
                opts = replace(opts, calib_images=calib_images, calib_count=calib_count)
        else:
            src = model
            opts = BuildOptions(
                precision=precision,
                preset=preset,
                labels=labels,
                mean=_floats3(mean, "mean"),
                std=_floats3(std, "std"),
                resize=resize,
                crop=crop,
                engine=engine,
                calib_images=calib_images,
                calib_count=calib_count,
            )
        opts = replace(
            opts, check_images=check_images, check_labels=check_labels, progress=not quiet
        )
        d = dg.diagnose(src, opts, built, manifest, say=None if quiet or as_json else info)
        if html_out is not None:
            png = dg.plot(d, html_out.with_suffix(".png"))
            html_out.write_text(dg.html(d, png))
    if as_json:
        print(json.dumps(d.to_dict(), indent=2))
        return
    table = Table(title=f"quench diagnose: {d.source} ({d.engine})", title_justify="left")
    for col in dg.COLUMNS:
        table.add_column(col, justify="left" if col in ("layer", "op", "precision") else "right")
    for row in dg.table(d, top):
        table.add_row(*(escape(c) for c in row))
    Console(width=max(120, Console().width)).print(table)
    every = f"all {d.reduced_to.upper()}"
    print(
        f"{every} against fp32 on {d.calibration['sensitivity_images']} calibration images: "
        f"KL {d.all_int8['kl']:.3g}, top-1 agreement {d.all_int8['top1_agreement']:.1%}"
    )
    if d.check:
        print(
            f"check images ({d.check['images']}, {d.check['measure']}): top-1 drop "
            f"{d.check['all_int8_top1_drop_points']:.2f} points {every}, "
            f"{d.check['engine_top1_drop_points']:.2f} with {d.engine}"
        )
    if d.ranking:
        kept = "fp32" if d.reduced_to != "int8" else "float"
        print(f"most sensitive: {', '.join(d.ranking[:5])} (keep in {kept}: --float-layers)")


# -- infer / eval ---------------------------------------------------------------------------


AcceptMismatch = Annotated[
    bool,
    typer.Option(
        "--accept-host-mismatch",
        help="Run the artifact even when it fails its self-check on this host (a CPU or engine "
        "unlike the build host's), with a warning.",
    ),
]


def _load(
    artifact: Path,
    threads: int | None = None,
    accept: bool = False,
    check: str = "auto",
    trusted_keys: dict[str, Any] | None = None,
) -> Any:
    """Load an artifact; its self-check runs where this host differs from the build host;
    with ``trusted_keys``, one not signed by any of them is refused first."""
    model = Model.load(
        artifact,
        threads=threads,
        check="warn" if accept else check,
        trusted_keys=trusted_keys,
    )
    result = model.selfcheck
    if result is not None and result.ran:
        if result.passed:
            info(f"{artifact}: {result.message}: passed")
        else:
            err.print(
                f"[yellow]warning:[/yellow] {escape(str(artifact))} fails its self-check on "
                f"this host, running anyway (--accept-host-mismatch): {escape(result.message)}",
                soft_wrap=True,
            )
    return model


OUTPUT_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")


def _writer(path: Path | None, topk: int) -> tuple[Callable[[Any], None], Callable[[], None]]:
    """A per-prediction writer for .jsonl/.json or .csv/.tsv output files."""
    if path is None:
        return (lambda p: None), (lambda: None)
    suffix = path.suffix.lower()
    fh = path.open("w", newline="")
    if suffix in (".csv", ".tsv"):
        w = csv.writer(fh, delimiter="\t" if suffix == ".tsv" else ",")
        w.writerow(
            ["file", "error"]
            + [f"{k}{i}" for i in range(1, topk + 1) for k in ("class", "name", "score")]
        )

        def write(p: Any) -> None:
            cells = [
                x
                for c, n, s in zip(p.classes, p.names, p.scores, strict=True)
                for x in (c, n, f"{s:.6f}")
            ]
            w.writerow([p.source, p.error or "", *cells])
    else:

        def write(p: Any) -> None:
            fh.write(json.dumps(p.to_dict()) + "\n")

    return write, fh.close


RayAddress = Annotated[
    str | None,
    typer.Option(
        "--ray",
        help="Run on a Ray cluster: 'auto' (the one on this machine or $RAY_ADDRESS, else a "
        "local instance) or its address (HOST:PORT). Needs quench's 'ray' extra.",
    ),
]
RayActors = Annotated[
    int | None,
    typer.Option(min=1, help="With --ray: inference actors (default: one per free CPU)."),
]


def _infer_ray(
    artifact: Path,
    images: list[str],
    output: str,
    fmt: str,
    topk: int,
    batch: int | None,
    address: str,
    actors: int | None,
    accept: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """``quench infer --ray``: quench.ray.infer, its summary, exit 1 when a file failed."""
    with user_errors():
        from quench.ray import infer as ray_infer

        res = ray_infer(
            artifact,
            images,
            output,
            fmt=fmt,
            topk=topk,
            batch_size=batch,
            actors=actors,
            address=address,
            check="warn" if accept else "auto",
            progress=not quiet,
            warn=info,
        )
    if as_json:
        print(json.dumps(res.to_dict()))
    elif not quiet:
        info(
            f"classified {res.ok} of {res.ok + res.failed} images on Ray "
            f"({res.actors} actors, {res.images_per_s:.1f} images/s)"
            + (f", {res.failed} failed" if res.failed else "")
            + (f", {res.skipped} already in {output}" if res.skipped else "")
            + f"; results in {output}"
        )
    if res.failed:
        raise typer.Exit(1)


@app.command()
def infer(
    artifact: Annotated[Path, typer.Argument(help="The .quench artifact.")],
    images: Annotated[
        list[str],
        typer.Argument(
            help="Image files or folders (with --ray also list files, globs and URIs such as "
            "s3://bucket/images/)."
        ),
    ],
    topk: Annotated[int, typer.Option(min=1, help="How many classes per image.")] = 5,
    batch: Annotated[int | None, typer.Option(min=1, help="Batch size (dynamic models).")] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            help="Write results: .jsonl or .csv/.tsv; with --ray a folder (or URI) of shards.",
        ),
    ] = None,
    threads: Annotated[int | None, typer.Option(help="Engine threads.")] = None,
    ray: RayAddress = None,
    fmt: Annotated[
        str | None, typer.Option("--format", help="With --ray: parquet (default) or jsonl.")
    ] = None,
    actors: RayActors = None,
    accept_host_mismatch: AcceptMismatch = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress, no top-k print.")
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print JSON lines to stdout (with --ray: the summary)."),
    ] = False,
) -> None:
    """Classify images: top-k class names per image. Unreadable files are reported, skipped."""
    if ray is None and (fmt is not None or actors is not None):
        raise fail("--format and --actors go with --ray", code=2)
    if ray is not None:
        if output is None:
            raise fail("--ray needs --output FOLDER (results are written as shards)", code=2)
        if threads is not None:
            raise fail("--threads does not go with --ray: each actor runs --actors' share", code=2)
        _infer_ray(
            artifact,
            images,
            output,
            fmt or "parquet",
            topk,
            batch,
            ray,
            actors,
            accept_host_mismatch,
            quiet,
            as_json,
        )
        return
    with user_errors():
        if output is not None:
            check_file(output, OUTPUT_SUFFIXES)
        model = _load(artifact, threads, accept_host_mismatch)
        paths = expand_inputs(images)
        if not paths:
            raise QuenchError("no images found in the given paths")
        write, close = _writer(Path(output) if output else None, topk)
        failed = 0
        show_bar = not quiet and len(paths) > 8
        try:
            with Bar("classifying", len(paths), enabled=show_bar) as bar:
                for p in model.iter_classify(paths, topk=topk, batch_size=batch):
                    bar.advance()
                    write(p)
                    if not p.ok:
                        failed += 1
                        err.print(
                            f"[yellow]skipped:[/yellow] {escape(p.error or '')}", soft_wrap=True
                        )
                    elif as_json:
                        print(json.dumps(p.to_dict()), flush=True)
                    elif not quiet and not (bar.shown and output):
                        print(p.text())
        finally:
            close()
    ok = len(paths) - failed
    if not quiet:
        info(
            f"classified {ok} of {len(paths)} images"
            + (f", {failed} failed" if failed else "")
            + (f"; results in {output}" if output else "")
        )
    if failed:
        raise typer.Exit(1)


@app.command("eval")
def eval_(
    artifact: Annotated[Path, typer.Argument(help="The .quench artifact.")],
    images: Annotated[
        str, typer.Option(help="Folder of images or a list file (with --ray also a glob or URI).")
    ],
    labels: Annotated[
        Path, typer.Option(help="Ground truth: 'file<TAB>index' (TSV/CSV) or 'file index' lines.")
    ],
    batch: Annotated[int | None, typer.Option(min=1, help="Batch size (dynamic models).")] = None,
    result_dir: Annotated[
        Path | None, typer.Option(help="Write per-image labels/top1/top5 files and eval.json here.")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="Engine threads.")] = None,
    ray: RayAddress = None,
    actors: RayActors = None,
    accept_host_mismatch: AcceptMismatch = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Top-1 / top-5 accuracy against ground-truth labels."""
    if ray is None and actors is not None:
        raise fail("--actors goes with --ray", code=2)
    if ray is not None and threads is not None:
        raise fail("--threads does not go with --ray: each actor runs --actors' share", code=2)
    with user_errors():
        if result_dir is not None:
            check_folder(result_dir)
        truth = read_ground_truth(labels)
        if ray is not None:
            from quench.ray import classify as ray_classify

            model = Model.load(artifact, check="off")  # its name; the actors load and check it
            preds = ray_classify(
                artifact,
                [images],
                topk=5,
                batch_size=batch,
                actors=actors,
                address=ray,
                check="warn" if accept_host_mismatch else "auto",
                progress=not quiet,
            )
            try:
                res = score(preds, truth)
            except NoImagesError as exc:
                _skipped(exc.failed)
                raise
        else:
            paths = list_images(images)
            if not paths:
                raise QuenchError(f"{images}: no images")
            model = _load(artifact, threads, accept_host_mismatch)
            try:
                with Bar("evaluating", len(paths), enabled=not quiet) as bar:
                    res = evaluate(
                        model, paths, truth, batch_size=batch, on_done=lambda p: bar.advance()
                    )
            except NoImagesError as exc:
                _skipped(exc.failed)
                raise
        _skipped(res.failed)
        meta = {
            "model": model.name,
            "precision": model.precision,
            "engine": model.engine,
            "artifact": str(artifact),
        }
        if result_dir:
            write_result_dir(res, result_dir, meta)
    if as_json:
        print(json.dumps({**meta, **res.summary()}, indent=2))
    else:
        print(
            f"{model.name} {model.precision}: top-1 {res.top1:.4f}  top-5 {res.top5:.4f}  "
            f"({res.evaluated} images"
            + (f", {len(res.failed)} unreadable" if res.failed else "")
            + (f", {len(res.unlabeled)} without label" if res.unlabeled else "")
            + ")"
        )
    if res.failed:
        raise typer.Exit(1)


def _skipped(reasons: list[str]) -> None:
    for reason in reasons:
        err.print(f"[yellow]skipped:[/yellow] {escape(reason)}", soft_wrap=True)


def _batches(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise fail(f"--batch takes sizes like 1,4,8, got {text!r}", code=2) from None
    if not values or any(v < 1 for v in values):
        raise fail(f"--batch takes sizes >= 1, got {text!r}", code=2)
    return values


@app.command()
def perf(
    model: Annotated[Path, typer.Argument(help="A .quench artifact, or an .onnx file (baseline).")],
    batch: Annotated[
        str | None,
        typer.Option(
            help="Batch sizes, comma separated (default: 1,4,8; a fixed-batch model's own batch)."
        ),
    ] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="Engine threads.")] = None,
    iterations: Annotated[
        int | None, typer.Option(min=1, help="Timed iterations per batch size.")
    ] = None,
    duration: Annotated[
        float | None, typer.Option(min=0.1, help="Seconds per batch size (default 10).")
    ] = None,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed iterations first.")] = 20,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results as JSON.")] = None,
    images: Annotated[
        Path | None,
        typer.Option(help="Also measure end-to-end images/s on these files (folder or list)."),
    ] = None,
    requests: Annotated[
        int,
        typer.Option(
            min=1,
            help="Requests in flight at once, each a whole batch (like benchmark_app -nireq; "
            "OpenVINO runs them on as many streams). Default 1: synchronous.",
        ),
    ] = 1,
    rounds: Annotated[
        int,
        typer.Option(
            min=1,
            help="Rounds per batch size, alternating between the sizes; the table shows the "
            "spread of the rounds' qps and warns when it is unstable.",
        ),
    ] = ROUNDS,
    percentile: Annotated[
        str,
        typer.Option(help="Latency percentiles to report, comma separated (like trtexec)."),
    ] = "90,99",
    streams: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="OpenVINO streams (benchmark_app -nstreams); requests in flight default to "
            "as many.",
        ),
    ] = None,
    pin: Annotated[
        str | None,
        typer.Option(
            help="Run on these CPUs only, e.g. 0,1 or 0-3 (CPU affinity, like taskset -c); "
            "threads default to their count."
        ),
    ] = None,
    input_images: Annotated[
        Path | None,
        typer.Option(help="Time these images (folder or list), preprocessed, not random data."),
    ] = None,
    profile: Annotated[
        bool,
        typer.Option(
            "--profile",
            help="Per-layer times from the engine's profiler at the largest batch: the "
            "slowest layers with op and executed precision (all in --json).",
        ),
    ] = False,
    profile_top: Annotated[int, typer.Option(min=1, help="Layers shown by --profile.")] = 10,
    accept_host_mismatch: AcceptMismatch = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Throughput (qps) and latency per batch size, with the share of this CPU's peak."""
    sizes = _batches(batch) if batch else [1, 4, 8]
    if json_out is not None:
        with user_errors():
            check_file(json_out)
    pcts = _percentiles(percentile)
    onnx_file = model.suffix.lower() == ".onnx"
    for flag, given in (("--input-images", input_images), ("--profile", profile or None)):
        if onnx_file and given is not None:
            raise fail(f"{flag} needs a .quench artifact", code=2)
    cpus = None
    startup_times: dict[str, Any] = {}
    profiled = None
    if images is not None and model.suffix.lower() == ".onnx":
        raise fail("--images needs a .quench artifact (it carries the preprocessing)", code=2)
    if iterations is not None and duration is not None:
        raise fail("--iterations and --duration exclude each other", code=2)
    if images is not None and requests > 1:
        raise fail("--images compares with one request at a time: drop --requests", code=2)
    loaded = None
    with user_errors():
        cpus = parse_cpus(pin) if pin else None
        threads = threads or (len(cpus) if cpus else None)
    with user_errors(), pinned(cpus):
        if onnx_file:
            if streams is not None:
                raise QuenchError("--streams: ONNX Runtime has no streams; use --requests N")
            results = perf_onnx(
                model,
                sizes if batch else None,
                iterations,
                duration,
                warmup,
                threads,
                not quiet,
                requests,
                rounds=rounds,
                percentiles=pcts,
                startup_times=startup_times,
            )
        else:
            t = time.perf_counter()
            loaded = _load(model, threads, accept_host_mismatch)
            startup_times["load_ms"] = round((time.perf_counter() - t) * 1e3, 3)
            if not batch and loaded.fixed_batch:
                sizes = [loaded.fixed_batch]
            inputs = None
            if input_images is not None:
                inputs = load_inputs(loaded, list_images(input_images))
            startup_times.update(startup(loaded, sizes[0], inputs))
            results = perf_model(
                loaded,
                sizes,
                iterations,
                duration,
                warmup,
                not quiet,
                requests,
                rounds=rounds,
                percentiles=pcts,
                inputs=inputs,
                streams=streams,
            )
            if profile:
                profiled = profile_model(loaded, max(sizes), inputs=inputs)
    print(startup_line(startup_times, sizes[0]))
    _print_perf(results)
    for r in results:
        print(latency_line(r.to_dict(), pcts))
    warnings = list(dict.fromkeys(w for r in results for w in r.warnings))
    sys.stdout.flush()
    for w in warnings:
        info(f"warning: {w}")
    end_to_end = []
    if images is not None:
        with user_errors():
            files = list_images(images)
            if not files:
                raise QuenchError(f"{images}: no images")
            assert loaded is not None  # .onnx files were refused above
            for r in results:
                e2e = perf_images(loaded, files, r.batch, progress=not quiet)
                ratio = e2e["pipeline"]["images_per_s"] / r.qps
                # the same command's engine-only figure at this batch, and the ratio
                e2e["engine_only"] = {"images_per_s": r.qps, "inputs": r.inputs}
                e2e["pipeline_vs_engine_only"] = round(ratio, 4)
                e2e["input"] = loaded.data.input
                end_to_end.append(e2e)
                print(
                    f"end-to-end batch {r.batch}: {e2e['pipeline']['images_per_s']:.1f} images/s "
                    f"({ratio:.2f}x engine-only {r.qps:.1f} qps); naive decode-then-infer loop "
                    f"{e2e['naive_loop']['images_per_s']:.1f} images/s ({len(files)} files)"
                )
    if profiled is not None:
        _print_profile(profiled, profile_top)
    if not quiet:
        for compute in sorted({r.compute for r in results}):
            info(
                f"peak {compute}: {peak_macs(compute, results[0].threads)[1]}; clock used: "
                f"{clock_source()}"
            )
    if json_out:
        peak = {c: peak_macs(c, results[0].threads) for c in {r.compute for r in results}}
        doc = {
            "machine": cpu_info(),
            "peak": {c: {"macs_per_second": v, "how": how} for c, (v, how) in peak.items()},
            "clock": core_clock().to_dict(),
            "startup": startup_times,
            "pinned_cpus": cpus,
            "profile": profiled,
            "results": [r.to_dict() for r in results],
            "stability": {
                "unstable": bool(warnings),
                "warnings": warnings,
                "cv_bound": CV_BOUND,
                "machine_load": results[0].machine_load,
            },
            "end_to_end": end_to_end,
        }
        json_out.write_text(json.dumps(doc, indent=2) + "\n")


def _percentiles(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise fail(f"--percentile: expected numbers like 90,99, got {text!r}", code=2) from None
    if not values or any(not 0 < p < 100 for p in values):
        raise fail(f"--percentile: each must be between 0 and 100, got {text!r}", code=2)
    return values


def _print_profile(prof: dict[str, Any], top: int) -> None:
    """The slowest layers (benchmark_app -pc, trtexec --dumpProfile) and the time per op."""
    table = Table(
        title=f"per-layer profile: {prof['engine']}, batch {prof['batch']}, mean of "
        f"{prof['runs']} runs, {prof['total_ms']:.3f} ms in layers",
        title_justify="left",
    )
    for col in ("#", "layer", "op", "precision", "kernel", "ms", "% of time"):
        table.add_column(col, justify="right" if col in ("#", "ms", "% of time") else "left")
    for i, layer in enumerate(prof["layers"][:top], 1):
        table.add_row(
            str(i),
            escape(layer["name"]),
            layer["op"],
            layer["precision"],
            escape(layer["kernel"]),
            f"{layer['ms']:.3f}",
            f"{layer['share']:.1%}",
        )
    Console(width=max(150, Console().width)).print(table)
    print(
        "time by op: "
        + ", ".join(
            f"{g['op']} {g['precision']} {g['share']:.1%} ({g['layers']})" for g in prof["by_op"]
        )
    )


def _print_perf(results: list[PerfResult]) -> None:
    table = Table(title="quench perf", title_justify="left")
    for col in PERF_COLUMNS:
        left = col in ("Model", "Quant_Mode", "device")
        # figures are never broken over two lines: the text columns wrap (long names fold)
        if left:
            table.add_column(col, justify="left", overflow="fold")
        else:
            table.add_column(col, justify="right", no_wrap=True)
    for r in results:
        table.add_row(*perf_row(r.to_dict()))
    Console(width=max(150, Console().width)).print(table)


def _print_topk(precision: str, predictions: list[Prediction]) -> None:
    """``quench run``'s top-k of a few sample images, on stdout."""
    print(f"# top-{TOPK}, {precision}")
    for p in predictions:
        print(p.text())
    sys.stdout.flush()


@app.command("run")
def run_(
    model: Annotated[
        Path | None, typer.Option(help="The ONNX model (default: fetch the preset's).")
    ] = None,
    preset: Annotated[
        str | None, typer.Option(help="Model preset (default: detected; fetch: resnet50-v1-7).")
    ] = None,
    images: Annotated[
        Path | None,
        typer.Option(
            help="Images (folder or list) to classify and evaluate (default: the sample's)."
        ),
    ] = None,
    labels: Annotated[
        Path | None, typer.Option(help="Ground truth for --images ('file<TAB>index').")
    ] = None,
    calib_images: Annotated[
        str | None,
        typer.Option(
            help="INT8 calibration images, folder or list file (default: the sample's calib.txt, "
            "else synthetic images)."
        ),
    ] = None,
    sample_dir: Annotated[
        list[Path] | None,
        typer.Option(
            help="Where to look for the ImageNet sample (val.txt, ground_truth.tsv, calib.txt) "
            "when --images, --labels or --calib-images is not given; repeatable (default: the "
            "cache's, from `quench fetch imagenet-sample`)."
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder.")] = Path("report"),
    precisions: Annotated[
        str | None, typer.Option(help="Comma-separated precisions (default: all that run here).")
    ] = None,
    batches: Annotated[str, typer.Option(help="Perf batch sizes, comma separated.")] = "1,4,8",
    duration: Annotated[float, typer.Option(min=0.01, help="Perf seconds per batch size.")] = 5.0,
    iterations: Annotated[
        int | None, typer.Option(min=1, help="Perf iterations per batch size (not --duration).")
    ] = None,
    warmup: Annotated[int, typer.Option(min=0, help="Perf untimed iterations.")] = 20,
    engine: Annotated[
        str, typer.Option(help="auto | onnxruntime | openvino | torch-cuda.")
    ] = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="Engine threads.")] = None,
    class_labels: Annotated[
        str | None, typer.Option(help="Class-name file for the build (quench build --labels).")
    ] = None,
    calib_count: Annotated[int, typer.Option(min=1, help="INT8: images to calibrate on.")] = 200,
    mean: Annotated[str | None, typer.Option(help="Pixel mean, 0..255 units: R,G,B.")] = None,
    std: Annotated[str | None, typer.Option(help="Pixel std, 0..255 units: R,G,B.")] = None,
    resize: Annotated[int | None, typer.Option(help="Resize the shorter side to this.")] = None,
    crop: Annotated[int | None, typer.Option(help="Centre crop size.")] = None,
    force: Annotated[bool, typer.Option(help="Redo every step (ignore state.json).")] = False,
    fetch_timeout: Annotated[float, typer.Option(help="Network timeout, seconds.")] = 10.0,
    input_kind: Annotated[
        str,
        typer.Option("--input", help="Each build's engine input: float32 or uint8 (quench build)."),
    ] = "float32",
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Skip the PNG plots.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """The one-click job: fetch, build each precision, classify, eval, perf, write a report.

    Where images come from, first that applies:
    INT8 calibration: --calib-images > --sample-dir's calib.txt > the cached ImageNet sample's
    (quench fetch imagenet-sample) > deterministic synthetic images (speed only; report says so).
    Accuracy: --images/--labels > --sample-dir's val.txt/ground_truth.tsv > the cached sample's
    > none (the report says why and how to get it).
    Without --model, the model and (if not cached) the sample are downloaded; offline, the
    sample is skipped.
    """
    extra = {
        k: v
        for k, v in {
            "mean": _floats3(mean, "mean"),
            "std": _floats3(std, "std"),
            "resize": resize,
            "crop": crop,
            "input": None if input_kind.lower() == "float32" else input_kind.lower(),
        }.items()
        if v is not None
    }
    opts = RunOptions(
        model=model,
        preset=preset,
        images=images,
        labels=labels,
        calib_images=calib_images,
        sample_dirs=sample_dir or None,
        out=out,
        precisions=[p.strip() for p in precisions.split(",") if p.strip()] if precisions else None,
        batches=_batches(batches),
        duration=None if iterations is not None else duration,
        iterations=iterations,
        warmup=warmup,
        engine=engine,
        threads=threads,
        class_labels=class_labels,
        calib_count=calib_count,
        force=force,
        fetch_timeout=fetch_timeout,
        build_extra=extra,
        progress=not quiet,
        plots=not no_plots,
    )
    with user_errors(), sigterm_exits():
        res = run_job(opts, log=info, on_classified=_print_topk)
    model_step = next((s for s in res.steps if s.kind == "model"), None)
    if model_step is not None and model_step.status == "failed":
        raise fail(model_step.message)
    if not res.ok:
        raise fail(
            f"{len(res.failed)} step(s) failed: "
            + "; ".join(f"{s.id}: {s.message}" for s in res.failed)
        )


@app.command("info")
def info_(
    artifact: Annotated[Path, typer.Argument(help="The .quench artifact.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show an artifact's manifest (checks every checksum)."""
    with user_errors():
        d = _load(artifact, check="off").describe()
    if as_json:
        print(json.dumps(d, indent=2))
        return
    for key, value in d.items():
        if key == "path":
            continue
        print(f"{key:<17} {json.dumps(value) if isinstance(value, dict) else value}")


@app.command()
def keygen(
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Private key file to write (and OUTPUT.pub).")
    ],
) -> None:
    """Make an Ed25519 key pair for signing artifacts: OUTPUT (private, mode 0600) and
    OUTPUT.pub (public, for 'quench verify --key' and 'quench serve --trusted-keys')."""
    with user_errors():
        private, public = signing.generate(output)
        kid = signing.key_id(signing.load_public_key(public))
    info(f"wrote {private} (private: keep it secret) and {public} (public); key {kid[:16]}")


@app.command()
def verify(
    artifact: Annotated[Path, typer.Argument(help="The .quench artifact.")],
    key: Annotated[
        Path | None,
        typer.Option(
            help="Also check its signature: a public key file, or a folder of *.pub files "
            "(any of them may have signed it)."
        ),
    ] = None,
    threads: Annotated[int | None, typer.Option(help="Engine threads.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Run the artifact's self-check on this host: its fp32 reference inputs, against the bound
    the build recorded; with --key, check its signature first. Exit 1 when either fails."""
    with user_errors():
        keys = signing.trusted_keys(key) if key is not None else None
        model = Model.load(artifact, threads, check="off", trusted_keys=keys)
        if model.signature is not None and not as_json:
            print(f"{artifact}: {model.signature.message}")
        if not isinstance(model.manifest.get("selfcheck"), dict):
            raise QuenchError(
                f"{artifact}: carries no self-check (built by an older Quench); rebuild it"
            )
        with model:
            result = selfcheck.check(model, always=True)
        section = model.manifest.get("selfcheck") or {}
    if as_json:
        signed = {"signature": {"key_id": model.signature.key_id}} if model.signature else {}
        print(
            json.dumps(
                {"artifact": str(artifact), **signed, **result.to_dict(), "build": section},
                indent=2,
            )
        )
    else:
        print(f"{artifact}: {result.message}: {'passed' if result.passed else 'FAILED'}")
    if not result.passed:
        raise typer.Exit(1)


def _named_artifact(arg: str) -> tuple[str | None, Path]:
    """``PATH`` or ``NAME=PATH`` (an existing file named with '=' is a path)."""
    name, sep, path = arg.partition("=")
    if not sep or Path(arg).exists():
        return None, Path(arg)
    if not name or not path or "/" in name:
        raise fail(f"{arg}: expected NAME=PATH or a path", code=2)
    return name, Path(path)


def _serve_ray(
    artifacts: list[Path],
    host: str,
    port: int,
    address: str,
    replicas: int | None,
    autoscale: str | None,
    threads: int | None,
    accept: bool,
    settings: dict[str, Any],
    names: list[str | None],
    trusted: Path | None,
) -> None:
    """``quench serve --ray``: the same app as Ray Serve replicas, until SIGTERM / Ctrl-C."""
    with user_errors():
        from quench.ray.serve import Scale
        from quench.ray.serve import run as serve_ray
        from quench.serve import ServeConfig

        scale = Scale.parse(replicas, autoscale)
        keys = signing.trusted_keys(trusted) if trusted is not None else None
        if keys is not None:  # before connecting to Ray: a refusal costs nothing
            for path in artifacts:
                verified = signing.verify(artifact_load(path), keys, str(path))
                info(f"{path}: {verified.message}")
        serve_ray(
            artifacts,
            ServeConfig(**settings),
            scale,
            host,
            port,
            address,
            threads,
            check="warn" if accept else "always",
            log=info,
            names=names,
            trusted_keys=keys,
        )


def _grpc_available() -> None:
    """grpcio and tritonclient's generated protocol modules, else one line saying what to do."""
    try:
        import grpc  # noqa: F401
        import tritonclient.grpc.service_pb2  # noqa: F401
    except ImportError as exc:
        raise fail(f"--grpc-port needs {exc.name}: pip install 'quench[grpc]'") from None


@app.command()
def serve(
    artifacts: Annotated[
        list[str],
        typer.Argument(
            help="One or more .quench artifacts, each optionally NAME=PATH (its served name).",
            metavar="[NAME=]ARTIFACT...",
        ),
    ],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    grpc_port: Annotated[
        int | None,
        typer.Option(help="Also serve the KServe v2 gRPC protocol on this TCP port."),
    ] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Images per engine call.")] = 8,
    max_delay_ms: Annotated[
        float, typer.Option(min=0, help="Wait this long after a request for more to batch.")
    ] = 5.0,
    max_queue: Annotated[
        int, typer.Option(min=1, help="Queued requests per model; beyond: 503.")
    ] = 256,
    timeout_s: Annotated[float, typer.Option(min=0.001, help="Per-request timeout (504).")] = 30.0,
    max_body_mb: Annotated[float, typer.Option(min=0.001, help="Request body limit (413).")] = 20.0,
    name: Annotated[str | None, typer.Option(help="Served model name (one artifact only).")] = None,
    threads: Annotated[int | None, typer.Option(help="Engine threads per model.")] = None,
    ray: RayAddress = None,
    replicas: Annotated[
        int | None, typer.Option(min=1, help="With --ray: replicas of the server (default 1).")
    ] = None,
    autoscale: Annotated[
        str | None,
        typer.Option(help="With --ray: MIN:MAX replicas, scaled on the requests in flight."),
    ] = None,
    accept_host_mismatch: AcceptMismatch = False,
    trusted_keys: Annotated[
        Path | None,
        typer.Option(
            help="Serve only artifacts signed by one of these Ed25519 public keys: a folder of "
            "*.pub files (or one key file). Unsigned or wrongly signed artifacts are refused."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No JSON access log.")] = False,
) -> None:
    """Serve artifacts over HTTP (and gRPC): KServe v2 / Open Inference Protocol, with dynamic
    batching."""
    if name and len(artifacts) > 1:
        raise fail("--name needs exactly one artifact (or give each one as NAME=PATH)", code=2)
    named = [_named_artifact(a) for a in artifacts]
    if ray is None and (replicas is not None or autoscale is not None):
        raise fail("--replicas and --autoscale go with --ray", code=2)
    if ray is not None and grpc_port is not None:
        raise fail("--grpc-port is not available with --ray (Ray Serve serves HTTP)", code=2)
    if grpc_port is not None and grpc_port == port:
        raise fail(f"--grpc-port {grpc_port} is the HTTP --port too: give two ports", code=2)
    settings = dict(
        max_batch=max_batch,
        max_delay_ms=max_delay_ms,
        max_queue=max_queue,
        timeout_s=timeout_s,
        max_body_mb=max_body_mb,
        name=name,
        quiet=quiet,
    )
    if ray is not None:
        _serve_ray(
            [p for _, p in named],
            host,
            port,
            ray,
            replicas,
            autoscale,
            threads,
            accept_host_mismatch,
            settings,
            [n for n, _ in named],
            trusted_keys,
        )
        return
    with user_errors():
        from quench.serve import ServeConfig
        from quench.serve import run as serve_run
        from quench.serve.server import listen

        sock = listen(host, port)  # a busy port fails now, before the models load
        if grpc_port is not None:
            _grpc_available()
            listen(host, grpc_port).close()  # gRPC binds it again once the models are warm
        keys = signing.trusted_keys(trusted_keys) if trusted_keys is not None else None
        # the self-check always runs at start; its result is in each model's metadata
        models = [
            _load(p, threads, accept_host_mismatch, check="always", trusted_keys=keys)
            for _, p in named
        ]
        if keys is not None:
            for m in models:
                info(f"{m.path}: {m.signature.message}")
        config = ServeConfig(**settings)
        try:
            serve_run(
                models,
                config,
                host=host,
                port=port,
                names=[n for n, _ in named],
                sock=sock,
                grpc_port=grpc_port,
            )
        except ValueError as exc:
            raise fail(str(exc)) from None


def run() -> None:  # pragma: no cover - console entry for python -m quench
    app(prog_name="quench")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())

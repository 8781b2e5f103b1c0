"""bench/run.py's hidden steps (``--step``), each run in a process of its own: the peers' INT8
routes (ONNX Runtime's quantize_static, OpenVINO's nncf.quantize) and the peak memory of a
command; and ``prep_step``, which runs one of them as a timed model preparation."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import onnx
import openvino as ov
from common import REPO, Runner, rel
from onnx import version_converter
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from quench.builder.calibration import load_calibration
from quench.graph import real_inputs
from quench.presets import get_preset
from r50.config import MODEL_NAME, Prep, say


def ort_int8_step(args: argparse.Namespace) -> int:
    """Hidden step: the ORT user's INT8 route (quant_pre_process + quantize_static, QDQ)."""
    t = time.perf_counter()
    src, dest = Path(args.model), Path(args.dest)
    calib = load_calibration(
        args.calib_images, get_preset(MODEL_NAME).data, args.calib_count, progress=False
    )
    m = onnx.load(str(src), load_external_data=False)
    name = real_inputs(m)[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self) -> dict[str, Any] | None:
            if self.i >= len(calib.tensor):
                return None
            self.i += 1
            return {name: calib.tensor[self.i - 1 : self.i]}

    notes = []
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        # Per-channel QDQ needs DequantizeLinear's axis (opset 13); quantize_static only lifts
        # old models to opset 11 and then writes an invalid graph. Convert first, as ORT's
        # quantization docs advise, with ONNX's own version converter.
        m = version_converter.convert_version(onnx.load(str(src)), 13)
        m.ir_version = max(m.ir_version, 7)  # opset 13's IR: initializers need not be inputs
        # ... and must not be, or ORT treats them as overridable inputs and folds nothing (its
        # warning points to remove_initializer_from_input.py, which does this):
        keep = real_inputs(m)
        del m.graph.input[:]
        m.graph.input.extend(keep)
        src = dest.with_name(dest.stem + "-opset13.onnx")
        onnx.save(m, str(src))
        notes.append(
            f"source opset {opset} converted to 13 (onnx.version_converter, IR 7, initializers "
            "removed from the graph inputs)"
        )
    pre = dest.with_name(dest.stem + "-preprocessed.onnx")
    try:
        import sympy  # noqa: F401  (symbolic shape inference needs it)

        skip_symbolic = False
    except ImportError:
        skip_symbolic = True  # what ORT's own error message suggests without sympy
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=skip_symbolic)
    quantize_static(
        str(pre),
        str(dest),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    if skip_symbolic:
        notes.append("sympy not installed: quant_pre_process(skip_symbolic_shape=True)")
    done = {
        "seconds": time.perf_counter() - t,
        "images": len(calib.files),
        "note": "; ".join(notes),
    }
    print(json.dumps(done))
    return 0


def nncf_int8_step(args: argparse.Namespace) -> int:
    """Hidden step: the OpenVINO user's INT8 route (nncf.quantize, default parameters)."""
    import nncf  # the bench extra, needed by this step only

    t = time.perf_counter()
    calib = load_calibration(
        args.calib_images, get_preset(MODEL_NAME).data, args.calib_count, progress=False
    )
    model = ov.Core().read_model(args.model)
    items = [calib.tensor[i : i + 1] for i in range(len(calib.tensor))]
    quantized = nncf.quantize(model, nncf.Dataset(items))
    ov.save_model(quantized, args.dest)
    print(json.dumps({"seconds": time.perf_counter() - t, "images": len(calib.files)}))
    return 0


def rss_step(args: argparse.Namespace) -> int:
    """Run the command given as a JSON list in ``--cmd`` and print its peak resident memory
    (this process has no other children, so RUSAGE_CHILDREN is that command's own)."""
    cmd = json.loads(args.cmd)
    t = time.perf_counter()
    rc = subprocess.call(cmd, cwd=REPO)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t, "peak_rss_kib": peak_kib}))
    return 0 if rc == 0 else 1


def prep_step(
    runner: Runner, label: str, family: str, step: str, model: Path, dest: Path, args: Any
) -> Prep:
    dest.unlink(missing_ok=True)
    cmd = [
        rel(sys.executable),
        rel(REPO / "bench" / "run.py"),
        "--step",
        step,
        "--model",
        rel(model),
        "--dest",
        rel(dest),
        "--calib-images",
        rel(args.calib_images),
        "--calib-count",
        str(args.calib_count),
    ]
    say(f"{label}: quantizing")
    p = runner.run(step, cmd, 1800)
    if not p.ok or not dest.exists():
        return Prep(label, family, None, p.cmd, p.error() if not p.ok else "no output model")
    detail = f"{args.calib_count} calibration images"
    try:
        done = json.loads(p.stdout.strip().splitlines()[-1])
        detail = f"{done['images']} calibration images" + (
            f" ({done['note']})" if done.get("note") else ""
        )
    except (ValueError, IndexError, KeyError, TypeError):
        pass
    return Prep(label, family, p.seconds, p.cmd, detail=detail)

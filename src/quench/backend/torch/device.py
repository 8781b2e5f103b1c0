"""The CUDA device torch sees, for the manifest and for ``supports``."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import torch


def has_cuda() -> bool:
    return bool(torch.cuda.is_available() and torch.cuda.device_count() > 0)


def driver_version() -> str | None:
    """The NVIDIA driver release (``nvidia-smi``'s), or None where it cannot be read."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def describe(device: str = "cuda") -> dict[str, Any]:
    """What computes: the GPU, its driver, CUDA and cuDNN, torch (for the manifest)."""
    info: dict[str, Any] = {"torch": torch.__version__, "device": device}
    if device.startswith("cuda") and has_cuda():
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            driver=driver_version(),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info

"""What the bench scripts share: running ``quench`` as a user does, and writing their section of
BENCHMARKS.md between their own markers (the rest of the file kept as it is)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def timed_quench(args: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    """``quench ARGS`` in its own process, timed as a whole command: (seconds, the result)."""
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "quench", *args], env=env, capture_output=True, text=True
    )
    return time.perf_counter() - t0, done


def write_section(md: Path, mark: str, section: str) -> None:
    """Put ``section`` (which starts and ends with ``mark``) in ``md`` in place of the one
    between the same markers, or at the end."""
    text = md.read_text() if md.exists() else ""
    if mark in text:
        head, _, rest = text.partition(mark)
        _, _, tail = rest.partition(mark)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    md.write_text(text)

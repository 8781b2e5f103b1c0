"""Accuracy: image lists, ground-truth files, top-1/top-5, and MagicMind-style result files."""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quench.errors import QuenchError
from quench.imaging import IMAGE_SUFFIXES

if TYPE_CHECKING:
    from quench.model import Model
    from quench.pipeline import Prediction


def list_images(spec: str | Path) -> list[Path]:
    """A folder (recursively, image suffixes only, sorted) or a list file of paths.

    Relative paths in a list file resolve against the list file's folder; blank lines and
    ``#`` comments are skipped; a tab- or comma-separated line keeps its first field.
    """
    path = Path(spec)
    if path.is_dir():
        return sorted(
            p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()
        )
    if not path.exists():
        raise QuenchError(f"{path}: no such folder or list file")
    text = "\n".join(read_lines(path, "image list"))
    return [p if p.is_absolute() else path.parent / p for p in map(Path, list_entries(text))]


def list_entries(text: str) -> list[str]:
    """The paths of an image list file: blank lines and ``#`` comments skipped; a tab- or
    comma-separated line keeps its first field."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(re.split(r"[\t,]", line, maxsplit=1)[0].strip())
    return out


def read_lines(path: Path, what: str) -> list[str]:
    """The lines of a UTF-8 text file; a one-line QuenchError naming the file otherwise (a
    FIFO or device is refused unopened: reading it could block forever)."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise QuenchError(f"{path}: cannot read {what}: not a regular file")
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise QuenchError(f"{path}: cannot read {what}: no such file") from None
    except UnicodeDecodeError as exc:
        raise QuenchError(
            f"{path}: cannot read {what}: not UTF-8 text (byte {exc.start}: {exc.reason})"
        ) from None
    except OSError as exc:
        raise QuenchError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None


def expand_inputs(items: Iterable[str | Path]) -> list[Path]:
    """Command-line image arguments: folders are expanded, files kept as given."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        out.extend(list_images(p) if p.is_dir() else [p])
    return out


def _key(p: Path) -> str:
    return os.path.normpath(os.path.abspath(p))


@dataclass
class GroundTruth:
    by_path: dict[str, int]
    by_name: dict[str, int]
    source: str = "labels"
    highest: tuple[int, int] = (0, 0)  # the largest class index and its line

    def get(self, image: Path) -> int | None:
        hit = self.by_path.get(_key(image))
        return hit if hit is not None else self.by_name.get(image.name)

    def check_classes(self, classes: int) -> None:
        """Refuse class indices a model with ``classes`` outputs cannot predict."""
        label, line = self.highest
        if label >= classes:
            raise QuenchError(
                f"{self.source}:{line}: class index {label} is out of range for a model with "
                f"{classes} classes (0..{classes - 1})"
            )


def read_ground_truth(path: str | Path) -> GroundTruth:
    """``file<TAB>index``, ``file,index`` or ImageNet ``file index`` lines; header optional.

    Relative file names resolve against the ground-truth file's folder; they are also matched
    by bare file name when that is unique.
    """
    path = Path(path)
    lines = read_lines(path, "labels")
    highest = (0, 0)
    by_path: dict[str, int] = {}
    names: dict[str, list[int]] = {}
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = re.split(r"\t|,", line) if ("\t" in line or "," in line) else line.rsplit(None, 1)
        if len(parts) < 2 or not parts[-1].strip().lstrip("-").isdigit():
            if not by_path and n == 1:
                continue  # a header line
            raise QuenchError(f"{path}:{n}: expected 'file<TAB>class_index', got {line!r}")
        file, label = Path(parts[0].strip()), int(parts[-1])
        if label < 0:
            raise QuenchError(f"{path}:{n}: class index {label} is negative")
        if label > highest[0] or not highest[1]:
            highest = (label, n)
        full = file if file.is_absolute() else path.parent / file
        by_path[_key(full)] = label
        names.setdefault(file.name, []).append(label)
    if not by_path:
        raise QuenchError(f"{path}: no labels found")
    unique = {k: v[0] for k, v in names.items() if len(v) == 1}
    return GroundTruth(by_path, unique, str(path), highest)


class NoImagesError(QuenchError):
    """No image was both readable and labelled; ``failed`` says why each unreadable one was."""

    def __init__(self, message: str, failed: list[str]) -> None:
        super().__init__(message)
        self.failed = failed


@dataclass
class EvalResult:
    top1: float
    top5: float
    evaluated: int
    correct1: int
    correct5: int
    failed: list[str] = field(default_factory=list)  # unreadable images (not counted)
    unlabeled: list[str] = field(default_factory=list)  # images with no ground truth
    rows: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "top1": self.top1,
            "top5": self.top5,
            "images": self.evaluated,
            "correct_top1": self.correct1,
            "correct_top5": self.correct5,
            "failed": len(self.failed),
            "unlabeled": len(self.unlabeled),
        }


def score(preds: Iterable[Prediction], truth: GroundTruth) -> EvalResult:
    """Top-1/top-5 over the images that were classified and have a label."""
    c1 = c5 = n = 0
    failed: list[str] = []
    unlabeled: list[str] = []
    rows = []
    for p in preds:
        if not p.ok:
            failed.append(p.error or p.source)
            continue
        label = truth.get(Path(p.source))
        if label is None:
            unlabeled.append(p.source)
            continue
        n += 1
        hit1, hit5 = p.classes[0] == label, label in p.classes[:5]
        c1 += hit1
        c5 += hit5
        rows.append(
            {
                "file": p.source,
                "label": label,
                "top5": p.classes[:5],
                "top1_correct": hit1,
                "top5_correct": hit5,
            }
        )
    if n == 0:
        raise NoImagesError(
            "no image could be evaluated: none was both readable and labelled "
            f"({len(failed)} unreadable, {len(unlabeled)} without label)",
            failed,
        )
    return EvalResult(c1 / n, c5 / n, n, c1, c5, failed, unlabeled, rows)


def evaluate(
    model: Model,
    images: list[Path],
    truth: GroundTruth,
    batch_size: int | None = None,
    on_done: Callable[[Prediction], None] | None = None,
) -> EvalResult:
    truth.check_classes(len(model.labels))
    preds = model.iter_classify(images, topk=5, batch_size=batch_size, on_done=on_done)
    return score(preds, truth)


def write_result_dir(result: EvalResult, out: str | Path, meta: dict[str, Any]) -> Path:
    """MagicMind-style result files: per-image labels, top-1, top-5, plus a JSON summary."""
    out = Path(out)
    try:
        _write_result_dir(result, out, meta)
    except OSError as exc:
        raise QuenchError(f"{out}: cannot write results ({exc.strerror or exc})") from None
    return out


def _write_result_dir(result: EvalResult, out: Path, meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (
        (out / "labels.txt").open("w") as fl,
        (out / "top1.txt").open("w") as f1,
        (out / "top5.txt").open("w") as f5,
    ):
        for r in result.rows:
            fl.write(f"{r['file']}\t{r['label']}\n")
            f1.write(f"{r['file']}\t{r['top5'][0]}\t{int(r['top1_correct'])}\n")
            f5.write(f"{r['file']}\t{' '.join(map(str, r['top5']))}\t{int(r['top5_correct'])}\n")
    (out / "eval.json").write_text(json.dumps({**meta, **result.summary()}, indent=2) + "\n")

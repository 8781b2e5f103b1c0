"""The ``quench run`` report: ``report.json`` (every figure), ``report.md``, a self-contained
``report.html`` (plots embedded as base64 PNG) and the PNG plots themselves.

Modules: ``document`` (the typed document, ``report.json``), ``compare`` (gathering the job's
figures; speedups against fp32 and the verdict), ``tables`` (cells and lines as text),
``blocks`` and ``sections`` (one function per section, one list), ``render`` (that list as
Markdown and HTML), ``plots`` and ``output`` (the files).
"""

from __future__ import annotations

from quench.report.compare import FP32, MAX_TOP1_DROP, REFERENCE, collect, verdict, versus_fp32
from quench.report.document import (
    BatchVerdict,
    DataSources,
    DocBuild,
    JobRecord,
    ReportDoc,
    Speedup,
    Stability,
    Verdict,
    Versus,
    engine_versions,
    machine,
)
from quench.report.output import write, write_json
from quench.report.plots import make_plots, make_thumbnails
from quench.report.render import html_report, markdown
from quench.report.sections import SECTIONS, Assets, sections
from quench.report.tables import (
    ACC_COLUMNS,
    BUILD_COLUMNS,
    REPORT_PERF_COLUMNS,
    SYNTHETIC_LINE,
    VERSUS_COLUMNS,
    acc_rows,
    build_rows,
    fidelity_text,
    machine_lines,
    perf_rows,
    sample_rows,
    step_rows,
    synthetic_calibration,
    unstable_lines,
    verdict_lines,
    versus_rows,
)

__all__ = [
    "ACC_COLUMNS",
    "BUILD_COLUMNS",
    "FP32",
    "MAX_TOP1_DROP",
    "REFERENCE",
    "REPORT_PERF_COLUMNS",
    "SECTIONS",
    "SYNTHETIC_LINE",
    "VERSUS_COLUMNS",
    "Assets",
    "BatchVerdict",
    "DataSources",
    "DocBuild",
    "JobRecord",
    "ReportDoc",
    "Speedup",
    "Stability",
    "Verdict",
    "Versus",
    "acc_rows",
    "build_rows",
    "collect",
    "engine_versions",
    "fidelity_text",
    "html_report",
    "machine",
    "machine_lines",
    "make_plots",
    "make_thumbnails",
    "markdown",
    "perf_rows",
    "sample_rows",
    "sections",
    "step_rows",
    "synthetic_calibration",
    "unstable_lines",
    "verdict",
    "verdict_lines",
    "versus_fp32",
    "versus_rows",
    "write",
    "write_json",
]

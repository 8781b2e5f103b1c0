"""Quench sends no usage data, and lets no dependency send any from its process.

OpenVINO's Python package imports its converter (``openvino.tools.ovc``) on ``import
openvino``, and the converter reports usage through ``openvino_telemetry`` (a consent file in
``~/intel``, a client id, and a forked sender process per event) unless it sees a CI run.
Where ``openvino_telemetry`` cannot be imported OpenVINO uses its own no-op stub
(``openvino.tools.ovc.telemetry_stub``): ``opt_out`` makes it unimportable for this process
only (the user's consent file and other programs are untouched). Ray's usage statistics are
turned off the documented way (``RAY_USAGE_STATS_ENABLED=0``).
"""

from __future__ import annotations

import contextlib
import os
import sys

BLOCKED = "openvino_telemetry"


def opt_out() -> None:
    """Turn off every dependency's usage reporting in this process (idempotent). Called by
    ``import quench``, before any engine is imported."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if BLOCKED not in sys.modules:
        sys.modules[BLOCKED] = None  # type: ignore[assignment] - import now raises ImportError
        return
    module = sys.modules[BLOCKED]
    if module is None:
        return
    # OpenVINO was imported before Quench: its converter's modules get the stub they would
    # have had without the package, and the Telemetry singleton (if made) stops sending
    from openvino.tools.ovc import telemetry_stub

    for name, loaded in list(sys.modules.items()):
        if name.startswith("openvino.tools.ovc") and getattr(loaded, "tm", None) is module:
            loaded.tm = telemetry_stub
    with contextlib.suppress(Exception):  # no instance yet: ``Telemetry()`` refuses to make one
        module.Telemetry().consent = False


def opted_out() -> bool:
    """Whether OpenVINO's converter is on its no-op telemetry stub in this process."""
    if sys.modules.get(BLOCKED) is None:
        return True
    return all(
        getattr(m, "tm", None) is not sys.modules[BLOCKED]
        for name, m in list(sys.modules.items())
        if name.startswith("openvino.tools.ovc")
    )

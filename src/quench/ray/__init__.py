"""Quench on Ray (``pip install "quench[ray]"``): batch classification on Ray Data and serving
on Ray Serve, with the same artifact, preprocessing and results as on one host.

``classify_dataset`` returns a Ray Dataset of results to chain; ``infer`` writes them as sharded
Parquet or JSON lines (resumable); ``classify`` streams ``Prediction``s. Importing this module
does not import Ray: each function says how to install it when it is missing.
"""

from __future__ import annotations

from quench.ray.batch import BatchResult, classify, classify_dataset, columns, infer
from quench.ray.cluster import INSTALL_HINT, connect, require

__all__ = [
    "INSTALL_HINT",
    "BatchResult",
    "classify",
    "classify_dataset",
    "columns",
    "connect",
    "infer",
    "require",
]

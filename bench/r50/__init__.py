"""The parts of ``bench/run.py`` (ResNet-50 v1, peers vs Quench): ``config`` (what is measured,
the result records), ``measure`` (``quench perf`` and ``benchmark_app``), ``steps`` (the hidden
quantization and memory steps), ``rows`` (one function per kind of row), ``extras`` (serving,
pipeline, memory, accuracy, the machine) and ``report`` (BENCHMARKS.md)."""

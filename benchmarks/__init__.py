"""Benchmark suite and context-length scaling profiler: ``python -m benchmarks [COMMAND]`` (``__main__.COMMANDS``).

Importing ``kernels`` first lets it turn on Triton's interpreter on a machine without a GPU before ``triton``
loads; every number this package writes says on which device and by which method it was obtained.
"""
import kernels  # noqa: F401  (first: chooses the Triton interpreter on CPU-only machines)

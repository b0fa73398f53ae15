"""Metrics and reports: retrieval, zero-shot classification, plots.

The names below load on first use, so a torch-free module of the package (:mod:`.card`, read by the service that
serves an ONNX export) imports without pulling in the evaluators and torch.
"""

from importlib import import_module

__all__ = ["evaluate_retrieval", "evaluate_zeroshot", "summary_lines", "write_report"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(import_module(".report", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

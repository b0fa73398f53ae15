"""Metrics and reports: retrieval, zero-shot classification, plots."""

from .report import evaluate_retrieval, evaluate_zeroshot, summary_lines, write_report

__all__ = ["evaluate_retrieval", "evaluate_zeroshot", "summary_lines", "write_report"]

"""Callbacks: everything that is not the algorithm itself (summaries, sample tables, writers)."""

from lightning_rlhf.callbacks.samples import SampleTable, sample_rows
from lightning_rlhf.callbacks.summary import RunSummary

__all__ = ["RunSummary", "SampleTable", "sample_rows"]

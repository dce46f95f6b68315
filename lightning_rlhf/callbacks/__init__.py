"""Callbacks: everything that is not the algorithm itself (summaries, sample tables, writers)."""

from lightning_rlhf.callbacks.checkpoint import AtomicCheckpointIO, RunCheckpoint
from lightning_rlhf.callbacks.samples import SampleTable, sample_rows
from lightning_rlhf.callbacks.summary import RunSummary

__all__ = ["AtomicCheckpointIO", "RunCheckpoint", "RunSummary", "SampleTable", "sample_rows"]

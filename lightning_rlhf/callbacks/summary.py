"""End-of-run summary: what was trained, validation metrics before and after, and where outputs are.

Prints one screen on global rank 0 and writes the same facts to `<default_root_dir>/summary.json`.
Reads `pl_module.eval_history` (a list of `(step, {metric: value})` the stages append to at step 0 and
at each validation) and the last logged training metrics.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and (math.isnan(v) or abs(v) >= 1e4 or (0 < abs(v) < 1e-3)):
        return f"{v:.3g}"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


class RunSummary(Callback):
    """Print and save a short summary when fitting ends (also after an interruption)."""

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._t0 = time.perf_counter()

    def _summary(self, trainer: Any, pl_module: Any, status: str) -> dict[str, Any]:
        history = list(getattr(pl_module, "eval_history", []))
        first = history[0][1] if history else {}
        last = history[-1][1] if len(history) > 1 else {}
        train = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        root = Path(trainer.default_root_dir)
        hp = dict(pl_module.hparams) if hasattr(pl_module, "hparams") else {}
        return {
            "stage": type(pl_module).__name__,
            "status": status,
            "start_from": hp.get("policy") or hp.get("model"),
            "steps": trainer.global_step,
            "wall_s": round(time.perf_counter() - getattr(self, "_t0", time.perf_counter()), 1),
            "val_before": {"step": history[0][0], **first} if history else {},
            "val_after": {"step": history[-1][0], **last} if len(history) > 1 else {},
            "train_last": train,
            "outputs": {
                "metrics": str(root / "metrics.csv"),
                "config": str(root / "config.yaml"),
                "model": str(getattr(pl_module, "export_dir", None)
                             or (f"{hp['output_dir']} (not written: the run did not finish)" if hp.get("output_dir")
                                 else "-")),
            },
        }

    def _report(self, trainer: Any, pl_module: Any, status: str) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        s = self._summary(trainer, pl_module, status)
        root = Path(trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        (root / "summary.json").write_text(json.dumps(s, indent=2, default=str))
        lines = [
            "",
            "=" * 72,
            f" {s['stage']} {s['status']}: {s['steps']} optimizer steps, from {s['start_from']}",
            "-" * 72,
        ]
        before, after = s["val_before"], s["val_after"]
        keys = sorted(k for k in set(before) | set(after) if k != "step")
        if keys:
            lines.append(f" {'metric':<28}{'before (step ' + str(before.get('step', '-')) + ')':>20}"
                         f"{'after (step ' + str(after.get('step', '-')) + ')':>22}")
            lines += [f" {k:<28}{_fmt(before.get(k)):>20}{_fmt(after.get(k)):>22}" for k in keys]
        if s["train_last"]:
            lines.append(" last training metrics: " + ", ".join(
                f"{k}={_fmt(v)}" for k, v in sorted(s["train_last"].items())[:8]))
        lines.append("-" * 72)
        lines += [f" {k:<8} {v}" for k, v in s["outputs"].items()]
        lines += [f" summary  {root / 'summary.json'}", "=" * 72, ""]
        print("\n".join(lines), flush=True)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._report(trainer, pl_module, "finished" if not trainer.interrupted else "interrupted")

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        try:
            self._report(trainer, pl_module, f"stopped by {type(exception).__name__}")
        except OSError:  # e.g. the run directory cannot be written: the original error is the one to report
            pass

"""`SampleTable`: every N steps, what the policy wrote, how each reward scored it and its advantage.

The RL stages keep their last rollout in `pl_module.last_rollout`, a dict of objects they built anyway:
`prompts` (the batch's prompts, one per group), `rollout` (the `Rollout`), `rewards` (the `RewardOutput`:
`.total` and `.per_reward`) and `advantages` ((N, T) per token, or (N,)). On the first rollout step and
every `every_n_steps`-th after it (steps counted as in metrics.csv: 0, N, 2N, ...), this callback decodes
the first `max_rows` responses (whole groups where they fit) and, on global rank 0:

  - appends one JSON object per response to `<trainer.default_root_dir>/samples.jsonl`, closed (so flushed)
    each time: step, group, prompt, completion, reward, rewards/<name> (unweighted), advantage;
  - logs the same rows as a table named "samples" to every logger that has `log_table` (WandbLogger).

A response's advantage is the mean over its real tokens (GRPO's is the same on every token; PPO's GAE
advantages differ per token). Only the logged rows are decoded, so a step that is not logged costs nothing.
`every_n_steps: 0` turns it off. Simplifications: the rows are the batch's first, not a random or the
highest-scoring choice; a rerun in the same directory archives the old file (`lightning_cli.RUN_FILES`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback

from lightning_rlhf.functional import masked_mean


def sample_rows(last: dict[str, Any], tokenizer: Any, step: int, max_rows: int) -> list[dict[str, Any]]:
    """The table rows of one rollout (`last` as the module docstring describes), at most `max_rows`."""
    ro, rewards, adv = last["rollout"], last["rewards"], last["advantages"]
    g = ro.group_size
    n = min(len(ro), max_rows)
    if g <= n:
        n -= n % g  # whole groups only, so each group's advantages can be read together
    part = ro.select(slice(0, n))
    completions = part.decode(tokenizer)
    adv = adv[:n].detach().float()
    if adv.dim() == 2:  # per-token advantages (PPO): their mean over each response's real tokens
        adv = masked_mean(adv, part.response_mask.to(adv.device), dim=-1)
    per_reward = {f"rewards/{k}": _rounded(v[:n]) for k, v in rewards.per_reward.items()}
    total, adv = _rounded(rewards.total[:n]), _rounded(adv)
    rows = []
    for i in range(n):
        row = {"step": step, "group": i // g, "prompt": last["prompts"][i // g], "completion": completions[i],
               "reward": total[i]}
        row.update({k: v[i] for k, v in per_reward.items()})
        rows.append({**row, "advantage": adv[i]})
    return rows


def _rounded(values: torch.Tensor) -> list[float]:
    """Six decimals: float32 noise (1.2000000476837158) says nothing to a reader."""
    return [round(v, 6) for v in values.double().tolist()]


class SampleTable(Callback):
    """Log sampled prompts, completions, rewards and advantages every `every_n_steps` (see module docstring).

    Args:
        every_n_steps: log on the steps divisible by it (the first included); 0 turns the table off.
        max_rows: responses per logged step (whole groups where at least one fits).
        filename: the JSONL file, inside `trainer.default_root_dir`.
    """

    def __init__(self, every_n_steps: int = 10, max_rows: int = 16, filename: str = "samples.jsonl") -> None:
        self.every_n_steps, self.max_rows, self.filename = every_n_steps, max_rows, filename

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        last = getattr(pl_module, "last_rollout", None)
        step = trainer.global_step - 1  # the step metrics.csv gives this rollout's train/ metrics
        if not last or self.every_n_steps <= 0 or step % self.every_n_steps or not trainer.is_global_zero:
            return
        rows = sample_rows(last, pl_module.tokenizer, step, self.max_rows)
        if not rows:
            return
        path = Path(trainer.default_root_dir) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        columns = list(rows[0])
        for logger in trainer.loggers:
            if hasattr(logger, "log_table"):
                logger.log_table(key="samples", columns=columns, data=[[r[c] for c in columns] for r in rows],
                                 step=step)

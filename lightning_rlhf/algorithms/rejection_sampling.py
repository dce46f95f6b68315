"""Rejection sampling (DeepSeek-R1's stage 3): sample k responses per prompt, keep the good ones as SFT data.

For each batch of prompts: sample `k` responses per prompt with the policy (the RL stages' rollout engine),
score them with the weighted `rewards`, keep those that pass every threshold in `keep` (a reward name, or
"total", to its minimum), drop duplicate responses of a prompt, keep at most `max_per_prompt` per prompt,
and append them to a JSONL file with provenance: {"prompt", "completion", <the prompt's columns>,
"scores": {name: score}, "total", "policy", "sampling": {...}, "seed", "prompt_index"}.

With `rounds` > 1, the prompts of a batch that kept nothing are sampled again (k more responses each), up to
`rounds` times in all. Without it the hardest prompts drop out of the kept set: rejection sampling keeps only
what the policy already does well under sampling, and an SFT on that set never practises the rest.

Resumable. After a batch's rows are flushed, one line {"batch", "prompts", "sampled", "kept"} goes to
`<out>.progress`. A rerun reads it, drops rows of a batch that has no progress line (a kill between the two
writes) and a torn last line, and goes on with the next batch; batch b (all its rounds) samples with seed
`seed + b`, so a resumed run writes what an uninterrupted one would. Simplified: one process; prompts in dataset order.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_rlhf.models import encode_prompts, load_causal_lm, load_tokenizer
from lightning_rlhf.rewards import CombinedReward
from lightning_rlhf.rollout import ROLLOUT_ENGINES


@dataclass
class SamplingOptions:
    """How responses are drawn: k per prompt at `temperature`, up to `max_new_tokens`; a prompt that kept none
    is sampled again, up to `rounds` times in all."""

    k: int = 8
    rounds: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    max_prompt_length: int = 512
    engine: str = "static"
    dtype: str | None = None


@dataclass
class KeepRule:
    """Which responses are kept: every `min_scores` entry (a reward name or "total") at or above its value."""

    min_scores: dict[str, float] = field(default_factory=lambda: {"total": 1.0})
    max_per_prompt: int | None = None

    def passes(self, scores: dict[str, float], total: float) -> bool:
        return all((total if name == "total" else scores[name]) >= v for name, v in self.min_scores.items())


def _done_batches(out: Path) -> dict[int, dict]:
    """Progress lines by batch; a torn last line (a kill while writing it) is ignored."""
    progress = Path(f"{out}.progress")
    done: dict[int, dict] = {}
    if progress.exists():
        for line in progress.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[record["batch"]] = record
    return done


def _repair(out: Path, done: dict[int, dict]) -> int:
    """Rewrite `out` (atomically) without rows of unfinished batches or a torn line; return rows kept."""
    if not out.exists():
        return 0
    rows = []
    for line in out.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("batch") in done:
            rows.append(line)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(r + "\n" for r in rows))
    os.replace(tmp, out)
    return len(rows)


def _select(prompt_rows: list[dict], texts: list[str], reward: Any, k: int, rule: KeepRule) -> list[tuple]:
    """(prompt position, completion, per-reward scores, total) of the responses kept, per the rule."""
    prompts = [r["prompt"] for r in prompt_rows for _ in range(k)]
    columns = {c: [r[c] for r in prompt_rows for _ in range(k)] for c in prompt_rows[0] if c != "prompt"}
    out = reward(prompts, texts, columns)
    kept, seen, per_prompt = [], set(), Counter()
    for i, text in enumerate(texts):
        p = i // k
        scores = {name: float(v[i]) for name, v in out.per_reward.items()}
        key = (p, text.strip())
        full = rule.max_per_prompt is not None and per_prompt[p] >= rule.max_per_prompt
        if full or key in seen or not rule.passes(scores, float(out.total[i])):
            continue
        seen.add(key)
        per_prompt[p] += 1
        kept.append((p, text, scores, float(out.total[i])))
    return kept


def rejection_sample(policy: str, rows: list[dict], rewards: Any, out: str | Path, *,
                     sampling: SamplingOptions | None = None, keep: KeepRule | None = None,
                     batch_prompts: int = 16, seed: int = 0, progress: Any = None,
                     device: str = "auto") -> dict[str, Any]:
    """Sample, filter and append to `out` (see the module docstring); returns {"prompts", "sampled", "kept",
    "keep_rate"} over the whole file, batches finished by an earlier run included. `progress(done, batches, k)`
    is called after each batch. `device` "auto" samples on CUDA when it is available."""
    s, rule, out = sampling or SamplingOptions(), keep or KeepRule(), Path(out)
    for name in ("k", "rounds"):
        if getattr(s, name) < 1:
            raise ValueError(f"sampling {name}={getattr(s, name)}: it must be at least 1 (k: responses per prompt "
                             "and round; rounds: 1 samples each prompt once)")
    out.parent.mkdir(parents=True, exist_ok=True)
    reward = CombinedReward(rewards)
    unknown = [n for n in rule.min_scores if n != "total" and n not in reward.names]
    if unknown:
        raise ValueError(f"keep.min_scores names {unknown}, which are not among the rewards {reward.names} "
                         f"(or 'total'); add them to `rewards` or fix the name")
    done = _done_batches(out)
    _repair(out, done)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    model, tok = load_causal_lm(policy).eval().to(device), load_tokenizer(policy)
    engine = ROLLOUT_ENGINES.get(s.engine)(**({"dtype": s.dtype} if s.dtype else {}))
    provenance = {"policy": str(policy), "sampling": asdict(s)}
    batches = [rows[i : i + batch_prompts] for i in range(0, len(rows), batch_prompts)]
    for b, batch in enumerate(batches):
        if b in done:
            continue
        torch.manual_seed(seed + b)
        kept, sampled = _sample_batch(batch, model, tok, engine, reward, s, rule, device)
        with out.open("a") as f:
            for p, text, scores, total in kept:
                row = {**batch[p], "completion": text, "scores": scores, "total": total, **provenance,
                       "seed": seed + b, "batch": b, "prompt_index": b * batch_prompts + p}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        done[b] = {"batch": b, "prompts": len(batch), "sampled": sampled, "kept": len(kept)}
        with Path(f"{out}.progress").open("a") as f:
            f.write(json.dumps(done[b]) + "\n")
        if progress is not None:
            progress(done, len(batches), s.k)
    prompts = sum(d["prompts"] for d in done.values())
    sampled_total = sum(sampled_count(d, s.k) for d in done.values())
    kept_total = sum(d["kept"] for d in done.values())
    return {"prompts": prompts, "sampled": sampled_total, "kept": kept_total,
            "keep_rate": kept_total / max(1, sampled_total)}


def sampled_count(record: dict, k: int) -> int:
    """Responses sampled for one progress record (files written before `rounds` existed lack "sampled")."""
    return record.get("sampled", record["prompts"] * k)


def _sample_batch(batch: list[dict], model: Any, tok: Any, engine: Any, reward: Any, s: SamplingOptions,
                  rule: KeepRule, device: str) -> tuple[list[tuple], int]:
    """The kept responses of one batch of prompts, in prompt order, after up to `s.rounds` rounds (each round
    samples k more for the prompts that kept nothing yet); and how many responses were sampled."""
    kept: list[tuple] = []
    pending, sampled = list(range(len(batch))), 0
    for _ in range(s.rounds):
        rows = [batch[p] for p in pending]
        ids, mask = (t.to(device) for t in encode_prompts(tok, [r["prompt"] for r in rows], s.max_prompt_length))
        with torch.no_grad():
            ro = engine.generate(model, ids, mask, num_generations=s.k, max_new_tokens=s.max_new_tokens,
                                 temperature=s.temperature, top_p=s.top_p, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
        sampled += len(rows) * s.k
        kept += [(pending[p], *rest) for p, *rest in _select(rows, ro.decode(tok), reward, s.k, rule)]
        have = {p for p, *_ in kept}
        pending = [p for p in pending if p not in have]
        if not pending:
            break
    return sorted(kept, key=lambda item: item[0]), sampled

"""Parse the `rewards` YAML key and combine the named rewards into one weighted score.

Two YAML forms (extra keys in the list form are the reward's constructor settings):

    rewards: {accuracy: 1.0, format: 0.5}
    rewards: [{name: accuracy, weight: 1.0}, {name: reward_model, weight: 1.0, path: ckpt/rm}]

`CombinedReward(specs)(prompts, completions, columns)` returns `RewardOutput`: the weighted total
(N,) float32, each component's raw scores (N,), and how many samples errored. A reward that raises on
a batch is retried sample by sample; samples that still raise (or return NaN/inf) score 0, are
counted, and ONE warning per reward name per process names the reward, the exception and a sample
index: a flaky reward never stops a run. Returning the wrong number of values, or non-numbers, is a
bug in the reward and raises. A reward with a `timeout` (seconds per call, in its list entry or mapping) that
takes longer scores 0 on that whole batch, counted as errors and warned about like a failure (the late call
finishes in a daemon thread whose result is dropped). A reward that raises a user error
(`lightning_rlhf.errors.UserError`, e.g. a reward model directory that cannot be loaded) stops the run with its
message: every sample would fail. Config errors here (an unknown name, a bad weight or setting) are ConfigErrors
(ValueErrors), which the command line prints as one line.

Simplifications: component names must be unique (one entry per name); dataset columns named
`prompts` or `completions` are not passed on (they would clash with the positional arguments).
"""

from __future__ import annotations

import inspect
import math
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from lightning_rlhf.errors import ConfigError, UserError
from lightning_rlhf.rewards.registry import REWARDS

_WARNED: set[str] = set()  # reward names already warned about in this process


class RewardReturnError(ValueError):
    """A reward returned the wrong number of values, or non-numbers: a bug in the reward."""


class RewardTimeout(TimeoutError):
    """A reward call ran past its `timeout`."""


def call_with_timeout(fn: Callable[..., Any], timeout: float | None, *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs), or RewardTimeout when it takes longer than `timeout` seconds (None: no limit). The
    call runs in a daemon thread: Python cannot stop it, so a late call finishes unseen and its result is dropped."""
    if timeout is None:
        return fn(*args, **kwargs)
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = e

    worker = threading.Thread(target=run, daemon=True, name="reward-call")
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise RewardTimeout(f"reward call took longer than {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


class RewardWarning(UserWarning):
    """A reward function raised or returned NaN on some samples (they scored 0)."""


@dataclass(frozen=True)
class RewardSpec:
    """One component: registered `name`, `weight` in the sum, constructor `kwargs`."""

    name: str
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)
    timeout: float | None = None  # seconds per call; None: wait as long as it takes


@dataclass
class RewardOutput:
    total: torch.Tensor  # (N,) float32, sum_k weight_k * per_reward[k]
    per_reward: dict[str, torch.Tensor]  # name -> (N,) float32, unweighted
    errors: int  # samples (summed over rewards) that raised or returned NaN and scored 0
    errors_by_reward: dict[str, int] = field(default_factory=dict)


def _weight(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"reward '{name}': weight must be a finite number, got {value!r}")
    return float(value)


def _spec_from_mapping(item: Mapping, where: str) -> RewardSpec:
    if "name" not in item:
        raise ConfigError(f"{where}: each list entry needs a 'name' (one of: {', '.join(REWARDS.names())}); "
                          f"got {dict(item)}")
    kwargs = {k: v for k, v in item.items() if k not in ("name", "weight", "timeout")}
    timeout = item.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ConfigError(f"{where}: timeout must be a positive number of seconds per call, got {timeout!r}")
    name = str(item["name"])
    return RewardSpec(name, _weight(name, item.get("weight", 1.0)), kwargs, None if timeout is None else float(timeout))


def parse_reward_specs(rewards: Any) -> list[RewardSpec]:
    """Turn the YAML `rewards` value (dict shorthand, list of dicts/names/RewardSpecs) into specs."""
    if isinstance(rewards, RewardSpec):
        return [rewards]
    if isinstance(rewards, str):
        return [RewardSpec(rewards)]
    specs: list[RewardSpec] = []
    if isinstance(rewards, Mapping):
        for name, value in rewards.items():
            if isinstance(value, Mapping):  # {reward_model: {weight: 1.0, path: ...}}
                specs.append(_spec_from_mapping({"name": name, **value}, f"rewards.{name}"))
            else:
                specs.append(RewardSpec(str(name), _weight(str(name), value)))
    elif isinstance(rewards, Sequence):
        for i, item in enumerate(rewards):
            if isinstance(item, RewardSpec):
                specs.append(item)
            elif isinstance(item, str):
                specs.append(RewardSpec(item))
            elif isinstance(item, Mapping):
                specs.append(_spec_from_mapping(item, f"rewards[{i}]"))
            else:
                raise ConfigError(f"rewards[{i}]: expected a name or a dict with 'name', got {type(item).__name__}")
    else:
        raise ConfigError("rewards: expected a dict {name: weight} or a list of {name: ..., weight: ...}, "
                          f"got {type(rewards).__name__}")
    if not specs:
        raise ConfigError(f"rewards: empty; name at least one of: {', '.join(REWARDS.names())}")
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"rewards: {dupes} listed more than once; give each reward one entry")
    return specs


def build_reward(spec: RewardSpec) -> Callable[..., list[float]]:
    """The callable for one spec: a registered function, or a registered class built with kwargs."""
    obj = REWARDS.get(spec.name)  # ConfigError listing the valid names on a typo
    if not isinstance(obj, type):
        if spec.kwargs:
            raise ConfigError(f"reward '{spec.name}' is a plain function and takes no settings; "
                              f"remove {sorted(spec.kwargs)}")
        return obj
    params = inspect.signature(obj.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    valid = [n for n in params if n != "self" and params[n].kind is not inspect.Parameter.VAR_KEYWORD]
    bad = sorted(set(spec.kwargs) - set(valid))
    if bad and not takes_any:
        raise ConfigError(f"reward '{spec.name}': unknown settings {bad}; valid: {valid}")
    try:
        return obj(**spec.kwargs)
    except UserError:
        raise
    except (TypeError, ValueError) as e:  # a missing or out-of-range setting, checked by the reward itself
        raise ConfigError(f"reward '{spec.name}': bad settings {dict(spec.kwargs)}: {e}") from e


def _to_floats(name: str, raw: Any, n: int) -> torch.Tensor:
    """(n,) float64 from a reward's return value; wrong count or non-numbers raise (a reward bug)."""
    try:
        values = [float(v) for v in raw]
    except (TypeError, ValueError) as e:
        raise RewardReturnError(f"reward '{name}' must return a list of floats, got {type(raw).__name__} ({e})") from e
    if len(values) != n:
        raise RewardReturnError(f"reward '{name}' returned {len(values)} values for {n} completions; "
                                "return one per completion")
    return torch.tensor(values, dtype=torch.float64)


def _warn_once(name: str, what: str, index: int, count: int) -> None:
    if name in _WARNED:
        return
    _WARNED.add(name)
    warnings.warn(f"reward '{name}' failed on {count} sample(s), e.g. sample {index}: {what}. Those samples score 0 "
                  "and are counted in RewardOutput.errors (this warning is shown once per reward); "
                  "fix the reward function or the dataset columns it reads.", RewardWarning, stacklevel=3)


class CombinedReward:
    """Weighted sum of named rewards; `names` lists the components in order."""

    def __init__(self, specs: Any):
        self.specs = parse_reward_specs(specs)
        self.names = [s.name for s in self.specs]
        self.weights = {s.name: s.weight for s in self.specs}
        self.fns = {s.name: build_reward(s) for s in self.specs}
        self.timeouts = {s.name: s.timeout for s in self.specs}

    def to(self, device: str | torch.device) -> "CombinedReward":
        """Move components that hold models (e.g. `reward_model`) to `device`."""
        for fn in self.fns.values():
            if hasattr(fn, "to"):
                fn.to(device)
        return self

    def __call__(self, prompts: list[str], completions: list[str],
                 columns: dict[str, Sequence] | None = None) -> RewardOutput:
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"rewards: {len(prompts)} prompts but {n} completions; repeat each prompt per completion")
        columns = {k: v for k, v in (columns or {}).items() if k not in ("prompts", "completions")}
        for key, col in columns.items():
            if len(col) != n:
                raise ValueError(f"rewards: column '{key}' has {len(col)} values for {n} completions; align it")
        total = torch.zeros(n, dtype=torch.float64)
        per_reward, errors = {}, {}
        for name in self.names:
            values, errors[name] = self._score(name, list(prompts), list(completions), columns)
            per_reward[name] = values.float()
            total += self.weights[name] * values
        return RewardOutput(total.float(), per_reward, sum(errors.values()), errors)

    def _score(self, name: str, prompts: list[str], completions: list[str], columns: dict) -> tuple[torch.Tensor, int]:
        fn, n = self.fns[name], len(completions)
        timeout = self.timeouts[name]
        try:
            raw = call_with_timeout(fn, timeout, prompts, completions, **columns)
        except UserError:
            raise
        except RewardTimeout:
            _warn_once(name, f"timed out after {timeout:g} s (the whole batch)", 0, n)
            return torch.zeros(n, dtype=torch.float64), n
        except Exception:  # noqa: BLE001 - find the samples that fail, score the rest
            values = self._score_per_sample(name, prompts, completions, columns)
        else:
            values = _to_floats(name, raw, n)  # RewardReturnError: a bug in the reward, raised
        bad = ~torch.isfinite(values)
        if bad.any():  # NaN/inf returned (or a sample raised, see _score_per_sample): score 0, count it
            first = int(bad.nonzero()[0])
            _warn_once(name, f"returned {float(values[first])}", first, int(bad.sum()))
            values = torch.where(bad, torch.zeros_like(values), values)
        return values, int(bad.sum())

    def _score_per_sample(self, name: str, prompts: list[str], completions: list[str], columns: dict) -> torch.Tensor:
        """Retry one sample at a time; a sample that raises becomes NaN (then 0 and counted)."""
        fn, out, failed = self.fns[name], [], []
        for i in range(len(completions)):
            try:
                raw = call_with_timeout(fn, self.timeouts[name], [prompts[i]], [completions[i]],
                                        **{k: [col[i]] for k, col in columns.items()})
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure of a user reward must not stop the run
                failed.append((i, e))
                out.append(math.nan)
                continue
            out.append(float(_to_floats(name, raw, 1)[0]))
        if failed:
            i, e = failed[0]
            _warn_once(name, f"raised {type(e).__name__}: {e}", i, len(failed))
        return torch.tensor(out, dtype=torch.float64)

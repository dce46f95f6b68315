"""CombinedReward: YAML spec forms, weighted sums, and rewards that fail without stopping the run."""

import math
import warnings

import pytest
import torch

from lightning_rlhf.rewards import REWARDS, CombinedReward, RewardSpec, parse_reward_specs
from lightning_rlhf.rewards.compose import RewardWarning


# Test-only rewards, registered once under names no real reward uses.
@REWARDS.register("test_length")
def _length(prompts, completions, **_):
    return [float(len(c)) for c in completions]


@REWARDS.register("test_boom_on_x")
def _boom_on_x(prompts, completions, **_):
    for c in completions:
        if "x" in c:
            raise RuntimeError("cannot score x")
    return [1.0] * len(completions)


@REWARDS.register("test_always_boom")
def _always_boom(prompts, completions, **_):
    raise KeyError("no such column")


@REWARDS.register("test_nan_on_x")
def _nan_on_x(prompts, completions, **_):
    return [math.nan if "x" in c else 2.0 for c in completions]


@REWARDS.register("test_wrong_count")
def _wrong_count(prompts, completions, **_):
    return [1.0]


@REWARDS.register("test_scaled")
class _Scaled:
    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def __call__(self, prompts, completions, offset=None, **_):
        return [self.scale * len(c) + o for c, o in zip(completions, offset)]


P = ["p"] * 3


def test_weighted_sum_by_hand():
    # completions "ab", "<think>t</think><answer>7</answer>", "<think>t</think><answer>8</answer>", gold 7.
    # test_length: 2, 34, 34.  format: 0, 1, 1.  accuracy: 0, 1, 0.
    # total = 0.1*len + 0.5*format + 2*accuracy:
    #   0.2 + 0   + 0 = 0.2;   3.4 + 0.5 + 2 = 5.9;   3.4 + 0.5 + 0 = 3.9
    good, wrong = "<think>t</think><answer>7</answer>", "<think>t</think><answer>8</answer>"
    combined = CombinedReward({"test_length": 0.1, "format": 0.5, "accuracy": 2.0})
    out = combined(P, ["ab", good, wrong], {"answer": ["7", "7", "7"]})
    assert combined.names == ["test_length", "format", "accuracy"]
    assert out.total.dtype == torch.float32 and out.total.shape == (3,)
    assert torch.allclose(out.total, torch.tensor([0.2, 5.9, 3.9]))
    assert out.per_reward["test_length"].tolist() == [2.0, 34.0, 34.0]  # unweighted
    assert out.per_reward["format"].tolist() == [0.0, 1.0, 1.0]
    assert out.per_reward["accuracy"].tolist() == [0.0, 1.0, 0.0]
    assert out.errors == 0


def test_list_form_with_kwargs_and_columns():
    # test_scaled(scale=3) with column offset: 3*len + offset -> 3*1+10 = 13, 3*2+20 = 26; weight 0.5.
    combined = CombinedReward([{"name": "test_scaled", "weight": 0.5, "scale": 3.0}, {"name": "test_length"}])
    out = combined(["p", "p"], ["a", "bb"], {"offset": [10.0, 20.0], "unused": ["u", "v"]})
    assert out.per_reward["test_scaled"].tolist() == [13.0, 26.0]
    # total = 0.5*13 + 1*1 = 7.5; 0.5*26 + 1*2 = 15
    assert out.total.tolist() == [7.5, 15.0]


def test_spec_forms_agree():
    as_dict = parse_reward_specs({"accuracy": 1.0, "format": 0.5})
    as_list = parse_reward_specs([{"name": "accuracy", "weight": 1.0}, {"name": "format", "weight": 0.5}])
    assert as_dict == as_list == [RewardSpec("accuracy", 1.0), RewardSpec("format", 0.5)]
    nested = parse_reward_specs({"reward_model": {"weight": 2.0, "path": "ckpt/rm"}})
    assert nested == [RewardSpec("reward_model", 2.0, {"path": "ckpt/rm"})]


def test_raising_reward_is_retried_counted_and_warned_once():
    combined = CombinedReward({"test_boom_on_x": 1.0, "test_length": 1.0})
    completions = ["a", "x", "b", "xx"]
    with pytest.warns(RewardWarning) as record:
        out = combined(["p"] * 4, completions)
    # Batch call raised; per sample: "a"->1, "x"->raises->0, "b"->1, "xx"->raises->0.
    assert out.per_reward["test_boom_on_x"].tolist() == [1.0, 0.0, 1.0, 0.0]
    # total = boom + len: 1+1, 0+1, 1+1, 0+2
    assert out.total.tolist() == [2.0, 1.0, 2.0, 2.0]
    assert out.errors == 2 and out.errors_by_reward == {"test_boom_on_x": 2, "test_length": 0}
    boom = [w for w in record if issubclass(w.category, RewardWarning)]
    assert len(boom) == 1
    msg = str(boom[0].message)
    assert "test_boom_on_x" in msg and "RuntimeError: cannot score x" in msg and "sample 1" in msg
    # A second failing batch still counts errors but does not warn again in this process.
    with warnings.catch_warnings():
        warnings.simplefilter("error", RewardWarning)
        again = combined(["p"], ["x"])
    assert again.errors == 1 and again.per_reward["test_boom_on_x"].tolist() == [0.0]


def test_reward_failing_on_every_sample_scores_zero():
    with pytest.warns(RewardWarning, match="test_always_boom.*KeyError"):
        out = CombinedReward(["test_always_boom"])(["p", "p"], ["a", "b"])
    assert out.total.tolist() == [0.0, 0.0] and out.errors == 2


def test_nan_is_scored_zero_and_counted():
    with pytest.warns(RewardWarning, match="test_nan_on_x.*nan"):
        out = CombinedReward({"test_nan_on_x": 0.5})(["p", "p"], ["x", "y"])
    # "x" -> NaN -> 0; "y" -> 2.0, weighted 0.5 -> 1.0
    assert out.total.tolist() == [0.0, 1.0] and out.errors == 1


def test_wrong_number_of_values_raises_naming_the_reward():
    with pytest.raises(ValueError, match="test_wrong_count' returned 1 values for 2"):
        CombinedReward(["test_wrong_count"])(["p", "p"], ["a", "b"])


def test_bad_names_and_settings():
    with pytest.raises(ValueError, match="unknown reward function 'acuracy'. Valid names: .*accuracy"):
        CombinedReward({"acuracy": 1.0})
    with pytest.raises(ValueError, match="'format' is a plain function.*\\['strict'\\]"):
        CombinedReward([{"name": "format", "strict": True}])
    with pytest.raises(ValueError, match="'test_scaled': unknown settings \\['sacle'\\]"):
        CombinedReward([{"name": "test_scaled", "sacle": 2.0}])
    with pytest.raises(ValueError, match="weight must be a finite number"):
        CombinedReward({"format": "high"})
    with pytest.raises(ValueError, match="more than once"):
        CombinedReward([{"name": "format"}, {"name": "format", "weight": 2.0}])
    with pytest.raises(ValueError, match="needs a 'name'"):
        CombinedReward([{"weight": 1.0}])


def test_misaligned_column_names_it():
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2"):
        CombinedReward(["accuracy"])(["p", "p"], ["a", "b"], {"answer": ["1"]})


def test_a_reward_that_times_out_scores_zero_and_is_counted():
    import time

    from lightning_rlhf.rewards import REWARDS, CombinedReward
    from lightning_rlhf.rewards.compose import _WARNED

    if "test_sleepy" not in REWARDS.names():
        @REWARDS.register("test_sleepy")
        def sleepy(prompts, completions, **_):
            time.sleep(2.0 if any("slow" in c for c in completions) else 0.0)
            return [1.0] * len(completions)

    _WARNED.discard("test_sleepy")
    combined = CombinedReward([{"name": "test_sleepy", "weight": 2.0, "timeout": 0.2}, {"name": "format", "weight": 1.0}])
    fast = combined(["q", "q"], ["a", "b"])
    assert fast.errors == 0 and fast.per_reward["test_sleepy"].tolist() == [1.0, 1.0]
    t0 = time.perf_counter()
    with pytest.warns(UserWarning, match="reward 'test_sleepy' failed on 2 sample.*timed out after 0.2 s"):
        slow = combined(["q", "q"], ["a", "slow"])
    assert time.perf_counter() - t0 < 1.5  # did not wait the 2 s
    # the whole batch of the late reward scores 0 and both samples count as errors; the other reward still scores
    assert slow.per_reward["test_sleepy"].tolist() == [0.0, 0.0] and slow.errors_by_reward == {"test_sleepy": 2, "format": 0}
    assert torch.equal(slow.total, slow.per_reward["format"])
    with pytest.raises(ValueError, match=r"timeout must be a positive number of seconds per call, got -1"):
        CombinedReward([{"name": "format", "timeout": -1}])

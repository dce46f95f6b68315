"""The bilingual arithmetic task: questions in English or Chinese, cold-start reasoning that sometimes
switches language, and the language-mixing measure the R1 pipeline reports."""

import pytest

from lightning_rlhf.data import TASKS
from lightning_rlhf.data.bilingual import say_reasoning, say_step
from lightning_rlhf.rewards import REWARDS
from lightning_rlhf.rewards.rules import LanguageConsistency, language_mixed


def test_steps_are_said_in_the_language():
    assert say_step("40+30=70", "en") == "40 plus 30 is 70"
    assert say_step("83-20=63", "zh") == "83减20得63"
    assert say_reasoning(["40*6=240", "7*6=42", "240+42=282"], "zh") == "40乘6得240，7乘6得42，240加42得282"
    # switching after the first step: the R1-Zero habit the language reward is meant to remove
    assert say_reasoning(["83-20=63", "63-9=54"], "zh", switch_to="en") == "83减20得63, 63 minus 9 is 54"


def test_rows_prompts_and_answers():
    rows = TASKS.get("bilingual_arithmetic")(400, seed=0)
    assert set(rows[0]) == {"prompt", "answer", "question", "language"}
    zh = [r for r in rows if r["language"] == "zh"]
    assert 0.4 < len(zh) / len(rows) < 0.6  # zh_share 0.5
    assert all("等于多少" in r["prompt"] for r in zh)
    assert all(r["prompt"].startswith("What is ") for r in rows if r["language"] == "en")
    # the answer is the question's value: "47 plus 38" -> 85, "83减29" -> 54
    for r in rows:
        q = r["question"].replace(" plus ", "+").replace(" minus ", "-").replace(" times ", "*")
        q = q.replace("加", "+").replace("减", "-").replace("乘", "*")
        assert int(r["answer"]) == eval(q)  # noqa: S307 (digits and + - * only)
    assert TASKS.get("bilingual_arithmetic")(50, seed=0, zh_share=0.0)[0]["language"] == "en"


def test_splits_do_not_share_questions():
    train = {r["question"] for r in TASKS.get("bilingual_arithmetic")(500, seed=0, split="train")}
    val = {r["question"] for r in TASKS.get("bilingual_arithmetic")(100, seed=1, split="val")}
    assert not train & val


def test_cold_start_mixing_share_is_measured_by_language_mixed_and_paid_less():
    rows = TASKS.get("bilingual_arithmetic_sft")(1000, seed=0, mix_share=0.3)
    prompts, completions = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    mixed = [language_mixed(p, c) for p, c in zip(prompts, completions)]
    assert 0.25 < sum(mixed) / len(rows) < 0.35  # mix_share 0.3
    scores = LanguageConsistency("auto")(prompts, completions)
    # Unmixed reasoning is all in the prompt's language. Mixed reasoning says its first step in it and the
    # rest in the other language, so at most half its units are right: "83减20得63, 63 minus 9 is 54"
    # has 减, 得 = 2 zh units and "minus", "is" = 2 en units -> 2 / 4 = 0.5.
    assert all(s == 1.0 for s, m in zip(scores, mixed) if not m)
    assert all(s <= 0.5 for s, m in zip(scores, mixed) if m)
    accuracy = REWARDS.get("accuracy")()(prompts, completions, answer=[r["answer"] for r in rows])
    assert sum(accuracy) == len(rows)  # every cold-start answer is right; only the language is at fault
    assert not any(language_mixed(p, c) for p, c in zip(prompts, [r["completion"] for r in
                   TASKS.get("bilingual_arithmetic_sft")(200, seed=0, mix_share=0.0)]))


def test_language_mixed_cases():
    assert language_mixed("Q", "<think>We add 加</think><answer>1</answer>")
    assert not language_mixed("Q", "<think>We add</think><answer>加</answer>")  # the answer is not reasoning
    assert not language_mixed("Q", "<think>12+4=16</think><answer>16</answer>")  # neutral only
    assert not language_mixed("Q", "We add 加 <answer>1</answer>")  # no reasoning block


def test_bad_shares_are_named():
    with pytest.raises(ValueError, match="mix_share must be in"):
        TASKS.get("bilingual_arithmetic_sft")(10, mix_share=1.5)


def test_language_mixed_share_is_logged_for_sets_with_a_language_column(tiny_model_dir, tmp_path):
    import torch
    from lightning.pytorch import Trainer

    from lightning_rlhf.algorithms import SFT
    from lightning_rlhf.algorithms.stage import language_mixed_share
    from lightning_rlhf.data import SFTDataModule

    batch = {"prompt": ["What is 2 plus 3?"] * 3, "language": ["en"] * 3}
    completions = ["<think>2 plus 3 is 5</think><answer>5</answer>", "<think>2加3得5, so 5</think><answer>5</answer>",
                   "<answer>5</answer>"]
    assert language_mixed_share(batch, completions) == [0.0, 1.0, 0.0]  # one of three mixes en and zh
    assert language_mixed_share({"prompt": ["q"]}, ["<think>a 加</think>"]) == []  # no language column

    torch.manual_seed(0)
    module = SFT(policy=str(tiny_model_dir), max_length=96, max_prompt_length=64, val_max_new_tokens=8)
    data = SFTDataModule(train={"task": "bilingual_arithmetic_sft", "n": 16},
                         val={"task": "bilingual_arithmetic_sft", "n": 8, "split": "val"}, batch_size=8,
                         val_batch_size=8)
    Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            default_root_dir=tmp_path).fit(module, datamodule=data)
    metrics = module.eval_history[-1][1]
    assert 0.0 <= metrics["val/language_mixed"] <= 1.0 and "val/accuracy" in metrics


def test_rl_stages_log_language_mixed_too(tiny_model_dir, tmp_path):
    import torch
    from lightning.pytorch import Trainer

    from lightning_rlhf.algorithms import GRPO
    from lightning_rlhf.data import PromptDataModule

    torch.manual_seed(0)
    module = GRPO(policy=str(tiny_model_dir), rewards={"language": 1.0},
                  rollout={"num_generations": 2, "max_new_tokens": 4}, loss={"beta": 0.0})
    data = PromptDataModule(train={"task": "bilingual_arithmetic", "n": 4},
                            val={"task": "bilingual_arithmetic", "n": 4, "split": "val"}, batch_size=2, val_batch_size=4)
    Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            default_root_dir=tmp_path).fit(module, datamodule=data)
    assert 0.0 <= module.eval_history[-1][1]["val/language_mixed"] <= 1.0

"""RewardModelScorer: loads a local HF reward model and scores independently of padding and batching."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

from lightning_rlhf.rewards import CombinedReward, RewardModelScorer

TEXTS = ["what is 12 + 4 ?", "the answer is 16", "we add twelve and four to get sixteen", "so it is 16 !"]
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s> {% endfor %}")


def _save_tiny_rm(path, padding_side: str, chat_template: str | None = None):
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "</s>"])
    tok.train_from_iterator(TEXTS + ["<user> <assistant>"], trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>")
    hf_tok.padding_side = padding_side
    if chat_template:
        hf_tok.chat_template = chat_template
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(hf_tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, num_labels=1, pad_token_id=hf_tok.pad_token_id)
    model = LlamaForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # visible score differences between texts
    model.save_pretrained(path)
    hf_tok.save_pretrained(path)
    return model, hf_tok


@pytest.fixture(scope="module", params=["left", "right"])
def rm_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"rm_{request.param}")
    _save_tiny_rm(path, request.param)
    return path


def test_padding_and_batch_invariance(rm_dir):
    scorer = RewardModelScorer(str(rm_dir), batch_size=8)
    short_prompt, short = "what is 12 + 4 ?", " 16"
    long_prompt, long = "what is 12 + 4 ?", " we add twelve and four to get sixteen so it is 16 !"
    alone = scorer([short_prompt], [short])
    batched = scorer([long_prompt, short_prompt], [long, short])
    assert len(alone) == 1 and len(batched) == 2 and all(isinstance(v, float) for v in batched)
    assert abs(alone[0] - batched[1]) < 1e-5
    assert abs(batched[0] - batched[1]) > 1e-3  # different texts really score differently


def test_matches_the_models_own_score_on_an_unpadded_sequence(rm_dir):
    # With one sequence and no padding, HF's pooled logit is the last token's score: the same number.
    scorer = RewardModelScorer(str(rm_dir))
    model = LlamaForSequenceClassification.from_pretrained(rm_dir).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(rm_dir)
    with torch.no_grad():
        expected = model(**tok(["the answer is 16"], return_tensors="pt")).logits[0, 0].item()
    assert scorer(["the answer"], [" is 16"])[0] == pytest.approx(expected, abs=1e-5)


def test_output_length_across_batches(rm_dir):
    scorer = RewardModelScorer(str(rm_dir), batch_size=2)
    prompts = ["what is 12 + 4 ?"] * 5
    completions = [" 16", " so it is 16 !", " sixteen", " the answer is 16", " we add"]
    scores = scorer(prompts, completions)
    assert len(scores) == 5
    # batches of 2, 2, 1 give the same numbers as one batch of 5
    assert scores == pytest.approx(RewardModelScorer(str(rm_dir), batch_size=5)(prompts, completions), abs=1e-5)


def test_lazy_load_and_to(rm_dir):
    scorer = RewardModelScorer(str(rm_dir)).to("cpu")
    assert scorer.model is None  # nothing loaded until the first call
    scorer(["a"], ["b"])
    assert scorer.model is not None and not scorer.model.training
    assert next(scorer.model.parameters()).device.type == "cpu"


def test_release_weights_frees_them_between_calls_and_scores_the_same(rm_dir):
    prompts, completions = ["what is 12 + 4 ?"] * 3, [" 16", " so it is 16 !", " sixteen"]
    resident = RewardModelScorer(str(rm_dir))
    released = RewardModelScorer(str(rm_dir), release_weights=True)
    expected = resident(prompts, completions)
    assert released(prompts, completions) == expected  # the weights read back are the file's: same numbers
    # between calls every weight is an empty tensor (its memory freed); the next call reads them back
    assert all(p.numel() == 0 for p in released.model.parameters())
    assert released(prompts[:1], completions[:1]) == expected[:1]
    assert all(p.numel() == 0 for p in released.model.parameters())
    assert all(p.numel() > 0 for p in resident.model.parameters())  # without the option nothing is freed


def test_a_released_reward_model_whose_file_changed_stops_the_run(tmp_path):
    # Scored 0 with a warning (how a failing reward is treated) would hide it: it is a user error that stops.
    from lightning_rlhf.models.reloadable import CheckpointChanged

    _save_tiny_rm(tmp_path, "left")
    reward = CombinedReward([{"name": "reward_model", "path": str(tmp_path), "release_weights": True}])
    reward(["what is 12 + 4 ?"], [" 16"])
    _save_tiny_rm(tmp_path, "left")  # the checkpoint rewritten during the run
    with pytest.raises(CheckpointChanged, match="release_weights: .* changed since the reward model"):
        reward(["what is 12 + 4 ?"], [" 16"])


def test_chat_template_is_used(tmp_path):
    _save_tiny_rm(tmp_path, "left", TEMPLATE)
    scorer = RewardModelScorer(str(tmp_path)).load()
    assert scorer.format_text("what is 12 + 4 ?", "16") == "<user> what is 12 + 4 ? </s> <assistant> 16 </s> "
    plain = RewardModelScorer(str(tmp_path), apply_chat_template=False).load()
    assert plain.format_text("what is 12 + 4 ?", " 16") == "what is 12 + 4 ? 16"
    assert scorer(["what is 12 + 4 ?"], ["16"])[0] != pytest.approx(plain(["what is 12 + 4 ?"], [" 16"])[0])


def test_missing_path_names_it_and_the_recipe(tmp_path):
    missing = tmp_path / "no_such_rm"
    with pytest.raises(FileNotFoundError, match="no_such_rm.*recipes/reward_model/tiny_arithmetic.yaml"):
        RewardModelScorer(str(missing))(["a"], ["b"])


def test_used_by_name_in_combined_reward(rm_dir):
    combined = CombinedReward([{"name": "reward_model", "weight": 2.0, "path": str(rm_dir), "batch_size": 1}])
    out = combined(["what is 12 + 4 ?"] * 2, [" 16", " sixteen"])
    direct = RewardModelScorer(str(rm_dir))(["what is 12 + 4 ?"] * 2, [" 16", " sixteen"])
    assert out.total.tolist() == pytest.approx([2 * d for d in direct], abs=1e-5)

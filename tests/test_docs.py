"""The docs stand alone and their examples run: every Python block of docs/architecture.md registers what
it says, and the registered entry works on a small input; no file in the repository points outside it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCH = REPO / "docs" / "architecture.md"

# After the page's examples are executed (in a fresh interpreter, so the registries of this test process stay
# as they are), each new entry is looked up by name and called.
CHECK = r'''
import torch
from lightning_rlhf.functional import ADVANTAGE_ESTIMATORS, POLICY_LOSSES
from lightning_rlhf.rewards import CombinedReward
from lightning_rlhf.rollout import ROLLOUT_ENGINES
from lightning_rlhf.data import TASKS

out = CombinedReward({"short_answer": 1.0})(["q", "q"], ["ok", "x" * 300])
assert out.total.tolist() == [1.0, 0.0], out.total
mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], requires_grad=True)
loss, stats = POLICY_LOSSES.get("reinforce")(logp, logp.detach(), torch.tensor([1.0, -2.0]), mask)
# -A * logp over the 3 real tokens: (1*1 + 1*2 + (-2)*0.5) / 3 = (1 + 2 - 1) / 3 = 2/3
assert abs(float(loss) - 2 / 3) < 1e-6, loss
rewards = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.0]])
adv, _ = ADVANTAGE_ESTIMATORS.get("max_baseline")(rewards, mask, group_size=2)
# group scores [1.0, 0.5], max 1.0 -> A = [0, -0.5] on each row's real tokens
assert adv.tolist() == [[0.0, 0.0, 0.0], [-0.5, 0.0, 0.0]], adv
assert ROLLOUT_ENGINES.get("hf_chunked")(rows=8).max_batch_size == 8
rows = TASKS.get("doubling")(5, seed=1, split="val")
assert len(rows) == 5 and all(int(r["answer"]) == 2 * int(r["prompt"][2:-2]) for r in rows), rows
print("ok")
'''


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_architecture_examples_run():
    blocks = [b for b in _python_blocks(ARCH.read_text()) if "from lightning_rlhf.cli import main" not in b]
    assert len(blocks) == 5  # reward, loss, estimator, engine, task
    script = "\n\n".join(blocks) + "\n" + CHECK
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_readme_links_the_docs_and_nothing_points_outside_the_repository():
    readme = (REPO / "README.md").read_text()
    assert "docs/architecture.md" in readme and "docs/math.md" in readme
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=REPO).stdout.split()
    untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], capture_output=True,
                               text=True, cwd=REPO).stdout.split()
    # Built from pieces, so that this file does not name them itself: the folder beside the repository
    # and the design document in it, which users of the repository never see.
    OUTSIDE_WORDS = ("../" + "shared", "DES" + "IGN.md")
    offenders = []
    for name in tracked + untracked:
        path = REPO / name
        if path.suffix not in (".py", ".md", ".yaml", ".toml", ".txt"):
            continue
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if any(word in text for word in OUTSIDE_WORDS):
            offenders.append(name)
    assert offenders == [], f"these files point outside the repository: {offenders}"

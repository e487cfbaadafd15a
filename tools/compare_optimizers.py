"""AdamW against Muon on the same data: validation loss at equal steps, and the step at which Muon first reaches
AdamW's final validation loss.

    python tools/compare_optimizers.py [--presets tiny tiny_mamba] [--steps 60] [--eval_interval 10]
                                       [--batch_size 8] [--learning_rate 1e-3] [--set KEY.PATH=VALUE ...]

Each preset trains twice in this process on one CPU or GPU rank through the project's trainer (launcher config,
memory plan and DeepSpeed config as `launcher/run.py` builds them), once per optimizer, from the same seed and
the same windows of the embedded corpus (the sampler reads by global position, so equal steps are equal tokens).
Muon reuses AdamW's learning rate and weight decay (engine/param_groups.py `muon_lr_multiplier`); the schedule
(warm-up 10% of the steps, cosine) and everything else are equal, except gradient clipping, off for Muon
(docs/optimizers.md says why) and left at the preset's value for AdamW. Checkpoints and logs go to a temporary folder.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

OPTIMIZERS = ("adamw", "muon")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "tiny_mamba"], help="presets to train")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--eval_interval", type=int, default=10, help="evaluate every this many steps")
    parser.add_argument("--eval_batches", type=int, default=4, help="validation micro-batches per evaluation")
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per step")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="peak lr of both optimizers")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="more config overrides for every run, e.g. --set model.max_seq_len=128")
    args = parser.parse_args(argv)
    for name in ("steps", "eval_interval", "eval_batches", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    return args


def train_once(preset: str, optimizer: str, args: argparse.Namespace, folder: Path) -> dict:
    """One run; returns {'val': {step: loss}, 'seconds': wall time of training, 'steps': n}."""
    from deepspeed.accelerator import get_accelerator

    from engine.trainer import Trainer
    from launcher.config import build_run_config
    from launcher.ds_config import build_ds_config
    from launcher.planning.plan import choose_plan

    run = build_run_config(preset=preset, overrides=[
        f"training.optimizer={optimizer}", f"training.max_steps={args.steps}", "training.gradient_accumulation_steps=1",
        f"training.batch_size={args.batch_size}", f"training.learning_rate={args.learning_rate}",
        f"training.warmup_steps={max(1, args.steps // 10)}", f"training.eval_interval={args.eval_interval}",
        f"training.eval_batches={args.eval_batches}", f"training.save_interval={args.steps}",
        "training.sample_tokens=0", "training.zero_stage=0", "training.offload=none",
        f"training.checkpoint_dir={folder / 'ckpt'}", f"training.output_dir={folder / 'out'}", *args.set])
    plan = choose_plan(run.model, run.training, 1)
    ds_config = build_ds_config(run, plan)
    record = {"run_config": json.loads(run.model_dump_json()), "ds_config": ds_config, "version": {"git": "compare"}}
    val: dict[int, float] = {}

    class Recording(Trainer):
        def _evaluate_and_track(self, logger):
            val[self.step] = loss = super()._evaluate_and_track(logger)
            return loss

    trainer = Recording(model_config=run.model, training=run.training, data=run.data, ds_config=ds_config,
                        run_record=record, local_rank=0)
    trainer.setup()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.engine.destroy()
    return {"val": val, "seconds": seconds, "device": get_accelerator().device_name()}


def first_step_reaching(val: dict[int, float], target: float) -> int | None:
    return next((step for step in sorted(val) if val[step] <= target), None)


def report(preset: str, runs: dict[str, dict], args: argparse.Namespace) -> str:
    adamw, muon = runs["adamw"], runs["muon"]
    lines = [f"{preset}: {args.steps} steps x {args.batch_size} sequences, lr {args.learning_rate:g} "
             f"(Muon: x 0.2 sqrt(fan_in)), {adamw['device']}",
             f"  {'step':>5}  {'AdamW val':>9}  {'Muon val':>9}  {'Muon - AdamW':>12}"]
    for step in sorted(adamw["val"]):
        a, m = adamw["val"][step], muon["val"].get(step, float("nan"))
        lines.append(f"  {step:>5}  {a:>9.4f}  {m:>9.4f}  {m - a:>+12.4f}")
    final_step = max(adamw["val"])
    target = adamw["val"][final_step]
    reached = first_step_reaching(muon["val"], target)
    lines.append(f"  AdamW's final validation loss {target:.4f} (step {final_step}): Muon reaches it at "
                 + (f"step {reached} ({reached / final_step:.2f}x the steps)" if reached
                    else f"no evaluated step up to {max(muon['val'])}"))
    lines.append(f"  wall time: AdamW {adamw['seconds']:.0f} s, Muon {muon['seconds']:.0f} s "
                 f"(training and evaluation, {args.steps} steps)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        from launcher.run import free_port
        os.environ["MASTER_PORT"] = str(free_port())
    from engine.distributed import init_distributed, teardown_distributed

    init_distributed()
    try:
        with tempfile.TemporaryDirectory(prefix="compare_optimizers.") as tmp:
            for preset in args.presets:
                runs = {opt: train_once(preset, opt, args, Path(tmp) / preset / opt) for opt in OPTIMIZERS}
                print(report(preset, runs, args), flush=True)
    finally:
        teardown_distributed()
    return 0


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())

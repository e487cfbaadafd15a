"""Environment check: can training start here? A pass/fail table with the fix for each failure, then a real
training run of a tiny model through the launcher and the DeepSpeed engine (seconds).

    python tools/check_env.py                  # everything; exit code 0 when training can start, 1 when not
    python tools/check_env.py --skip_training  # the table only

The original project's `quick_test.py` did this.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from engine.diagnostics.environment import Check, environment_checks, render_table  # noqa: E402

SMOKE_OVERRIDES = ("model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
                   "model.max_seq_len=64", "training.max_steps=3", "training.batch_size=2",
                   "training.gradient_accumulation_steps=1", "training.eval_batches=1", "training.sample_tokens=0",
                   "training.zero_stage=2", "training.warmup_steps=1", "system.auto_shutdown=false")
"""A 0.6M-parameter Transformer for three ZeRO-2 steps: the whole path (data, plan, ds_config, engine, eval,
checkpoint, export) in seconds."""


def training_check(data_cache: str, timeout_s: float) -> Check:
    """Train the smoke model with launcher/run.py in a subprocess (isolated: a crash there is reported here)."""
    with tempfile.TemporaryDirectory(prefix="check_env_") as tmp:
        command = [sys.executable, str(REPO_ROOT / "launcher" / "run.py"), "--preset", "tiny",
                   *[f"--set={o}" for o in SMOKE_OVERRIDES], f"--set=data.cache_dir={data_cache}",
                   f"--set=training.checkpoint_dir={tmp}/checkpoints", f"--set=training.output_dir={tmp}/outputs",
                   f"--ds_config_dir={tmp}/ds_configs", "--no_shutdown"]
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        started = time.perf_counter()
        print("training a tiny model for 3 steps (data preparation first if the cache is empty) ...", flush=True)
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env,
                                    cwd=tmp)
        except subprocess.TimeoutExpired:
            return Check(name="training run", status="fail", detail=f"no result after {timeout_s:.0f} s",
                         fix="look for a stale JIT build lock in $TORCH_EXTENSIONS_DIR/*/lock, or run "
                             "`python launcher/run.py --preset tiny` to see where it stops")
        seconds = time.perf_counter() - started
        final = Path(tmp) / "checkpoints" / "final_model.pt"
        if result.returncode != 0 or not final.is_file():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            return Check(name="training run", status="fail", detail=f"exit code {result.returncode}: {last}",
                         fix="fix the failures above; then run `python launcher/run.py --preset tiny` for the full "
                             "traceback")
        loss = re.search(r"validation loss ([0-9.]+)", result.stdout)
        return Check(name="training run", status="ok",
                     detail=f"3 ZeRO-2 steps in {seconds:.0f} s, validation loss {loss.group(1) if loss else '?'}, "
                            "final_model.pt written")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/check_env.py", description=__doc__.splitlines()[0])
    parser.add_argument("--data_cache", default="./data_cache", help="data cache folder (shared with training)")
    parser.add_argument("--checkpoint_dir", default="./checkpoints", help="where checkpoints will go")
    parser.add_argument("--skip_training", action="store_true", help="only the table, no training run")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed for the training run")
    args = parser.parse_args(argv)
    checks = environment_checks(cache_dir=args.data_cache, checkpoint_dir=args.checkpoint_dir)
    if not args.skip_training:
        if any(c.status == "fail" for c in checks):
            checks.append(Check(name="training run", status="fail", detail="not attempted",
                                fix="fix the failures above first"))
        else:
            checks.append(training_check(str(Path(args.data_cache).resolve()), args.timeout))
    print(render_table(checks))
    failed = [c.name for c in checks if c.status == "fail"]
    if failed:
        print(f"\ntraining cannot start: {', '.join(failed)} failed")
        return 1
    warned = [c.name for c in checks if c.status == "warn"]
    print(f"\ntraining can start{f' (warnings: {chr(44).join(warned)})' if warned else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

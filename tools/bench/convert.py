"""Peak host memory of tools/convert_checkpoint.py against the size of the fp32 weights it writes.

Saves a ZeRO checkpoint of an untrained model (one CPU rank, no data needed), then runs the converter on it in a
fresh process per output format and prints its peak resident memory (ru_maxrss), the same after its imports,
and the ratio of the difference to the fp32 weights. Goal: at most ~1.3x the fp32 weights.

    python tools/bench/convert.py                          # ~160M parameters, ZeRO-2 and ZeRO-3, bf16
    python tools/bench/convert.py --set model.n_layers=4   # smaller
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

DEFAULT_MODEL = ["model.d_model=1024", "model.n_layers=12", "model.n_heads=16", "model.vocab_size=32000",
                 "model.max_seq_len=512"]


def save_checkpoint(folder: Path, zero_stage: int, overrides: list[str]) -> int:
    """An untrained model saved as checkpoint_step_0 in `folder` (as the trainer lays it out); returns the
    number of fp32 weight bytes."""
    import deepspeed
    import torch

    from engine.checkpoint.manager import CheckpointManager
    from engine.distributed import init_distributed
    from engine.trainer import param_groups
    from launcher.config import build_run_config
    from launcher.ds_config import build_ds_config
    from launcher.planning.plan import choose_plan
    from model import create_model

    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT", "29613")})
    init_distributed()
    run = build_run_config(preset="tiny", overrides=[*overrides, f"training.zero_stage={zero_stage}",
                                                     "training.bf16=true", "training.batch_size=1",
                                                     "training.gradient_accumulation_steps=1"])
    ds_config = build_ds_config(run, choose_plan(run.model, run.training, 1))
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero_stage == 3):
        model = create_model(run.model.model_type, run.model)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=ds_config)
    num_bytes = 4 * engine.module.num_parameters()
    record = {"run_config": json.loads(run.model_dump_json()), "ds_config": ds_config}
    CheckpointManager(folder, keep_last=1, run_record=record).save(engine, 0, {"step": 0})
    engine.destroy()
    del engine, model
    torch.distributed.destroy_process_group()
    return num_bytes


def measure(folder: Path, to: str, out: Path) -> tuple[float, ...]:
    """(peak RSS, RSS after imports, peak anonymous, anonymous after imports) of one conversion, in GiB."""
    command = [sys.executable, str(REPO_ROOT / "tools" / "convert_checkpoint.py"), str(folder), "--to", to,
               "--output", str(out), "--report_memory"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    found = re.search(r"peak RSS: ([\d.]+) GiB \(after imports: ([\d.]+) GiB; peak anonymous: ([\d.]+) GiB, "
                      r"after imports: ([\d.]+) GiB\)", result.stdout)
    return tuple(float(x) for x in found.groups())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], help="model override, e.g. model.n_layers=4")
    parser.add_argument("--stages", default="2,3", help="ZeRO stages to measure (default 2,3)")
    args = parser.parse_args()
    overrides = [*DEFAULT_MODEL, *args.set]
    print("GiB; 'x fp32' = (peak - after imports) / fp32 weights; RSS counts mapped checkpoint pages (page cache),"
          " anonymous does not")
    print(f"{'ZeRO':>4} {'format':>11} {'fp32':>7} {'RSS peak':>9} {'RSS x fp32':>10} {'anon peak':>9} "
          f"{'anon x fp32':>11}")
    for stage in map(int, args.stages.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "ckpt"
            # In a child process, so the engine's memory is gone before the converters run.
            code = (f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r}); from pathlib import Path; "
                    f"from tools.bench.convert import save_checkpoint; "
                    f"print(save_checkpoint(Path({str(folder)!r}), {stage}, {overrides!r}))")
            saved = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
            if saved.returncode != 0:
                raise SystemExit(saved.stderr[-3000:])
            fp32 = int(saved.stdout.strip().splitlines()[-1]) / 2**30
            for to in ("pt", "safetensors"):
                peak, base, anon_peak, anon_base = measure(folder, to, Path(tmp) / f"out_{to}")
                print(f"{stage:>4} {to:>11} {fp32:>7.3f} {peak:>9.3f} {(peak - base) / fp32:>10.2f} "
                      f"{anon_peak:>9.3f} {(anon_peak - anon_base) / fp32:>11.2f}", flush=True)


if __name__ == "__main__":
    main()

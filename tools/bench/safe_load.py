"""How much the weights-only check (engine/checkpoint/safe_load.py) adds to a resume: time to verify a checkpoint folder vs
time for torch.load of the same files (what DeepSpeed's loader does). Prints numbers; not a test.

    python tools/bench/safe_load.py [folder]     # default: a synthetic ZeRO-style folder of ~400 MB
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from engine.checkpoint.safe_load import check_tree  # noqa: E402


def synthetic(folder: Path) -> None:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    weights = {f"layer{i}.weight": torch.randn(1024, 1024) for i in range(32)}  # 128 MiB fp32
    torch.save({"module": weights}, folder / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                                         "exp_avg": [w.clone() for w in weights.values()],
                                         "exp_avg_sq": [w.clone() for w in weights.values()]}},
               folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path,
                        help="a checkpoint folder to measure (default: a synthetic ZeRO-style folder of ~400 MB)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as temp:
        folder = args.folder or Path(temp)
        if args.folder is None:
            synthetic(folder)
        size = sum(p.stat().st_size for p in folder.glob("*.pt"))
        # The check runs first: a folder that fails it is never unpickled by the full load below.
        start = time.perf_counter()
        check_tree(folder)
        check = time.perf_counter() - start
        start = time.perf_counter()
        for path in folder.glob("*.pt"):
            torch.load(path, map_location="cpu", weights_only=False)  # what DeepSpeed's loader does, after the check
        full = time.perf_counter() - start
        print(f"{size / 2**20:,.0f} MiB checkpoint: torch.load (DeepSpeed's load) {full:.3f} s, "
              f"weights-only verification {check:.3f} s ({100 * check / full:.1f}% extra)")

if __name__ == "__main__":
    main()

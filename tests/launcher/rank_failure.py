"""launcher/run.py's main() with one rank made to fail mid-training, for tests/launcher/test_rank_failure.py.

Run it wherever launcher/run.py runs: `deepspeed --num_gpus 2 tests/launcher/rank_failure.py ARGS` (each rank runs
this file), or `python tests/launcher/rank_failure.py ARGS --num_gpus 2` (main() starts the DeepSpeed launcher on
this file through its entry_script argument). Environment (test-only):
  FAULT=raise          rank FAULT_RANK raises RuntimeError when it reaches step FAULT_STEP;
  FAULT=hang           it sleeps there instead, and the process group's collective timeout is FAULT_TIMEOUT_S
                       seconds (engine.distributed.COLLECTIVE_TIMEOUT, 10 minutes in real runs).
"""
from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

FAULT = os.environ.get("FAULT", "raise")
FAULT_RANK = int(os.environ.get("FAULT_RANK", 1))
FAULT_STEP = int(os.environ.get("FAULT_STEP", 2))


def failure_message(rank: int, step: int) -> str:
    return f"injected failure on rank {rank} at step {step}"


def install_fault() -> None:
    from engine import distributed
    from engine.trainer import Trainer

    if FAULT == "hang":
        distributed.COLLECTIVE_TIMEOUT = timedelta(seconds=float(os.environ["FAULT_TIMEOUT_S"]))
    train_step = Trainer.train_step

    def faulty_train_step(self):
        if self.step == FAULT_STEP and distributed.rank() == FAULT_RANK:
            if FAULT == "hang":
                print(f"rank {FAULT_RANK} hangs at step {FAULT_STEP}", file=sys.stderr, flush=True)
                time.sleep(3600)
            raise RuntimeError(failure_message(FAULT_RANK, FAULT_STEP))
        return train_step(self)

    Trainer.train_step = faulty_train_step


if __name__ == "__main__":
    from launcher.run import launched_by_deepspeed, main

    if launched_by_deepspeed():  # a rank; the command that starts the ranks only plans
        install_fault()
    sys.exit(main(entry_script=__file__))

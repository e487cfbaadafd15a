"""One small run trained once for the tool tests (evaluate, benchmark)."""
from __future__ import annotations

import pytest

from tests.engine.test_trainer import make_trainer


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_cache, process_group):
    """(run folder, TrainResult) of 4 ZeRO-2 steps: the DeepSpeed folder holds partitioned optimizer state that
    DeepSpeed's zero_to_fp32 must consolidate, and TensorBoard has train and validation points."""
    root = tmp_path_factory.mktemp("eval_run")
    trainer = make_trainer(root, data_cache, zero_stage=2, max_steps=4, extra=("training.log_interval=1",))
    return root, trainer.train()

"""MFU in the training metrics: logged only with a GPU peak, as the throughput tool defines it."""
from __future__ import annotations

import json

import pytest

from engine.metrics import MetricsLogger
from engine.trainer import Trainer
from launcher.config import build_run_config
from launcher.ds_config import build_ds_config
from launcher.planning.model_sizes import training_flops_per_token
from launcher.planning.plan import choose_plan
from tests.conftest import SMALL_MODEL


def _trainer(tmp_path, data_cache, peak):
    run = build_run_config(preset="tiny", overrides=[
        *SMALL_MODEL, "training.zero_stage=0", "training.max_steps=1", "training.batch_size=2",
        "training.gradient_accumulation_steps=1", f"training.checkpoint_dir={tmp_path / 'ckpt'}",
        f"training.output_dir={tmp_path / 'out'}", f"data.cache_dir={data_cache}"])
    plan = choose_plan(run.model, run.training, world_size=1)
    ds_config = build_ds_config(run, plan)
    record = {"run_config": json.loads(run.model_dump_json()), "ds_config": ds_config, "version": {"git": "test"}}
    return run, Trainer(model_config=run.model, training=run.training.model_copy(update={"zero_stage": 0}),
                        data=run.data, ds_config=ds_config, run_record=record, peak_flops_per_s=peak)


def test_mfu_is_model_flops_rate_over_the_peak_and_absent_without_one(tmp_path, data_cache, process_group):
    run, trainer = _trainer(tmp_path, data_cache, peak=None)
    trainer.setup()
    assert "mfu" not in trainer.train_step()  # CPU: no peak, no MFU
    trainer.peak_flops_per_s = 2e9  # as if this rank were a GPU of 2 GFLOP/s
    metrics = trainer.train_step()
    # Oracle: the memory plan's path to the family's FLOPs (launcher/planning/model_sizes.py), as tools/throughput.py uses.
    expected = metrics["tokens_per_s"] * training_flops_per_token(run.model, run.model.max_seq_len) / 2e9
    assert metrics["mfu"] == pytest.approx(expected, rel=1e-12)


def test_progress_bar_shows_mfu_when_logged(tmp_path, capsys):
    logger = MetricsLogger(tmp_path / "tb", enabled=True, start_step=0, max_steps=2)
    logger.log_step(1, {"loss": 2.0, "tokens_per_s": 100.0, "mfu": 0.425}, write=True)
    assert logger.bar.postfix.endswith("mfu=42.5%")
    logger.log_step(2, {"loss": 2.0, "tokens_per_s": 100.0}, write=True)
    assert "mfu" not in logger.bar.postfix
    logger.close()

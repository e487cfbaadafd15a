"""Training from data.sources on the real engine (in-process, one rank): a two-source mixture trains and resumes
exactly; evaluation covers each validation window once and matches a direct computation; the tokenizer recorded
in the shards is checked at start."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.errors import DataError
from data.preprocess import PreprocessOptions, preprocess
from data.shards import CorruptShardError
from data.corpora.sources import resolve_source
from data.tokenizer import train_tokenizer
from engine.checkpoint.manager import latest_tag
from engine.trainer import Trainer
from launcher.config import build_run_config
from launcher.ds_config import build_ds_config
from launcher.planning.plan import choose_plan
from tests.conftest import SMALL_MODEL
from tests.data.corpus_files import make_documents, write_jsonl, write_parquet


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
    """Two shard sets (from .jsonl and .parquet) made with one tokenizer, plus a second tokenizer."""
    root = tmp_path_factory.mktemp("sources")
    tokenizer = train_tokenizer(make_documents(200, seed=7), root / "tok", 400).path
    other = train_tokenizer(make_documents(200, seed=8), root / "other", 400).path
    sets = {}
    for name, path in (("web", write_jsonl(root / "web.jsonl", make_documents(160, seed=10))),
                       ("books", write_parquet(root / "books.parquet", make_documents(120, seed=11)))):
        preprocess(resolve_source(str(path)), PreprocessOptions(
            output_dir=root / name, tokenizer_path=tokenizer, num_workers=2, val_fraction=0.2, progress=False))
        sets[name] = root / name
    return {"root": root, "tokenizer": tokenizer, "other_tokenizer": other, **sets}


def make_trainer(tmp_path, sources, *, max_steps=6, extra=(), micro_batch=4):
    spec = "[" + ", ".join(f"{{path: '{path}', weight: {weight}}}" for path, weight in sources) + "]"
    run = build_run_config(preset="tiny", overrides=[
        *SMALL_MODEL, "training.zero_stage=0", f"training.max_steps={max_steps}",
        f"training.batch_size={micro_batch}", "training.gradient_accumulation_steps=2", "training.warmup_steps=2",
        "training.learning_rate=3e-3", "training.eval_interval=3", "training.eval_batches=2",
        "training.save_interval=3", f"training.checkpoint_dir={tmp_path / 'ckpt'}",
        f"training.output_dir={tmp_path / 'out'}", f"data.cache_dir={tmp_path / 'cache'}",
        f"data.sources={spec}", *extra])
    plan = choose_plan(run.model, run.training, world_size=1)
    ds_config = build_ds_config(run, plan)
    training = run.training.model_copy(update={"zero_stage": plan.zero_stage})
    record = {"run_config": json.loads(run.model_dump_json()), "ds_config": ds_config, "version": {"git": "test"}}
    return Trainer(model_config=run.model, training=training, data=run.data, ds_config=ds_config,
                   run_record=record)


class CrashAtStep5(Trainer):
    def train_step(self):
        if self.step == 5:
            raise KeyboardInterrupt("simulated preemption")
        return super().train_step()


def test_two_source_mixture_trains_and_resumes_exactly(tmp_path, shard_sets, process_group):
    sources = [(shard_sets["web"], 0.7), (shard_sets["books"], 0.3)]
    straight = make_trainer(tmp_path / "a", sources)
    result = straight.train()
    assert result.final_val_loss < math.log(8192) - 0.5
    assert set(straight.last_eval) == {"web", "books"}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "a" / "out" / "tensorboard"))
    events.Reload()
    assert {"val/loss", "val/loss/web", "val/loss/books"} <= set(events.Tags()["scalars"])
    assert events.Scalars("val/loss/books")[-1].value == pytest.approx(straight.last_eval["books"][0])
    global_batch = 4 * 2 * 1
    positions = straight.source_positions.tolist()
    assert sum(positions) == 6 * global_batch
    assert abs(positions[0] - 0.7 * 6 * global_batch) <= 1  # the mixture follows its weights
    expected = {k: v.clone() for k, v in straight.engine.module.state_dict().items()}

    crashed = make_trainer(tmp_path / "b", sources)
    crashed.__class__ = CrashAtStep5
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    assert latest_tag(tmp_path / "b" / "ckpt") == "checkpoint_step_3"
    resumed = make_trainer(tmp_path / "b", sources)
    resumed.setup()
    assert resumed.step == 3
    # The per-source positions were saved in the checkpoint's client state and came back from it.
    saved = torch.load(tmp_path / "b" / "ckpt" / "checkpoint_step_3" / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)["data_positions"]
    assert saved == {"web": int(resumed.source_positions[0]), "books": int(resumed.source_positions[1])}
    assert sum(saved.values()) == 3 * global_batch
    resumed.train()
    assert resumed.source_positions.tolist() == positions
    for name, tensor in resumed.engine.module.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)

    changed = make_trainer(tmp_path / "b", [(shard_sets["web"], 1.0)], max_steps=8)
    with pytest.raises(Exception, match="data sources"):
        changed.setup()


def direct_mean_cross_entropy(module, windows, num_windows):
    """Independent oracle: mean token cross-entropy over windows 0..num_windows-1, one window at a time."""
    total, count = 0.0, 0
    module.eval()
    with torch.no_grad():
        for index in range(num_windows):
            window = torch.from_numpy(windows.window(index).astype(np.int64))[None]
            logits, _ = module(window[:, :-1])
            total += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), window[0, 1:],
                                     reduction="sum").item()
            count += window.shape[1] - 1
    return total / count, count


def test_evaluation_covers_each_window_once_whatever_the_layout(tmp_path, shard_sets, process_group):
    trainer = make_trainer(tmp_path, [(shard_sets["books"], 1.0)], extra=["training.eval_batches=1000"])
    trainer.setup()
    windows = trainer.data.sources[0].val
    expected, tokens = direct_mean_cross_entropy(trainer.engine.module, windows, len(windows))
    assert len(windows) % 4 != 0 or len(windows) % 3 != 0  # a partial last micro-batch is exercised
    for micro_batch in (4, 3, 1):
        trainer.micro_batch = micro_batch
        loss = trainer.evaluate()
        assert loss == pytest.approx(expected, rel=1e-5)
        assert trainer.last_eval["books"][1] == tokens == len(windows) * 64

    trainer.training = trainer.training.model_copy(update={"eval_batches": 2})
    trainer.micro_batch = 3  # cap: 2 micro-batches x 3 rows x 1 rank = the first 6 windows
    expected_first, tokens_first = direct_mean_cross_entropy(trainer.engine.module, windows, 6)
    assert trainer.evaluate() == pytest.approx(expected_first, rel=1e-5)
    assert trainer.last_eval["books"][1] == tokens_first == 6 * 64


def test_shards_of_another_tokenizer_or_corrupt_shards_stop_the_start(tmp_path, shard_sets, process_group):
    trainer = make_trainer(tmp_path / "a", [(shard_sets["web"], 1.0)],
                           extra=[f"data.tokenizer={shard_sets['other_tokenizer']}"])
    with pytest.raises(DataError, match="another tokenizer"):
        trainer.setup()
    assert trainer.engine is None  # refused before building anything

    broken = shard_sets["root"] / "broken"
    broken.mkdir()
    for path in shard_sets["web"].iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    with open(broken / "train_00000.bin", "r+b") as handle:
        handle.truncate(10)
    trainer = make_trainer(tmp_path / "b", [(broken, 1.0)])
    with pytest.raises(CorruptShardError, match="train_00000.bin"):
        trainer.setup()

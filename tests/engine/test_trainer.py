"""The Trainer on the real DeepSpeed engine (CPU, gloo, one rank): ZeRO 0-3, checkpoints, resume, exports."""
from __future__ import annotations

import json
import math

import pytest
import torch

from engine.checkpoint.manager import list_checkpoint_tags, latest_tag
from engine.trainer import Trainer
from launcher.config import build_run_config
from launcher.ds_config import build_ds_config
from launcher.planning.plan import choose_plan
from model import ModelConfig, create_model
from tests.conftest import SMALL_MODEL


def make_trainer(tmp_path, data_cache, *, zero_stage=0, max_steps=6, extra=(), preset="tiny"):
    run = build_run_config(preset=preset, overrides=[
        *SMALL_MODEL, f"training.zero_stage={zero_stage}", f"training.max_steps={max_steps}",
        "training.batch_size=4", "training.gradient_accumulation_steps=2", "training.warmup_steps=2",
        "training.learning_rate=3e-3", "training.eval_interval=3", "training.eval_batches=2",
        "training.save_interval=3", "training.keep_last_checkpoints=2",
        f"training.checkpoint_dir={tmp_path / 'ckpt'}", f"training.output_dir={tmp_path / 'out'}",
        f"data.cache_dir={data_cache}", *extra])
    plan = choose_plan(run.model, run.training, world_size=1)
    ds_config = build_ds_config(run, plan)
    training = run.training.model_copy(update={"zero_stage": plan.zero_stage})
    record = {"run_config": json.loads(run.model_dump_json()), "ds_config": ds_config, "version": {"git": "test"}}
    return Trainer(model_config=run.model, training=training, data=run.data, ds_config=ds_config,
                   run_record=record)


def params_of(trainer) -> dict[str, torch.Tensor]:
    from engine.checkpoint.manager import gather_fp32_state_dict

    return gather_fp32_state_dict(trainer.engine.module)


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_training_lowers_loss_under_every_zero_stage(tmp_path, data_cache, process_group, zero_stage):
    trainer = make_trainer(tmp_path, data_cache, zero_stage=zero_stage, max_steps=12)
    trainer.setup()
    assert trainer.engine.zero_optimization_stage() == zero_stage
    initial = trainer.evaluate()
    assert abs(initial - math.log(8192)) < 0.5  # an untrained model is near-uniform over the vocabulary
    seen = []  # (step, validation loss) of every evaluation the loop runs
    evaluate = trainer.evaluate
    trainer.evaluate = lambda: (seen.append((trainer.step, evaluate())), seen[-1][1])[1]
    result = trainer.train()
    assert result.final_step == 12
    assert result.final_val_loss < initial - 0.5
    assert [step for step, _ in seen] == [3, 6, 9, 12]  # eval_interval=3 and the end
    best_step, best_loss = min(seen, key=lambda item: item[1])
    assert result.best_val_loss == best_loss and result.final_val_loss == seen[-1][1]
    best = torch.load(result.best_model_path, weights_only=True)
    assert (best["step"], best["val_loss"]) == (best_step, best_loss)


def test_checkpoints_are_self_describing_and_pruned(tmp_path, data_cache, process_group):
    trainer = make_trainer(tmp_path, data_cache, zero_stage=2, max_steps=9)
    trainer.train()
    ckpt = tmp_path / "ckpt"
    assert [step for step, _ in list_checkpoint_tags(ckpt)] == [6, 9]  # keep_last_checkpoints=2
    assert latest_tag(ckpt) == "checkpoint_step_9"
    folder = ckpt / "checkpoint_step_9"
    assert json.loads((folder / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2
    assert json.loads((folder / "run_config.json").read_text())["model"]["d_model"] == 64
    assert json.loads((folder / "version.json").read_text()) == {"git": "test"}
    assert (tmp_path / "out" / "tensorboard").is_dir() and any((tmp_path / "out" / "tensorboard").iterdir())


class CrashAtStep(Trainer):
    """A run that dies (as if killed) when it reaches `crash_at` steps, after the checkpoint at step 3."""

    crash_at = 5

    def train_step(self):
        if self.step == self.crash_at:
            raise KeyboardInterrupt("simulated preemption")
        return super().train_step()


def make_crashing_trainer(tmp_path, data_cache, **kwargs):
    trainer = make_trainer(tmp_path, data_cache, **kwargs)
    trainer.__class__ = CrashAtStep
    return trainer


@pytest.mark.parametrize("preset, zero_stage, extra", [
    ("tiny", 0, ()), ("tiny", 2, ()), ("tiny", 3, ()), ("tiny_mamba", 2, ()), ("tiny_mamba", 3, ()),
    ("tiny_hybrid", 3, ("model.layer_pattern=MA",)),
    ("tiny", 2, ("model.dropout=0.2",)),  # dropout masks depend on (seed, step, rank), not on where a run resumed
    ("tiny", 2, ("training.activation_checkpointing=true",))])
def test_resume_continues_exactly(tmp_path, data_cache, process_group, preset, zero_stage, extra):
    straight = make_trainer(tmp_path / "a", data_cache, zero_stage=zero_stage, max_steps=7, preset=preset,
                            extra=extra)
    assert straight.model_config.model_type == build_run_config(preset=preset).model_type
    result = straight.train()
    assert result.final_val_loss < math.log(8192) - 0.1  # below a uniform guess: it learned something
    expected = params_of(straight)

    interrupted = make_crashing_trainer(tmp_path / "b", data_cache, zero_stage=zero_stage, max_steps=7,
                                        preset=preset, extra=extra)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    assert latest_tag(tmp_path / "b" / "ckpt") == "checkpoint_step_3"  # steps 4-5 were lost with the crash
    resumed = make_trainer(tmp_path / "b", data_cache, zero_stage=zero_stage, max_steps=7, preset=preset,
                           extra=extra)
    resumed.setup()
    assert resumed.step == 3
    resumed.train()
    got = params_of(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


def test_final_model_loads_with_the_original_snippet(tmp_path, data_cache, process_group):
    trainer = make_trainer(tmp_path, data_cache, zero_stage=3, max_steps=3, extra=["training.bf16=true"])
    result = trainer.train()
    live = params_of(trainer)

    ckpt = torch.load(result.final_model_path, weights_only=True)
    model_config = ModelConfig(**ckpt["config"])
    model = create_model(model_config.model_type, model_config)
    model.load_state_dict(ckpt["model_state_dict"])
    assert ckpt["step"] == 3 and math.isfinite(ckpt["val_loss"])
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, live[name], rtol=0, atol=0)  # fp32 master weights, not bf16 copies

    best = torch.load(result.best_model_path, weights_only=True)
    assert best["val_loss"] == pytest.approx(result.best_val_loss)

    model.eval()
    idx = torch.randint(0, model_config.vocab_size, (1, 8))
    with torch.no_grad():
        logits, _ = model(idx)
    assert logits.shape == (1, 8, model_config.vocab_size)
    text = trainer.sample_text(result.final_model_path, "ROMEO:", max_new_tokens=5)
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")


def test_resume_false_starts_over(tmp_path, data_cache, process_group):
    """resume: false trains from the seed's initialisation; into the folder of an earlier run it is refused
    (engine/checkpoint/commit.py: two runs never share one folder)."""
    from engine.errors import CheckpointError

    first = make_trainer(tmp_path / "old", data_cache, zero_stage=2, max_steps=3)
    first.train()
    trained = params_of(first)
    with pytest.raises(CheckpointError, match="training.resume is false"):
        make_trainer(tmp_path / "old", data_cache, zero_stage=2, max_steps=3,
                     extra=["training.resume=false"]).setup()
    fresh = make_trainer(tmp_path / "new", data_cache, zero_stage=2, max_steps=3, extra=["training.resume=false"])
    fresh.setup()
    assert fresh.step == 0 and math.isinf(fresh.best_val_loss)
    torch.manual_seed(fresh.training.seed)  # the initialisation a new run starts from
    initial = create_model(fresh.model_config.model_type, fresh.model_config).state_dict()
    now = params_of(fresh)
    for name, tensor in initial.items():
        torch.testing.assert_close(now[name], tensor, rtol=0, atol=0)
    assert any(not torch.equal(trained[name], now[name]) for name in initial)


def test_activation_checkpointing_through_the_engine_keeps_less_and_matches(tmp_path, data_cache, process_group):
    """The same steps with no block, the first block (a count, Megatron-LM's block method) and every block
    recomputed: equal losses, and the engine's forward keeps for backward only the inputs of the checkpointed
    blocks (counted with autograd's saved-tensor hooks)."""
    results = {}
    for setting, blocks in (("false", 0), ("1", 1), ("true", 2)):
        trainer = make_trainer(tmp_path / setting, data_cache, zero_stage=2, max_steps=2,
                               extra=[f"training.activation_checkpointing={setting}"])
        trainer.setup()
        assert trainer.engine.module.num_checkpointed_blocks == blocks
        assert trainer.engine.module.gradient_checkpointing is (blocks == 2)
        batch = trainer.train_windows.batch(range(4))
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t.numel()), t)[1], lambda t: t):
            trainer.engine(batch[:, :-1], targets=batch[:, 1:])
        trainer.engine.zero_grad()
        losses = [trainer.train_step()["loss"] for _ in range(2)]
        results[blocks] = (losses, sum(saved))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    assert results[2][0] == pytest.approx(results[0][0], rel=1e-5)
    # Without recomputation each block keeps, per token, its norms' outputs, q, k, v, the attention output and
    # SwiGLU's three 3*d_model-wide tensors: well over 10 d_model-wide tensors. With it, only its input (1).
    tokens, width = 4 * 64, 64
    assert results[0][1] - results[1][1] > 10 * width * tokens  # one block fewer kept whole
    assert results[1][1] - results[2][1] > 10 * width * tokens  # and one more

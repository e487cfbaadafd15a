"""Training math through the real engine: the lr schedule against the formula in docs/checkpoints.md, which parameters are
decayed, fp32 master weights in the exports under every layout, and where generation starts."""
from __future__ import annotations

import math

import deepspeed
import pytest
import torch
from deepspeed.accelerator import get_accelerator

from data import TokenShardReader
from engine.param_groups import param_groups
from engine.trainer import Trainer
from model import ModelConfig, create_model
from tests.engine.test_trainer import make_trainer


def readme_lr(step: int, *, peak: float, warmup: int, max_steps: int, min_ratio: float) -> float:
    """The schedule as docs/checkpoints.md states it (written out here independently of engine/schedule.py)."""
    if step <= warmup:
        return peak * step / warmup
    cosine = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (max_steps - warmup)))
    return peak * (min_ratio + (1 - min_ratio) * cosine)


class RecordingTrainer(Trainer):
    """Records the lr in the optimizer when each update is applied."""

    def forward_backward_step(self, micro_step):
        if micro_step == self.grad_accum - 1:  # engine.step() below applies the update
            self.applied_lrs.append(self.engine.optimizer.param_groups[0]["lr"])
        return super().forward_backward_step(micro_step)

    def train_step(self):
        metrics = super().train_step()
        self.reported_lrs.append(metrics["lr"])
        return metrics


def recorded_run(tmp_path, data_cache, *, warmup, max_steps, zero_stage=0):
    trainer = make_trainer(tmp_path, data_cache, zero_stage=zero_stage, max_steps=max_steps,
                           extra=[f"training.warmup_steps={warmup}", "training.min_lr_ratio=0.1",
                                  "training.eval_interval=100", "training.save_interval=100"])
    trainer.__class__ = RecordingTrainer
    trainer.applied_lrs, trainer.reported_lrs = [], []
    trainer.train()
    return trainer


@pytest.mark.parametrize("warmup, zero_stage", [(3, 0), (3, 2), (0, 0)])
def test_lr_schedule_follows_the_readme_formula(tmp_path, data_cache, process_group, warmup, zero_stage):
    max_steps, peak = 8, 3e-3  # make_trainer's learning_rate
    trainer = recorded_run(tmp_path, data_cache, warmup=warmup, max_steps=max_steps, zero_stage=zero_stage)
    expected = [readme_lr(s, peak=peak, warmup=warmup, max_steps=max_steps, min_ratio=0.1)
                for s in range(1, max_steps + 1)]
    assert trainer.applied_lrs == pytest.approx(expected, rel=1e-12)
    assert trainer.reported_lrs == pytest.approx(expected, rel=1e-12)
    # The points the issue names: steps 1 and 2 train, the peak at the end of warm-up, the floor at the last step.
    assert trainer.applied_lrs[0] > 0 and trainer.applied_lrs[1] > 0
    if warmup:
        assert trainer.applied_lrs[warmup - 1] == pytest.approx(peak)
    assert trainer.applied_lrs[-1] == pytest.approx(0.1 * peak)
    middle = warmup + (max_steps - warmup) // 2
    assert trainer.applied_lrs[middle - 1] == pytest.approx(readme_lr(middle, peak=peak, warmup=warmup,
                                                                      max_steps=max_steps, min_ratio=0.1))


# ---- weight decay ---------------------------------------------------------------------------------------------------

# The rule as docs/checkpoints.md / engine/param_groups.py state it, written as names: projection and embedding matrices.
DECAYED_SUFFIXES = ("wq.weight", "wk.weight", "wv.weight", "wo.weight", "w1.weight", "w2.weight", "w3.weight",
                    "tok_embeddings.weight", "embedding.weight", "lm_head.weight", "in_proj.weight",
                    "out_proj.weight", "x_proj.weight", "dt_proj.weight")


@pytest.mark.parametrize("family", [dict(model_type="transformer"), dict(model_type="mamba", ssm_type="mamba2"),
                                    dict(model_type="mamba", ssm_type="mamba1"),
                                    dict(model_type="mamba", ssm_type="mamba1", tie_embeddings=False),
                                    dict(model_type="hybrid", layer_pattern="MA")])
@pytest.mark.parametrize("zero3_init", [False, True])
def test_weight_decay_rule(process_group, family, zero3_init):
    config = ModelConfig(d_model=64, n_layers=2, n_heads=4, vocab_size=128, d_state=16, headdim=16, **family)
    ds_config = {"train_batch_size": 1, "zero_optimization": {"stage": 3}}
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero3_init):
        model = create_model(config.model_type, config)
    decayed, undecayed = param_groups(model, 0.1)
    assert decayed["weight_decay"] == 0.1 and undecayed["weight_decay"] == 0.0
    names = {id(p): name for name, p in model.named_parameters()}
    got = {names[id(p)] for p in decayed["params"]}
    expected = {name for name in names.values() if name.endswith(DECAYED_SUFFIXES)}
    assert got == expected
    assert len(decayed["params"]) + len(undecayed["params"]) == len(names)
    if config.model_type in ("mamba", "hybrid"):  # what docs/mamba.md says is never decayed
        never = {name for name in names.values()
                 if name.rsplit(".", 1)[-1] in ("A_log", "D", "dt_bias") or "conv1d" in name or "norm" in name
                 or name.endswith("dt_proj.bias")}
        assert never and not (never & got)


# ---- exports hold the fp32 master weights ---------------------------------------------------------------------------

def _representable(tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    return torch.equal(tensor, tensor.to(dtype).float())


@pytest.mark.parametrize("zero_stage, precision", [(0, "bf16"), (0, "fp16"), (2, "bf16")])
def test_exports_hold_the_optimizers_fp32_master_weights(tmp_path, data_cache, process_group, zero_stage,
                                                         precision):
    if precision == "fp16" and not get_accelerator().is_fp16_supported():
        pytest.skip(f"DeepSpeed's {get_accelerator().device_name()} accelerator refuses fp16 on this machine")
    trainer = make_trainer(tmp_path, data_cache, zero_stage=zero_stage, max_steps=4,
                           extra=[f"training.{precision}=true"])
    result = trainer.train()
    assert math.isfinite(result.final_val_loss) and result.final_val_loss < math.log(8192)
    exported = torch.load(result.final_model_path, weights_only=True)["model_state_dict"]
    low = torch.bfloat16 if precision == "bf16" else torch.float16

    optimizer = trainer.engine.optimizer
    if zero_stage == 0:  # FP16_UnfusedOptimizer's own master copy, matched to the parameters by identity
        names = {id(p): name for name, p in trainer.engine.module.named_parameters()}
        masters = {names[id(p)]: m.view_as(p) for lows, fp32s in zip(optimizer.fp16_groups, optimizer.fp32_groups)
                   for p, m in zip(lows, fp32s)}
    else:  # DeepSpeed's own reader of the ZeRO checkpoint's fp32 partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        masters = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "ckpt"))
    assert set(masters) <= set(exported) and len(masters) >= 5
    for name, master in masters.items():
        assert exported[name].dtype == torch.float32
        torch.testing.assert_close(exported[name], master.float().cpu(), rtol=0, atol=0, msg=name)
    # Rounded 16-bit weights would all be representable in the training dtype; trained fp32 masters are not.
    assert not all(_representable(tensor, low) for tensor in exported.values())


# ---- generation starts where training documents start ---------------------------------------------------------------

def test_generation_starts_from_a_token_the_shards_contain(tmp_path, data_cache, process_group):
    trainer = make_trainer(tmp_path, data_cache, max_steps=1)
    trainer.setup()
    shard = torch.as_tensor(TokenShardReader(trainer.prepared.train_prefix).tokens[:2_000_000].astype("int64"))
    counts = torch.bincount(shard, minlength=trainer.tokenizer.vocab_size)
    first = trainer.prompt_ids("ROMEO:")[0]
    assert counts[first] > 0  # the model has seen what follows this token
    assert first == trainer.tokenizer.eos_id and counts[trainer.tokenizer.bos_id] == 0
    assert trainer.prompt_ids("ROMEO:")[1:] == trainer.tokenizer.encode("ROMEO:")


# ---- one data-parallel rank: no gradient all-reduce -----------------------------------------------------------------
@pytest.mark.parametrize("zero_stage, precision", [(0, "fp32"), (0, "bf16"), (1, "fp32")])
def test_single_rank_skips_the_identity_allreduce_and_trains_the_same(process_group, zero_stage, precision):
    """Oracle: DeepSpeed's own path with its gradient all-reduce left on. Skipping it (ZeRO-0, one rank) must leave
    every weight bit-identical after clipped AdamW steps; ZeRO-1 needs the call (its optimizer partitions there)."""
    from engine.distributed import skip_single_rank_gradient_allreduce

    config = ModelConfig(model_type="transformer", d_model=64, n_layers=2, n_heads=4, vocab_size=128, max_seq_len=32)
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 0.05,
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
                 "zero_optimization": {"stage": zero_stage}, "bf16": {"enabled": precision == "bf16"}}
    batches = torch.randint(0, 128, (6, 2, 33), generator=torch.Generator().manual_seed(3))
    weights = []
    for skip in (False, True):
        torch.manual_seed(0)
        model = create_model("transformer", config)
        initial = {name: p.detach().clone() for name, p in model.named_parameters()}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=ds_config)
        if skip:
            skip_single_rank_gradient_allreduce(engine)
        assert engine.enable_backward_allreduce == (not skip or zero_stage != 0)
        for batch in batches:  # 3 optimizer steps of 2 micro-batches
            _, loss = engine(batch[:, :-1], targets=batch[:, 1:])
            engine.backward(loss)
            engine.step()
        weights.append({name: p.detach().clone() for name, p in engine.module.named_parameters()})
        engine.destroy()
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    assert all(not torch.equal(initial[name], weights[1][name]) for name in initial)  # every weight trained

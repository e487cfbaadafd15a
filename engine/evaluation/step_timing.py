"""Timing training steps: this project's DeepSpeed path and the peers it is compared with, on the same batches.

Contenders (each a `Contender` that builds its model and returns one training step):
- `deepspeed`: what the Trainer runs (engine.model_setup.build_model, deepspeed.initialize with the launcher's
  ds_config, engine(x, targets) / engine.backward / engine.step).
- `plain`: the same model in a plain PyTorch loop: torch.optim.AdamW (fused on CUDA), the same gradient clipping,
  bf16/fp16 through torch.autocast with fp32 weights (the standard PyTorch mixed-precision recipe).
- `transformers`: Hugging Face's LlamaForCausalLM (Transformer) or Mamba2ForCausalLM / MambaForCausalLM (Mamba)
  of the same shape, SDPA attention, in the same plain loop.
Each is built, warmed up, timed over `steps` steps (CUDA synchronised) and freed before the next, so its peak
memory is its own (measured as the allocator's peak above what was allocated before it was built).
"""
from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from engine.config import TrainingConfig
from model import ModelConfig
from model.registry import create_model_on

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class Timing:
    """One timed run of one contender."""

    seconds: float
    """Wall time of the timed steps (after warm-up)."""
    tokens: int
    """Tokens trained in the timed steps."""
    peak_bytes: int | None
    """CUDA allocator peak above the memory allocated before the contender was built (None on CPU)."""
    final_loss: float
    """Loss of the last step (a sanity check that every contender trains the same problem)."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


StepFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class BenchSetup:
    """What every contender shares."""

    model: ModelConfig
    training: TrainingConfig
    device: str
    """'cuda:0' or 'cpu'."""
    num_checkpointed_blocks: int
    """Blocks, from the first, recomputed in backward (as the plan chose)."""


def make_batches(setup: BenchSetup, *, count: int, micro_batch: int, seq_len: int, seed: int = 0) -> list[torch.Tensor]:
    """`count` random token windows (micro_batch, seq_len + 1), the same for every contender."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, setup.model.vocab_size, (micro_batch, seq_len + 1), generator=generator).to(setup.device)
            for _ in range(count)]


def deepspeed_contender(setup: BenchSetup, ds_config: dict[str, Any],
                        sequence_parallel: int = 1) -> tuple[StepFn, Callable[[], None]]:
    """The Trainer's path: build_model + deepspeed.initialize with the launcher's ds_config; with
    sequence_parallel > 1 every rank runs its shard of each sequence (all ranks get the same batches)."""
    import deepspeed

    from engine.distributed import join_sequence_parallel_group, skip_single_rank_gradient_allreduce
    from model import sequence_parallel as sp
    from engine.model_setup import build_model
    from engine.optimizer import optimizer_arguments
    from engine.schedule import warmup_cosine_scheduler

    mpu = join_sequence_parallel_group(sequence_parallel)
    model = build_model(setup.model, ds_config=ds_config, precision=setup.training.precision, device=setup.device,
                        compiled=setup.training.compile_blocks, mpu=mpu)
    model.num_checkpointed_blocks = setup.num_checkpointed_blocks
    cfg = setup.training
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, mpu=mpu,
                                      **optimizer_arguments(model, cfg, on_cuda=str(setup.device).startswith("cuda")),
                                      lr_scheduler=warmup_cosine_scheduler(
                                          warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
                                          min_lr_ratio=cfg.min_lr_ratio))
    skip_single_rank_gradient_allreduce(engine)

    def step(batch: torch.Tensor) -> torch.Tensor:
        targets = sp.shard_sequence(batch[:, 1:])
        _, loss = engine(sp.shard_sequence(batch[:, :-1]), targets=targets)
        loss = sp.group_mean_loss(loss, targets.numel())
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return step, engine.destroy


def _plain_loop(model: torch.nn.Module, setup: BenchSetup,
                loss_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]) -> StepFn:
    """AdamW + clipping + autocast around `loss_fn(model, batch)`: the loop a PyTorch user writes."""
    from engine.param_groups import param_groups

    cfg = setup.training
    on_cuda = setup.device.startswith("cuda")
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, fused=on_cuda or None)
    dtype = AUTOCAST_DTYPES.get(cfg.precision)
    scaler = torch.amp.GradScaler(enabled=cfg.precision == "fp16" and on_cuda)

    def step(batch: torch.Tensor) -> torch.Tensor:
        autocast = torch.autocast(setup.device.split(":")[0], dtype=dtype) if dtype else contextlib.nullcontext()
        with autocast:
            loss = loss_fn(model, batch)
        scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def plain_contender(setup: BenchSetup) -> tuple[StepFn, Callable[[], None]]:
    """This project's model in a plain PyTorch loop, fp32 weights on the device."""
    model = create_model_on(setup.model.model_type, setup.model, device=setup.device)
    model.num_checkpointed_blocks = setup.num_checkpointed_blocks
    model.train()
    return _plain_loop(model, setup, lambda m, batch: m(batch[:, :-1], targets=batch[:, 1:])[1]), lambda: None


def transformers_model(config: ModelConfig) -> torch.nn.Module:
    """Hugging Face's model of the same architecture (randomly initialised; nothing downloaded)."""
    import transformers

    if config.model_type == "transformer":
        hf_config = transformers.LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.ffn_dim,
            num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
            num_key_value_heads=config.kv_heads, max_position_embeddings=config.max_seq_len,
            rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, tie_word_embeddings=config.tie_embeddings,
            attention_bias=False, mlp_bias=False, attn_implementation="sdpa")
        return transformers.LlamaForCausalLM(hf_config)
    if config.model_type == "mamba":
        from model.mamba.hf import transformers_config_kwargs

        kwargs = transformers_config_kwargs(config)
        if config.ssm_type == "mamba2":
            return transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**kwargs))
        return transformers.MambaForCausalLM(transformers.MambaConfig(**kwargs))
    if config.model_type == "hybrid":
        from model.hybrid.hf import transformers_config_kwargs as hybrid_kwargs

        # pad_token_id None: BambaConfig's default 0 would freeze that embedding row (padding_idx).
        return transformers.BambaForCausalLM(transformers.BambaConfig(
            **hybrid_kwargs(config), pad_token_id=None, attn_implementation="sdpa"))
    raise ValueError(f"no transformers peer for model_type {config.model_type!r}")


def checkpoint_first_layers(model: torch.nn.Module, num_layers: int) -> None:
    """Checkpoint the first num_layers decoder layers of a transformers model, as our models' block method does."""
    if num_layers == 0:
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # That checkpoints every decoder layer; each carries its own switch, left on for the first num_layers.
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers[num_layers:]:
        layer.gradient_checkpointing = False


def transformers_contender(setup: BenchSetup) -> tuple[StepFn, Callable[[], None]]:
    """transformers' model of the same shape in the same plain loop; the loss computed as ours (fp32
    cross-entropy over every position), so both predict the same tokens."""
    with torch.device(setup.device):
        model = transformers_model(setup.model)
    checkpoint_first_layers(model, setup.num_checkpointed_blocks)
    model.train()
    vocab = setup.model.vocab_size

    def loss_fn(m: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        logits = m(input_ids=batch[:, :-1]).logits
        return F.cross_entropy(logits.float().reshape(-1, vocab), batch[:, 1:].reshape(-1))

    return _plain_loop(model, setup, loss_fn), lambda: None


def time_contender(build: Callable[[], tuple[StepFn, Callable[[], None]]], batches: list[torch.Tensor], *,
                   warmup: int, device: str) -> Timing:
    """Build, run `warmup` steps, time the remaining batches, free. Peak memory only on CUDA."""
    on_cuda = device.startswith("cuda")

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize()

    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if on_cuda else 0
    step, cleanup = build()
    try:
        loss = torch.tensor(math.nan)
        for batch in batches[:warmup]:
            loss = step(batch)
        sync()
        start = time.perf_counter()
        for batch in batches[warmup:]:
            loss = step(batch)
        sync()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() - base if on_cuda else None
        timed = batches[warmup:]
        tokens = sum(b.size(0) * (b.size(1) - 1) for b in timed)
        return Timing(seconds=seconds, tokens=tokens, peak_bytes=peak, final_loss=float(loss))
    finally:
        cleanup()
        del step
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()


def time_interleaved(builders: dict[str, Callable[[], tuple[StepFn, Callable[[], None]]]],
                     batches: list[torch.Tensor], *, warmup: int, device: str,
                     errors: dict[str, str], into: dict[str, list[Timing]],
                     on_step: Callable[[], None] | None = None) -> None:
    """All contenders alive at once, timed one step each in turn (a, b, c, a, b, c, ...): on a shared machine a
    burst of load then slows every contender alike, where whole runs in turn would hand it to one. One Timing per
    step, appended to `into[name]` as it is measured (an interrupted run keeps what it measured). Peak memory is not measured (the contenders share the allocator); that is what time_contender is for."""
    on_cuda = device.startswith("cuda")
    steps: dict[str, StepFn] = {}
    cleanups: list[Callable[[], None]] = []
    try:
        for name, build in builders.items():
            try:
                steps[name], cleanup = build()
                cleanups.append(cleanup)
                for batch in batches[:warmup]:
                    steps[name](batch)
            except Exception as error:  # a peer that fails must not hide the others
                errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                steps.pop(name, None)
        for batch in batches[warmup:]:
            for name, step in steps.items():
                if on_cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                loss = step(batch)
                if on_cuda:
                    torch.cuda.synchronize()
                into.setdefault(name, []).append(Timing(seconds=time.perf_counter() - start,
                                                           tokens=batch.size(0) * (batch.size(1) - 1),
                                                           peak_bytes=None, final_loss=float(loss)))
            if on_step is not None:
                on_step()
    finally:
        for cleanup in cleanups:
            cleanup()

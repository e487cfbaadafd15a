"""The training loop on the DeepSpeed engine: train() -> train_step() -> forward_backward_step(), evaluate().

Checkpointing (CheckpointManager) and metrics (MetricsLogger) are components the loop calls. Subclasses may
override `train_step()` and `evaluate()`, as the original project's developer guide promises.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from data import DataConfig, PreparedData, TokenShardReader, TokenWindows, Tokenizer, eval_indices, \
    prepare_data, sample_indices
from engine import distributed
from engine.checkpoint import CheckpointManager, latest_tag
from engine.config import TrainingConfig
from engine.export import load_initial_weights
from engine.metrics import MetricsLogger, peak_memory_bytes
from model import ModelConfig, create_model

# Primes that decorrelate the per-step RNG seeds of different runs, steps and ranks.
_STEP_SEED_PRIME, _RANK_SEED_PRIME = 1_000_003, 7919


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """What a finished run produced."""

    final_step: int
    """Number of optimizer steps completed."""
    final_val_loss: float
    """Validation loss of the final weights (mean token cross-entropy, nats)."""
    best_val_loss: float
    """Lowest validation loss seen (the weights in best_model.pt)."""
    final_model_path: Path
    """The original-format fp32 weights of the final step."""
    best_model_path: Path
    """The original-format fp32 weights with the lowest validation loss."""
    tokens_per_s: float
    """Mean training throughput of this process's run, in tokens per second over all ranks."""


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices (and embeddings), not norms, biases or SSM scalars (ndim < 2)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Trainer:
    """Trains one model on one corpus with the DeepSpeed engine; every rank builds one."""

    def __init__(self, *, model_config: ModelConfig, training: TrainingConfig, data: DataConfig,
                 ds_config: dict[str, Any], run_record: dict[str, Any], local_rank: int = 0):
        self.model_config = model_config
        self.training = training
        self.data_config = data
        self.ds_config = ds_config
        self.run_record = run_record
        self.local_rank = local_rank
        self.checkpoints = CheckpointManager(training.checkpoint_dir, keep_last=training.keep_last_checkpoints,
                                             run_record=run_record)
        self.engine = None
        self.step = 0
        self.best_val_loss = math.inf

    # ---- set-up ---------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Join the process group, prepare data, build the model and the engine, resume if possible."""
        distributed.init_distributed()
        self.prepared = self._prepare_data()
        self.tokenizer = Tokenizer(self.prepared.tokenizer_path)
        if self.tokenizer.vocab_size > self.model_config.vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but model.vocab_size is "
                             f"{self.model_config.vocab_size}")
        seq_len = self.model_config.max_seq_len
        self.train_windows = TokenWindows(TokenShardReader(self.prepared.train_prefix).tokens, seq_len,
                                          seed=self.training.seed)
        self.val_windows = TokenWindows(TokenShardReader(self.prepared.val_prefix).tokens, seq_len,
                                        seed=self.training.seed, shuffle=False)

        if get_accelerator().device_name() == "cpu":
            # Decaying SSM states and small gradients underflow into denormals, which x86 handles ~100x slower;
            # flushing them made the CPU Mamba scan ~7x faster (shared/MACHINE_NOTES.md). GPUs flush already.
            torch.set_flush_denormal(True)
        torch.manual_seed(self.training.seed)
        zero3 = self.ds_config.get("zero_optimization", {}).get("stage", 0) == 3
        # Under ZeRO-3 each rank materialises only its partition of the weights while they are created.
        with deepspeed.zero.Init(config_dict_or_path=self.ds_config, enabled=zero3):
            model = create_model(self.model_config.model_type, self.model_config)
        model.gradient_checkpointing = bool(self.training.activation_checkpointing is True)
        if self.training.init_from and not (self.training.resume and latest_tag(self.training.checkpoint_dir)):
            load_initial_weights(model, self.training.init_from, self.model_config)
            if distributed.is_main_process():
                print(f"initialised from {self.training.init_from}", flush=True)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, self.training.weight_decay), config=self.ds_config)
        self.micro_batch = self.engine.train_micro_batch_size_per_gpu()
        self.grad_accum = self.engine.gradient_accumulation_steps()
        self.world_size = distributed.world_size()
        self.tokens_per_step = self.micro_batch * self.grad_accum * self.world_size * seq_len

        if self.training.resume:
            state = self.checkpoints.load_latest(self.engine)
            if state is not None:
                self.step = int(state["step"])
                self.best_val_loss = float(state.get("best_val_loss", math.inf))

    def _prepare_data(self) -> PreparedData:
        """Local rank 0 builds (or finds) the cache; the other ranks then read it."""
        vocab_size = self.model_config.vocab_size
        if self.local_rank == 0:
            prepared = prepare_data(self.data_config, vocab_size=vocab_size,
                                    progress=distributed.is_main_process())
        distributed.barrier()
        if self.local_rank != 0:
            prepared = prepare_data(self.data_config, vocab_size=vocab_size, progress=False)
        return prepared

    # ---- the loop ----------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Run from the current step to training.max_steps, evaluating and saving on schedule."""
        if self.engine is None:
            self.setup()
        cfg = self.training
        logger = MetricsLogger(Path(cfg.output_dir) / "tensorboard", enabled=distributed.is_main_process(),
                               start_step=self.step, max_steps=cfg.max_steps)
        if self.step > 0:
            logger.write(f"resumed from {cfg.checkpoint_dir}/checkpoint_step_{self.step} at step {self.step}")
        val_loss, saved_step, start_step = math.nan, -1, self.step
        start = time.perf_counter()
        try:
            while self.step < cfg.max_steps:
                metrics = self.train_step()
                self.step += 1
                logger.log_step(self.step, metrics, write=self.step % cfg.log_interval == 0)
                if self.step % cfg.eval_interval == 0 or self.step == cfg.max_steps:
                    val_loss = self._evaluate_and_track(logger)
                if self.step % cfg.save_interval == 0 or self.step == cfg.max_steps:
                    self.checkpoints.save(self.engine, self.step, self._client_state())
                    saved_step = self.step
            if math.isnan(val_loss):  # resumed at the end: nothing ran, measure the final weights anyway
                val_loss = self._evaluate_and_track(logger)
            if saved_step != self.step:
                self.checkpoints.save(self.engine, self.step, self._client_state())
            final_path = self.checkpoints.export_model(
                self.engine, "final_model.pt", model_config=self.model_config.model_dump(),
                extra={"step": self.step, "val_loss": val_loss})
        finally:
            logger.close()
        elapsed = time.perf_counter() - start
        return TrainResult(final_step=self.step, final_val_loss=val_loss, best_val_loss=self.best_val_loss,
                           final_model_path=final_path, best_model_path=Path(cfg.checkpoint_dir) / "best_model.pt",
                           tokens_per_s=(self.step - start_step) * self.tokens_per_step / max(elapsed, 1e-9))

    def train_step(self) -> dict[str, float]:
        """One optimizer step over grad_accum micro-batches; returns the step's metrics."""
        self.engine.train()
        # Seeding by (seed, step, rank) makes dropout masks independent of where a run was resumed.
        torch.manual_seed(self.training.seed * _STEP_SEED_PRIME + self.step * _RANK_SEED_PRIME + distributed.rank())
        started = time.perf_counter()
        total = 0.0
        for micro_step in range(self.grad_accum):
            total += self.forward_backward_step(micro_step)
        elapsed = time.perf_counter() - started
        grad_norm = self.engine.get_global_grad_norm()
        loss = distributed.all_reduce_mean(total / self.grad_accum, self.engine.device)
        return {"loss": loss, "lr": self.engine.get_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
                "tokens_per_s": self.tokens_per_step / elapsed, "peak_memory_gb": peak_memory_bytes() / 2**30}

    def forward_backward_step(self, micro_step: int) -> float:
        """Forward and backward of one micro-batch; `engine.step()` applies the update at the boundary."""
        indices = sample_indices(step=self.step, micro_step=micro_step, rank=distributed.rank(),
                                 world_size=self.world_size, micro_batch=self.micro_batch,
                                 grad_accum=self.grad_accum)
        batch = self.train_windows.batch(indices).to(self.engine.device, non_blocking=True)
        _, loss = self.engine(batch[:, :-1], targets=batch[:, 1:])
        self.engine.backward(loss)
        self.engine.step()
        return loss.item()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over eval_batches micro-batches per rank, averaged over ranks."""
        self.engine.eval()
        total = 0.0
        for batch_index in range(self.training.eval_batches):
            indices = eval_indices(batch_index=batch_index, rank=distributed.rank(), world_size=self.world_size,
                                   micro_batch=self.micro_batch)
            batch = self.val_windows.batch(indices).to(self.engine.device)
            _, loss = self.engine(batch[:, :-1], targets=batch[:, 1:])
            total += loss.item()
        self.engine.train()
        return distributed.all_reduce_mean(total / self.training.eval_batches, self.engine.device)

    def _evaluate_and_track(self, logger: MetricsLogger) -> float:
        val_loss = self.evaluate()
        logger.log_eval(self.step, val_loss)
        if val_loss < self.best_val_loss:
            self.best_val_loss = val_loss
            self.checkpoints.export_model(self.engine, "best_model.pt", model_config=self.model_config.model_dump(),
                                          extra={"step": self.step, "val_loss": val_loss})
        return val_loss

    def _client_state(self) -> dict[str, Any]:
        return {"step": self.step, "best_val_loss": self.best_val_loss}

    def sample_text(self, checkpoint_path: str | Path, prompt: str, *, max_new_tokens: int,
                    temperature: float = 0.8, top_k: int = 50) -> str:
        """Generate from a saved `.pt` with the original project's load snippet (rank 0 only)."""
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        config = ModelConfig(**ckpt["config"])
        model = create_model(config.model_type, config)
        model.load_state_dict(ckpt["model_state_dict"])
        model.to(self.engine.device).eval()
        ids = [self.tokenizer.bos_id] + self.tokenizer.encode(prompt) if self.tokenizer.bos_id >= 0 else \
            self.tokenizer.encode(prompt)
        idx = torch.tensor([ids], dtype=torch.long, device=self.engine.device)
        torch.manual_seed(self.training.seed)
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k)
        return prompt + self.tokenizer.decode(out[0, len(ids):].tolist())

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
import numpy as np
import torch
from deepspeed.accelerator import get_accelerator

from data import DataConfig, sample_indices
from data.training_data import TrainingData, open_training_data, prepare_sources
from engine import distributed
from engine.checkpoint.manager import CheckpointManager, latest_tag
from engine.numerics import GradNormProbe, check_finite_step, check_finite_val_loss, weights_finite
from engine.signals import StopController
from engine.config import TrainingConfig
from engine.errors import START_OVER, CheckpointError, TrainingError
from engine.checkpoint.export import load_initial_weights
from engine.checkpoint.safe_load import load_weights_file
from engine.faults import kill_point, poison_gradient_at
from engine.metrics import MetricsLogger, peak_memory_bytes
from engine.optimizer import optimizer_arguments
# Imported from here by tests/launcher/engine_bytes.py and tools/bench/convert.py.
from engine.param_groups import param_groups  # noqa: F401
from engine.schedule import warmup_cosine_scheduler
from engine.model_setup import build_model
from model import ModelConfig, create_model, sequence_parallel
from model.tiling import configure_tiling
from model.losses import IGNORE_INDEX
from model.registry import family_costs

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
    stop_reason: str | None = None
    """Why the run stopped before max_steps with a checkpoint (a signal, the time limit), or None."""


class Trainer:
    """Trains one model on one corpus with the DeepSpeed engine; every rank builds one."""

    def __init__(self, *, model_config: ModelConfig, training: TrainingConfig, data: DataConfig,
                 ds_config: dict[str, Any], run_record: dict[str, Any], local_rank: int = 0,
                 peak_flops_per_s: float | None = None):
        self.model_config = model_config
        self.training = training
        self.data_config = data
        self.ds_config = ds_config
        self.run_record = run_record
        self.local_rank = local_rank
        # One GPU's dense 16-bit peak (the launcher's table, launcher/planning/gpu_specs.py); None (CPU, an unknown
        # GPU, fp32): no MFU is logged.
        self.peak_flops_per_s = peak_flops_per_s
        self.checkpoints = CheckpointManager(
            training.checkpoint_dir, keep_last=training.keep_last_checkpoints, run_record=run_record,
            node_local=bool(ds_config.get("checkpoint", {}).get("use_node_local_storage", False)))
        self.engine = None
        self.step = 0
        self.best_val_loss = math.inf

    # ---- set-up ---------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Join the process group, prepare data, build the model and the engine, resume if possible."""
        distributed.init_distributed()
        self.checkpoints.prepare(resume=self.training.resume)
        seq_len = self.model_config.max_seq_len
        # The data layer checks the tokenizer against model.vocab_size and every shard as it opens
        # (data/shard_checks.py): present, long enough, ids inside the vocabulary.
        self.data = self._prepare_data()
        self.prepared, self.tokenizer = self.data.prepared, self.data.tokenizer
        self.train_windows, self.val_windows = self.data.sources[0].train, self.data.sources[0].val
        # Samples taken from each source so far: the mixture's exact position, saved in every checkpoint.
        self.source_positions = np.zeros(len(self.data.sources), dtype=np.int64)
        self.last_eval: dict[str, tuple[float, int]] = {}

        if get_accelerator().device_name() == "cpu":
            # Decaying SSM states and small gradients underflow into denormals, which x86 handles ~100x slower;
            # flushing them made the CPU Mamba scan ~7x faster (docs/machine_notes.md). GPUs flush already.
            torch.set_flush_denormal(True)
        torch.manual_seed(self.training.seed)
        mpu = self._join_sequence_parallel_group()
        # ZeRO-3: partitioned while created; ZeRO 0-2 on CUDA: on the GPU in the training dtype (no host copy).
        model = build_model(self.model_config, ds_config=self.ds_config, precision=self.training.precision,
                            device=get_accelerator().current_device_name(),
                            compiled=self.training.compile_blocks, mpu=mpu)
        # The launcher resolves 'auto' to the plan's count; a Trainer built directly with 'auto' recomputes nothing.
        model.num_checkpointed_blocks = self.training.checkpointed_blocks(self.model_config.n_layers) or 0
        configure_tiling(model, tiled_mlp=self.training.tiled_mlp, tiled_loss=self.training.tiled_loss)
        if self.training.init_from and not (self.training.resume and latest_tag(self.training.checkpoint_dir)):
            load_initial_weights(model, self.training.init_from, self.model_config)
            if distributed.is_main_process():
                print(f"initialised from {self.training.init_from}", flush=True)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, config=self.ds_config, mpu=mpu,
            **optimizer_arguments(model, self.training, on_cuda=get_accelerator().device_name() == "cuda"),
            lr_scheduler=warmup_cosine_scheduler(warmup_steps=self.training.warmup_steps,
                                                 max_steps=self.training.max_steps,
                                                 min_lr_ratio=self.training.min_lr_ratio))
        distributed.skip_single_rank_gradient_allreduce(self.engine)
        self.grad_norms = GradNormProbe(self.engine)  # ZeRO-0 fp32: DeepSpeed reports no norm
        poison_gradient_at(self.engine.module, lambda: self.step)  # a test hook; does nothing in a real run
        self.micro_batch = self.engine.train_micro_batch_size_per_gpu()
        self.grad_accum = self.engine.gradient_accumulation_steps()
        # Ranks of one sequence-parallel group read the same samples: the data-parallel world is world / N, and
        # tokens are counted once per sequence.
        self.world_size = distributed.world_size() // self.sequence_parallel_size
        self.data_rank = distributed.rank() // self.sequence_parallel_size
        self.tokens_per_step = self.micro_batch * self.grad_accum * self.world_size * seq_len
        # Model FLOPs of one training token as the family states them (model/*_costs.py), the MFU numerator; a
        # family registered without a costs module logs no MFU.
        try:
            self.flops_per_token = family_costs(self.model_config.model_type).training_flops_per_token(
                self.model_config, seq_len)
        except ValueError:
            self.flops_per_token = None

        if self.training.resume:
            state = self.checkpoints.load_latest(self.engine)
            while state is not None and not weights_finite(self.engine):  # committed before the finite checks
                self.checkpoints.set_aside(self.checkpoints.resumed_tag, "its weights hold NaN or inf")
                state = self.checkpoints.load_latest(self.engine)
                if state is None:
                    raise CheckpointError(
                        f"every checkpoint in {self.training.checkpoint_dir} holds NaN or inf weights (set aside "
                        "as *.damaged-*): set training.checkpoint_dir to a new folder to start over")
            if state is not None:
                self._check_global_batch(state)
                self.step = int(state["step"])
                self.best_val_loss = float(state.get("best_val_loss", math.inf))
                self._restore_source_positions(state.get("data_positions"))

    def _join_sequence_parallel_group(self):
        """Split sequences over training.sequence_parallel ranks (the launcher resolves 'auto'); the mpu or None."""
        value = self.training.sequence_parallel
        self.sequence_parallel_size = value if isinstance(value, int) else 1
        if self.model_config.max_seq_len % self.sequence_parallel_size:
            raise TrainingError(f"model.max_seq_len={self.model_config.max_seq_len} does not split over "
                                f"training.sequence_parallel={self.sequence_parallel_size} ranks: make it a multiple")
        try:
            return distributed.join_sequence_parallel_group(self.sequence_parallel_size)
        except ValueError as err:
            raise TrainingError(str(err)) from None

    def _forward_loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss of batch (B, T + 1): under sequence parallelism this rank runs its shard of every
        row and the loss is the token-weighted mean over the group (model/sequence_parallel.py)."""
        inputs = sequence_parallel.shard_sequence(batch[:, :-1])
        targets = sequence_parallel.shard_sequence(batch[:, 1:])
        _, loss = self.engine(inputs, targets=targets)
        return sequence_parallel.group_mean_loss(loss, int((targets != IGNORE_INDEX).sum()))

    def _prepare_data(self) -> TrainingData:
        """Local rank 0 builds (or finds) the cache; then every rank opens it read-only."""
        vocab_size = self.model_config.vocab_size
        if self.local_rank == 0:
            prepare_sources(self.data_config, vocab_size=vocab_size, progress=distributed.is_main_process())
        distributed.barrier()
        return open_training_data(self.data_config, vocab_size=vocab_size, seq_len=self.model_config.max_seq_len,
                                  seed=self.training.seed)

    def _restore_source_positions(self, saved: dict[str, int] | None) -> None:
        names = [source.name for source in self.data.sources]
        if saved is None:  # a checkpoint from before mixtures: the run took positions 0 .. step x global batch
            global_batch = self.micro_batch * self.grad_accum * self.world_size
            self.source_positions = self.data.mixture.counts_after(self.step * global_batch)
        elif sorted(saved) != sorted(names):
            raise TrainingError(f"the checkpoint was trained on data sources {sorted(saved)} but data.sources now "
                                f"names {sorted(names)}: resume with the same sources, or {START_OVER}")
        else:
            self.source_positions = np.array([int(saved[name]) for name in names], dtype=np.int64)

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
        stopper = StopController(max_runtime_s=cfg.max_runtime_s)
        stopper.install()
        try:
            while self.step < cfg.max_steps:
                with stopper.stepping():
                    metrics = self.train_step()
                self.step += 1
                check_finite_step(self.step, metrics, cfg, fp16=cfg.fp16)
                logger.log_step(self.step, metrics, write=self.step % cfg.log_interval == 0)
                kill_point("train.step_done")
                if self.step % cfg.eval_interval == 0 or self.step == cfg.max_steps:
                    val_loss = self._evaluate_and_track(logger)
                if self.step % cfg.save_interval == 0 or self.step == cfg.max_steps:
                    self._save()
                    saved_step = self.step
                if self.step < cfg.max_steps and (reason := stopper.agreed_stop(self.engine.device)):
                    if saved_step != self.step:
                        self._save()
                    return self._stopped(reason, start_step, start)
            if math.isnan(val_loss):  # resumed at the end: nothing ran, measure the final weights anyway
                val_loss = self._evaluate_and_track(logger)
            if saved_step != self.step:
                self._save()
            final_path = self.checkpoints.export_model(
                self.engine, "final_model.pt", model_config=self.model_config.model_dump(),
                extra={"step": self.step, "val_loss": val_loss})
        finally:
            stopper.uninstall()
            logger.close()
        elapsed = time.perf_counter() - start
        return TrainResult(final_step=self.step, final_val_loss=val_loss, best_val_loss=self.best_val_loss,
                           final_model_path=final_path, best_model_path=Path(cfg.checkpoint_dir) / "best_model.pt",
                           tokens_per_s=(self.step - start_step) * self.tokens_per_step / max(elapsed, 1e-9))

    def _stopped(self, reason: str, start_step: int, start: float) -> TrainResult:
        cfg = self.training
        elapsed = time.perf_counter() - start
        return TrainResult(final_step=self.step, final_val_loss=math.nan, best_val_loss=self.best_val_loss,
                           final_model_path=Path(cfg.checkpoint_dir) / "final_model.pt",
                           best_model_path=Path(cfg.checkpoint_dir) / "best_model.pt",
                           tokens_per_s=(self.step - start_step) * self.tokens_per_step / max(elapsed, 1e-9),
                           stop_reason=reason)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over grad_accum micro-batches; returns the step's metrics."""
        self.engine.train()
        # Seeding by (seed, step, rank) makes dropout masks independent of where a run was resumed.
        torch.manual_seed(self.training.seed * _STEP_SEED_PRIME + self.step * _RANK_SEED_PRIME + distributed.rank())
        lr = self.engine.get_lr()[0]  # the lr this step's update uses (the scheduler advances inside it)
        started = time.perf_counter()
        total = 0.0
        # Every rank assigns the whole global batch, so the mixture is the same whatever the layout.
        global_batch = self.micro_batch * self.grad_accum * self.world_size
        self._step_sources = self.data.mixture.assign(self.source_positions, global_batch)
        for micro_step in range(self.grad_accum):
            total += self.forward_backward_step(micro_step)
        elapsed = time.perf_counter() - started
        self.source_positions += np.bincount(self._step_sources[0], minlength=len(self.source_positions))
        grad_norm = self.grad_norms.read()
        loss = distributed.all_reduce_mean(total / self.grad_accum, self.engine.device)
        metrics = {"loss": loss, "lr": lr, "grad_norm": grad_norm,
                   "tokens_per_s": self.tokens_per_step / elapsed, "peak_memory_gb": peak_memory_bytes() / 2**30}
        if self.peak_flops_per_s and self.flops_per_token:
            # Every rank's peak: under sequence parallelism a token's FLOPs are shared by its group's ranks.
            metrics["mfu"] = (metrics["tokens_per_s"] * self.flops_per_token
                              / (self.peak_flops_per_s * distributed.world_size()))
        return metrics

    def forward_backward_step(self, micro_step: int) -> float:
        """Forward and backward of one micro-batch; `engine.step()` applies the update at the boundary."""
        indices = sample_indices(step=self.step, micro_step=micro_step, rank=self.data_rank,
                                 world_size=self.world_size, micro_batch=self.micro_batch,
                                 grad_accum=self.grad_accum)
        batch = self._train_batch(indices).to(self.engine.device, non_blocking=True)
        loss = self._forward_loss(batch)
        self.engine.backward(loss)
        self.engine.step()
        return loss.item()

    def _train_batch(self, indices: range) -> torch.Tensor:
        """Rows of the step's global positions: each from its source at that source's own next position."""
        offset = self.step * self.micro_batch * self.grad_accum * self.world_size
        sources, local = self._step_sources
        rows = [self.data.sources[int(sources[i - offset])].train.batch([int(local[i - offset])])
                for i in indices]
        return torch.cat(rows)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation token cross-entropy, per source and combined by the mixture weights.

        Each source evaluates its first min(num windows, eval_batches x micro-batch x ranks) validation windows,
        each exactly once (the whole split when it is smaller), as a token-weighted mean: the figure depends on
        the windows, not on how ranks and micro-batches divide them. self.last_eval holds (loss, tokens) per source.
        """
        self.engine.eval()
        self.last_eval = {}
        for source in self.data.sources:
            if source.val is not None:
                self.last_eval[source.name] = self._evaluate_windows(source.val)
        self.engine.train()
        if not self.last_eval:
            raise TrainingError("no data source has a validation split to evaluate on: preprocess with "
                                "--val_fraction > 0")
        weights = {s.name: s.weight for s in self.data.sources if s.name in self.last_eval}
        if sum(weights.values()) <= 0:  # only evaluation-only sources have a validation split: plain mean
            weights = dict.fromkeys(weights, 1.0)
        return sum(weights[name] * loss for name, (loss, _) in self.last_eval.items()) / sum(weights.values())

    def _evaluate_windows(self, windows) -> tuple[float, int]:
        """(mean token cross-entropy, tokens) over the first windows of a validation split."""
        per_round = self.micro_batch * self.world_size
        num_windows = min(len(windows), self.training.eval_batches * per_round)
        loss_sum, num_tokens = 0.0, 0
        for round_index in range(math.ceil(num_windows / per_round)):
            first = round_index * per_round + self.data_rank * self.micro_batch
            mine = range(first, min(first + self.micro_batch, num_windows))
            # A rank with no window left still runs a forward: ZeRO-3 gathers parameters collectively.
            batch = windows.batch(mine if len(mine) else [0]).to(self.engine.device)
            loss = self._forward_loss(batch)
            # Every rank of a sequence-parallel group holds the same window and group loss: count it once.
            if len(mine) and sequence_parallel.rank() == 0:
                tokens = batch[:, 1:].numel()
                loss_sum += loss.item() * tokens
                num_tokens += tokens
        totals = torch.tensor([loss_sum, float(num_tokens)], dtype=torch.float64, device=self.engine.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        return float(totals[0] / totals[1]), int(totals[1])

    def _save(self) -> None:
        """Commit a resumable checkpoint of this step, only if every rank's weights are finite."""
        if not weights_finite(self.engine):
            check_finite_val_loss(self.step, math.nan, self.training, what="a weight")  # raises NonFiniteError
        self.checkpoints.save(self.engine, self.step, self._client_state())

    def _evaluate_and_track(self, logger: MetricsLogger) -> float:
        val_loss = self.evaluate()
        check_finite_val_loss(self.step, val_loss, self.training)
        logger.log_eval(self.step, val_loss, per_source={name: loss for name, (loss, _) in self.last_eval.items()},
                        num_tokens=sum(tokens for _, tokens in self.last_eval.values()))
        if val_loss < self.best_val_loss:
            self.best_val_loss = val_loss
            self.checkpoints.export_model(self.engine, "best_model.pt", model_config=self.model_config.model_dump(),
                                          extra={"step": self.step, "val_loss": val_loss})
        return val_loss

    def _client_state(self) -> dict[str, Any]:
        return {"step": self.step, "best_val_loss": self.best_val_loss,
                "global_batch": self.micro_batch * self.grad_accum * self.world_size,
                "data_positions": {s.name: int(n) for s, n in zip(self.data.sources, self.source_positions)}}

    def _check_global_batch(self, state: dict[str, Any]) -> None:
        """The sampler reads windows by global position step x global batch: another global batch would skip or
        repeat data (the launcher re-plans the split to keep it; this guards direct use of the Trainer)."""
        saved, now = state.get("global_batch"), self.micro_batch * self.grad_accum * self.world_size
        if saved is not None and int(saved) != now:
            raise CheckpointError(
                f"{self.training.checkpoint_dir}: the checkpoint was trained with a global batch of {saved} "
                f"sequences, this run has {now} (micro-batch {self.micro_batch} x accumulation {self.grad_accum} x "
                f"{self.world_size} ranks): choose a split with the same product, or {START_OVER}")

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt as the model saw text in training: after a document boundary. The shards hold each document
        followed by eos and never a bos (data/prepare.py), so generation starts from eos, not bos."""
        return [self.tokenizer.eos_id, *self.tokenizer.encode(prompt)]

    def sample_text(self, checkpoint_path: str | Path, prompt: str, *, max_new_tokens: int,
                    temperature: float = 0.8, top_k: int = 50) -> str:
        """Generate from a saved `.pt` with the original project's load snippet (rank 0 only)."""
        ckpt = load_weights_file(checkpoint_path)
        config = ModelConfig(**ckpt["config"])
        model = create_model(config.model_type, config)
        model.load_state_dict(ckpt["model_state_dict"])
        model.to(self.engine.device).eval()
        ids = self.prompt_ids(prompt)
        idx = torch.tensor([ids], dtype=torch.long, device=self.engine.device)
        torch.manual_seed(self.training.seed)
        with sequence_parallel.sequence_parallel_disabled():  # rank 0 alone: the whole sequence, no collective
            out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k)
        # A model may have more ids than its tokenizer (a padded vocabulary); those ids have no text.
        return prompt + self.tokenizer.decode(i for i in out[0, len(ids):].tolist() if i < self.tokenizer.vocab_size)

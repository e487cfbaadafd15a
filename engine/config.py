"""The engine's own typed config: the original project's `training:` section plus what a real trainer needs."""
from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator


_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def _clock_seconds(text: str) -> float | None:
    """Seconds of SLURM's --time forms (`MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS`; sbatch(1)), None when
    `text` has none of their shapes. ValueError for a field out of range: `1:99:99` is no time of day."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if match is None or (match.group(1) is None and match.group(3) is None):
        return None  # a bare number: seconds (this project's form), not a clock
    days, first, second, third = (int(g) if g is not None else None for g in match.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = first, second or 0, third or 0
        fields = [("hours", hours, 23), ("minutes", minutes, 59), ("seconds", seconds, 59)]
    elif third is not None:  # HH:MM:SS
        days, hours, minutes, seconds = 0, first, second, third
        fields = [("minutes", minutes, 59), ("seconds", seconds, 59)]
    else:  # MM:SS, as SLURM reads two fields: `30:00` is thirty minutes
        days, hours, minutes, seconds = 0, 0, first, second
        fields = [("seconds", seconds, 59)]
    for name, value, top in fields:
        if value > top:
            raise ValueError(f"training.max_runtime {text!r}: {name} must be 0-{top}, got {value} (write "
                             "MM:SS, HH:MM:SS or D-HH:MM:SS as SLURM's --time does, e.g. '30:00' or '23:30:00')")
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def parse_duration(value: int | str | None) -> float | None:
    """Seconds from 3600, '3600', '90m', '23h30m', '1h2m3s' or SLURM's --time forms 'MM:SS', 'HH:MM:SS',
    'D-HH', 'D-HH:MM', 'D-HH:MM:SS' (fields in range); ValueError naming the key otherwise."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"training.max_runtime {value!r} is not a duration: write seconds, or e.g. '90m', "
                         "'23h30m', '2:30:00'")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"training.max_runtime must be a finite number of seconds, got {value!r} (leave it "
                             "unset, null, for no limit)")
        return value
    text = value.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    clock = _clock_seconds(text)
    if clock is not None:
        return float(clock)
    match = _DURATION.match(text)
    if not text or match is None:
        raise ValueError(f"training.max_runtime {value!r} is not a duration: write seconds, or e.g. '90m', "
                         "'23h30m', '2:30:00' (HH:MM:SS), '30:00' (MM:SS), '1-12:00:00' (D-HH:MM:SS)")
    hours, minutes, seconds = (float(group or 0) for group in match.groups())
    return hours * 3600 + minutes * 60 + seconds


class TrainingConfig(BaseModel):
    """How to train: steps, batch, optimiser, precision, evaluation, checkpoints."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    batch_size: int | None = None
    """Micro-batch per GPU in sequences (null = chosen by the launcher's memory plan)."""
    gradient_accumulation_steps: int | None = None
    """Micro-batches per optimizer step (null = chosen so the global batch reaches tokens_per_step)."""
    tokens_per_step: int = 65536
    """Target global batch in tokens per optimizer step, used when batch_size or accumulation is automatic."""
    max_steps: int = 50000
    """Number of optimizer steps."""
    learning_rate: float = 3e-4
    """Peak learning rate (AdamW; Muon derives its own from it, see docs/optimizers.md)."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor as a fraction of learning_rate."""
    warmup_steps: int = 2000
    """Linear warm-up steps before the cosine decay."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (not norms or biases)."""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """'adamw', or 'muon': DeepSpeed's Muon for hidden matrices and AdamW for the rest (docs/optimizers.md)."""
    muon_momentum: float = 0.95
    """Muon's Nesterov momentum (Jordan et al. 2024 and arXiv:2502.16982 use 0.95)."""
    muon_ns_method: Literal["gram", "standard"] = "gram"
    """DeepSpeed's Newton-Schulz variant: 'gram' (its default, cheaper on wide matrices; fp16 on GPUs, fp32 on the
    CPU) or 'standard' (Jordan et al.'s iteration, in bf16)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping). With optimizer 'muon' it defaults to 0:
    DeepSpeed's ZeRO 1-3 clip Muon's orthogonalized update rather than the gradient (docs/optimizers.md)."""
    fp16: bool = False
    """Mixed precision with float16 and dynamic loss scaling."""
    bf16: bool = False
    """Mixed precision with bfloat16."""
    zero_stage: Literal["auto", 0, 1, 2, 3] = "auto"
    """DeepSpeed ZeRO stage, or 'auto' to let the memory plan choose."""
    offload: Literal["auto", "none", "optimizer", "optimizer+params"] = "auto"
    """CPU offload: 'none', 'optimizer' (DeepSpeedCPUAdam), 'optimizer+params' (ZeRO-3 only), or 'auto'."""
    activation_checkpointing: bool | int | Literal["auto"] = "auto"
    """Recompute block activations in the backward pass to save memory: true = every block, false = none, N = the
    first N blocks (Megatron-LM's block recompute method), 'auto' = as few as the memory plan needs to fit."""
    sequence_parallel: int | Literal["auto"] = 1
    """Split every sequence over this many ranks (DeepSpeed Ulysses; model/sequence_parallel.py): 1 = off, N must
    divide the ranks, the attention/Mamba head counts and model.max_seq_len; 'auto' = the smallest N the memory plan
    needs for model.max_seq_len to fit, when that is faster than recomputing blocks or offloading."""
    tiled_mlp: bool | int = False
    """Run each SwiGLU MLP in sequence tiles, recomputed in backward (ALST's TiledMLP; model/tiling.py): it then
    saves only its input instead of four ffn-wide tensors per token. N = tiles, true = ceil(seq_len / d_model)."""
    tiled_loss: bool = False
    """The chunked output projection + cross-entropy (model/losses.py) also on CPU; on CUDA it always runs."""
    compile_blocks: bool = False
    """torch.compile each model block (model/compile.py): faster on GPU after a one-off compile; off on CPU."""
    eval_interval: int = 1000
    """Evaluate on the validation split every this many steps (and at the end)."""
    eval_batches: int = 20
    """Micro-batches per rank in one evaluation."""
    save_interval: int = 5000
    """Save a resumable DeepSpeed checkpoint 'checkpoint_step_N' every this many steps (and at the end)."""
    keep_last_checkpoints: int = 3
    """How many 'checkpoint_step_N' folders to keep; older ones are deleted."""
    log_interval: int = 10
    """Write training metrics to TensorBoard every this many steps."""
    seed: int = 42
    """Seed of initialisation and data order."""
    resume: bool = True
    """Resume from the latest checkpoint in checkpoint_dir if there is one."""
    init_from: str | None = None
    """Start a new run from the weights of this original-format .pt (e.g. a model imported with
    tools/convert_checkpoint.py --from_hf) instead of a random initialisation; a resume takes precedence."""
    sample_tokens: int = 120
    """Tokens of sample text to generate after training (0 = none)."""
    output_dir: str = "./outputs"
    """Logs (TensorBoard) and run metadata."""
    checkpoint_dir: str = "./checkpoints"
    """final_model.pt, best_model.pt and checkpoint_step_N folders."""
    node_local_checkpoints: bool = False
    """Multi-node without a shared file system: each node writes its own ranks' part of every checkpoint_step_N to
    checkpoint_dir on its own disk (DeepSpeed's checkpoint.use_node_local_storage), and resume takes the newest step
    complete on every node; the .pt exports go to node 0 (docs/multinode.md)."""
    max_runtime: int | str | None = None
    """Time limit: after this long, save a checkpoint and exit 75 (seconds, '90m', '23h30m', or SLURM's --time
    forms: '30:00' = 30 minutes, '2:30:00', '1-12:00:00')."""

    @field_validator("max_runtime", mode="before")
    @classmethod
    def _runtime_value(cls, value: object) -> object:
        """A non-finite number or an out-of-range clock is named here, not as pydantic's int|str union errors."""
        if isinstance(value, float) and not math.isfinite(value):
            parse_duration(value)  # raises the message
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _checkpointing_value(cls, value: object) -> bool | int | str:
        """true, false, auto or a block count; pydantic's own union errors would list three unrelated types."""
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "auto"):
            return {"true": True, "false": False, "auto": "auto"}[value.strip().lower()]
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        if isinstance(value, bool) or value == "auto" or (isinstance(value, int) and value >= 0):
            return value
        raise ValueError(f"training.activation_checkpointing must be true (every block), false, auto or a number of "
                         f"blocks to recompute from 0 to model.n_layers, got {value!r}")

    @model_validator(mode="after")
    def _check(self) -> "TrainingConfig":
        problems = []
        if self.fp16 and self.bf16:
            problems.append("training.fp16 and training.bf16 are both true: set one of them to false")
        for name in ("max_steps", "eval_interval", "eval_batches", "save_interval", "log_interval",
                     "keep_last_checkpoints", "tokens_per_step"):
            if getattr(self, name) < 1:
                problems.append(f"training.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("batch_size", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"training.{name} must be >= 1 or null (automatic), got {value}")
        if self.sequence_parallel != "auto" and (isinstance(self.sequence_parallel, bool)
                                                 or self.sequence_parallel < 1):
            problems.append(f"training.sequence_parallel must be a rank count >= 1 or auto, got "
                            f"{self.sequence_parallel!r}")
        if not isinstance(self.tiled_mlp, bool) and self.tiled_mlp < 1:
            problems.append(f"training.tiled_mlp must be false, true (auto) or a number of tiles >= 1, got "
                            f"{self.tiled_mlp}")
        if self.learning_rate <= 0:
            problems.append(f"training.learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(f"training.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            problems.append(f"training.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.offload == "optimizer+params" and self.zero_stage not in ("auto", 3):
            problems.append("training.offload 'optimizer+params' needs ZeRO-3: set training.zero_stage=3 "
                            "or training.offload=optimizer")
        if self.offload == "optimizer" and self.zero_stage == 0:
            problems.append("training.offload 'optimizer' needs ZeRO stage 1-3: set training.zero_stage to 1, 2 or 3")
        if self.optimizer == "muon" and self.offload in ("optimizer", "optimizer+params"):
            problems.append(f"training.offload {self.offload!r} is not supported with training.optimizer=muon here "
                            "(DeepSpeed takes Muon with offload only through its own parameter tagging): set "
                            "training.offload=none or training.optimizer=adamw")
        if self.optimizer == "muon" and self.grad_clip > 0:
            if "grad_clip" in self.model_fields_set:
                problems.append(
                    f"training.grad_clip={self.grad_clip} with training.optimizer=muon: DeepSpeed 0.19.8's ZeRO 1-3 "
                    "take the clipping norm over Muon's orthogonalized updates, not the gradients, which scales every "
                    "update down by that norm (~30x on a 2-layer 64-wide model) and differs from ZeRO-0: set "
                    "training.grad_clip=0 (docs/optimizers.md)")
            else:
                self.grad_clip = 0.0  # the default 1.0 is AdamW's; Muon's updates are normalised by construction
        if not 0.0 <= self.muon_momentum < 1.0:
            problems.append(f"training.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        try:
            runtime = self.max_runtime_s
            if runtime is not None and runtime <= 0:
                problems.append(f"training.max_runtime must be > 0, got {self.max_runtime!r}")
        except ValueError as err:
            problems.append(str(err))
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def warnings(self) -> list[str]:
        """Settings that are valid but almost certainly not meant (the launcher prints them once)."""
        found = []
        if self.warmup_steps >= self.max_steps:
            found.append(f"training.warmup_steps ({self.warmup_steps}) >= training.max_steps ({self.max_steps}): the "
                         "learning rate is still warming up when training ends, so the cosine schedule never decays; "
                         f"set training.warmup_steps below max_steps (e.g. {max(1, self.max_steps // 20)}, 5%)")
        return found

    def checkpointed_blocks(self, num_layers: int) -> int | None:
        """Blocks of num_layers to recompute, from the first: true = all, false = 0, N = N; None for 'auto'
        (the launcher's memory plan chooses)."""
        value = self.activation_checkpointing
        if value == "auto":
            return None
        return num_layers if value is True else 0 if value is False else value

    @property
    def max_runtime_s(self) -> float | None:
        """training.max_runtime in seconds (None: no limit)."""
        return parse_duration(self.max_runtime)

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "bf16" if self.bf16 else "fp32"

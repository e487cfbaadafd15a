"""Command-line entry point: config -> plan -> ds_config -> train (or start the ranks that will).

    python launcher/run.py --preset tiny                       # one process, no launcher needed
    deepspeed --num_gpus 2 launcher/run.py --preset tiny      # each rank runs this file
    python launcher/run.py --preset tiny --num_gpus 2          # starts the DeepSpeed launcher for you
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python launcher/run.py` puts launcher/, not the repo, on sys.path
    sys.path.insert(0, str(REPO_ROOT))

from launcher.config import ConfigError, RunConfig, build_run_config  # noqa: E402
from launcher.presets import PRESETS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="launcher/run.py", description="Train a Transformer or Mamba language model with DeepSpeed.")
    parser.add_argument("--config", help="YAML config file (merged over --preset)")
    parser.add_argument("--preset", help="named configuration, see --list_presets")
    parser.add_argument("--model_type", help="override model_type (transformer/mamba)")
    parser.add_argument("--num_gpus", type=int, help="override num_gpus (data-parallel ranks on this node)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override any config key, e.g. --set training.max_steps=100 (repeatable)")
    parser.add_argument("--list_presets", action="store_true", help="list the presets and exit")
    parser.add_argument("--list_models", action="store_true", help="list the model families and exit")
    parser.add_argument("--list_datasets", action="store_true", help="list the datasets and exit")
    parser.add_argument("--dry_run", action="store_true", help="validate, plan and write the ds_config; train nothing")
    parser.add_argument("--no_shutdown", action="store_true", help="never shut the machine down after training")
    parser.add_argument("--ds_config_dir", default="ds_configs", help="where the rendered DeepSpeed config goes")
    parser.add_argument("--master_port", type=int, help="rendezvous port when this command starts the ranks")
    # The DeepSpeed launcher passes --local_rank=N to every rank.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def print_presets() -> None:
    print(f"{'preset':<16} {'model_type':<12} {'d_model':>7} {'layers':>6} {'seq':>5}  notes")
    for name, tree in PRESETS.items():
        model = tree.get("model", {})
        print(f"{name:<16} {tree.get('model_type', 'transformer'):<12} {model.get('d_model', ''):>7} "
              f"{model.get('n_layers', ''):>6} {model.get('max_seq_len', ''):>5}")


def print_models() -> None:
    from model.registry import list_models

    for name, entry in list_models().items():
        print(f"{name:<12} {entry.description}")


def print_datasets() -> None:
    from data import list_corpora

    for line in list_corpora():
        print(line)


def launched_by_deepspeed() -> bool:
    """True when a launcher (deepspeed, torchrun) started this process as one rank of a job."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def configure_device(num_local_ranks: int) -> str:
    """Pick DeepSpeed's accelerator and, on CPU, share the cores between the local ranks."""
    import torch

    if "DS_ACCELERATOR" not in os.environ:
        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    device = os.environ["DS_ACCELERATOR"]
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_local_ranks))
    return device


def check_device_support(run: RunConfig, device: str) -> None:
    from deepspeed.accelerator import get_accelerator

    if run.training.fp16 and not get_accelerator().is_fp16_supported():
        raise ConfigError(f"training.fp16: float16 training is not supported on this {device} device; "
                          "set --set training.fp16=false (or training.bf16=true)")
    if run.training.bf16 and not get_accelerator().is_bf16_supported():
        raise ConfigError(f"training.bf16: bfloat16 is not supported on this {device} device; "
                          "set --set training.bf16=false")


def start_ranks(args: argparse.Namespace, argv: list[str], num_gpus: int) -> int:
    """Re-run this command under the DeepSpeed launcher with `num_gpus` ranks and wait for it."""
    port = args.master_port or free_port()
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_gpus),
               "--master_port", str(port), str(Path(__file__).resolve()), *argv]
    env = dict(os.environ)
    if env.get("DS_ACCELERATOR", "cpu") == "cpu" and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // num_gpus))
    print(f"starting {num_gpus} ranks: {' '.join(command)}", flush=True)
    return subprocess.call(command, env=env)


def code_version() -> dict[str, str]:
    import deepspeed
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return {"git_commit": commit or "unknown", "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.list_presets or args.list_models or args.list_datasets:
        for wanted, show in ((args.list_presets, print_presets), (args.list_models, print_models),
                             (args.list_datasets, print_datasets)):
            if wanted:
                show()
        return 0

    config_path = args.config
    if config_path is None and args.preset is None:
        config_path = "config.yaml"  # the original's default
    try:
        run = build_run_config(preset=args.preset, config_path=config_path, overrides=args.overrides,
                               model_type=args.model_type, num_gpus=args.num_gpus)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    launched = launched_by_deepspeed()
    world_size = int(os.environ["WORLD_SIZE"]) if launched else run.num_gpus
    if not launched and run.num_gpus > 1 and not args.dry_run:
        return start_ranks(args, argv, run.num_gpus)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    device = configure_device(local_world)
    try:
        check_device_support(run, device)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from launcher.ds_config import build_ds_config, write_ds_config
    from launcher.plan import choose_plan

    plan = choose_plan(run.model, run.training, world_size)
    ds_config = build_ds_config(run, plan, pin_memory=device == "cuda")
    run_name = args.preset or Path(config_path).stem
    rank = int(os.environ.get("RANK", 0))
    ds_config_path = Path(args.ds_config_dir) / f"{run_name}.json"
    if rank == 0:
        write_ds_config(ds_config, ds_config_path)
    if args.dry_run:
        print(f"config OK: {run_name}, model_type {run.model_type}, world size {world_size}")
        print(f"plan: ZeRO-{plan.zero_stage}, offload optimizer {plan.offload_optimizer}, offload params "
              f"{plan.offload_params}, micro-batch {plan.micro_batch}, accumulation {plan.grad_accum}, "
              f"global batch {plan.global_batch * run.model.max_seq_len} tokens")
        print(f"ds_config written to {ds_config_path}")
        return 0
    return train(run, plan, ds_config, args, world_size)


def train(run: RunConfig, plan, ds_config: dict, args: argparse.Namespace, world_size: int) -> int:
    if not launched_by_deepspeed():  # one process on its own: give DeepSpeed the environment a launcher would
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(args.master_port or free_port())})
    from data.statistics import unigram_cross_entropy
    from engine.distributed import is_main_process, teardown_distributed
    from engine.trainer import Trainer

    training = run.training.model_copy(update={
        "batch_size": plan.micro_batch, "gradient_accumulation_steps": plan.grad_accum,
        "zero_stage": plan.zero_stage, "activation_checkpointing": plan.activation_checkpointing,
        "offload": "optimizer+params" if plan.offload_params else "optimizer" if plan.offload_optimizer else "none"})
    resolved = run.model_copy(update={"training": training})
    run_record = {"run_config": json.loads(resolved.model_dump_json()), "ds_config": ds_config,
                  "version": code_version()}
    local_rank = args.local_rank if args.local_rank is not None else int(os.environ.get("LOCAL_RANK", 0))
    trainer = Trainer(model_config=run.model, training=training, data=run.data, ds_config=ds_config,
                      run_record=run_record, local_rank=local_rank)
    result = trainer.train()
    if is_main_process():
        baseline = unigram_cross_entropy(trainer.prepared)
        print(f"\nfinished {result.final_step} steps, {result.tokens_per_s:,.0f} tokens/s")
        print(f"validation loss {result.final_val_loss:.4f} (best {result.best_val_loss:.4f}); "
              f"unigram baseline {baseline:.4f}")
        if run.training.sample_tokens > 0:
            sample = trainer.sample_text(result.final_model_path, "ROMEO:", max_new_tokens=run.training.sample_tokens)
            print(f"\n--- sample ---\n{sample}\n--------------")
        print(f"checkpoints: {Path(result.final_model_path).resolve()}")
        print(f"             {Path(result.best_model_path).resolve()}")
        print(f"             {Path(run.training.checkpoint_dir).resolve()}/checkpoint_step_{result.final_step} "
              f"(resumable DeepSpeed checkpoint)")
        if run.system.auto_shutdown and not args.no_shutdown:
            print("note: system.auto_shutdown is set, but automatic shutdown is not part of this release yet; "
                  "the machine stays on.")
    teardown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())

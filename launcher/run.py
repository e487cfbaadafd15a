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
import shutil
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
    parser.add_argument("--dry_run", action="store_true",
                        help="validate, print the memory plan table and write the ds_config; train nothing")
    parser.add_argument("--gpu_memory", metavar="SIZE",
                        help="plan for GPUs with this much memory each, e.g. 24GB (default: the GPUs found, or host "
                             "RAM without CUDA)")
    parser.add_argument("--cpu_memory", metavar="SIZE",
                        help="host RAM per node to plan for, e.g. 256GB (default: this machine's available RAM; "
                             "not checked with --gpu_memory unless given)")
    parser.add_argument("--no_shutdown", action="store_true", help="never shut the machine down after training")
    parser.add_argument("--ds_config_dir", default="ds_configs", help="where the rendered DeepSpeed config goes")
    parser.add_argument("--master_port", type=int, help="rendezvous port when this command starts the ranks")
    parser.add_argument("--hostfile", help="DeepSpeed hostfile ('host slots=N' lines) for a multi-node job; passed "
                                           "to the DeepSpeed launcher")
    parser.add_argument("--node_rank", type=int, help="this node's index in the hostfile: start one DeepSpeed runner "
                                                      "per node with --no_ssh (no ssh/pdsh; docs/multinode.md). "
                                                      "Under Slurm: SLURM_NODEID")
    parser.add_argument("--master_addr", help="address of the hostfile's first node, where rank 0 listens (with "
                                              "--node_rank; under Slurm: the job's first node)")
    parser.add_argument("--internode_bandwidth", metavar="RATE",
                        help="bandwidth between nodes per node for the plan, e.g. 25GB/s or 200Gb/s (default: an "
                             "assumption the dry run names; measure it with tools/gpu_report.py)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
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
    from data.corpora.catalog import format_catalog

    print("\n".join(format_catalog()))
    print("\nrecommend a mixture: python tools/list_datasets.py --recommend 1B [--lang en|zh|mix]")


WARNED_ENV = "RAG_CONFIG_WARNINGS_SHOWN"
"""Set for the ranks this command starts: it printed the config warnings (run_command) before starting them."""


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


def put_venv_tools_on_path() -> None:
    """Make the `ninja` that requirements.txt installs next to this interpreter findable.

    DeepSpeed JIT-builds DeepSpeedCPUAdam (optimizer offload) with torch.utils.cpp_extension, which runs `ninja`
    from PATH; `.venv/bin/python launcher/run.py` without an activated venv would otherwise fail with "Ninja is
    required to load C++ extensions" on a machine without a system ninja.
    """
    bin_dir = Path(sys.executable).parent  # not resolved: a venv's python is a link to the base interpreter
    if shutil.which("ninja") is None and (bin_dir / "ninja").is_file():
        os.environ["PATH"] = os.pathsep.join(filter(None, [str(bin_dir), os.environ.get("PATH", "")]))


def start_ranks(args: argparse.Namespace, argv: list[str], num_gpus: int, entry_script: str | None = None,
                nodes=None) -> int:
    """Re-run this command under the DeepSpeed launcher with `num_gpus` ranks and wait for it.

    The launcher ends the job when any rank exits non-zero (it terminates the others, then kills them after 30 s)
    and exits with that rank's code, which is returned here. On one node of a multi-node job (`nodes`, see
    multinode_runner_args) the runner starts only this node's ranks, with --no_ssh.
    """
    port = args.master_port or free_port()
    hostfile = ["--hostfile", args.hostfile] if args.hostfile else []
    if nodes is not None:
        from launcher.nodes import multinode_runner_args

        hostfile, port = multinode_runner_args(args, nodes, num_gpus)
    script = Path(entry_script or __file__).resolve()
    command = [sys.executable, "-m", "deepspeed.launcher.runner", *hostfile, "--num_gpus", str(num_gpus),
               "--master_port", str(port), str(script), *argv]
    env = {**os.environ, WARNED_ENV: "1"}  # the config warnings were printed here already
    if env.get("DS_ACCELERATOR", "cpu") == "cpu" and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // num_gpus))
    print(f"starting {num_gpus} ranks: {' '.join(command)}", flush=True)
    from launcher.exit_codes import run_forwarding_signals

    return run_forwarding_signals(command, env=env)


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


def main(argv: list[str] | None = None, *, entry_script: str | None = None, trainer_class: type | None = None) -> int:
    """Run the command line `argv` (default sys.argv[1:]); returns the exit code (see launcher/exit_codes.py).

    A problem the user can fix ends with one `error: ...` line and exit code 2 (3 for NaN/inf), no traceback
    unless --debug is given.
    """
    from launcher.exit_codes import report_errors

    argv = list(sys.argv[1:] if argv is None else argv)
    with report_errors(debug="--debug" in argv) as outcome:
        outcome.code = run_command(argv, entry_script=entry_script, trainer_class=trainer_class)
    return outcome.code


def run_command(argv: list[str], *, entry_script: str | None = None, trainer_class: type | None = None) -> int:
    """Run the command line `argv`; returns the exit code.

    entry_script: the script each rank runs when this command starts the ranks itself (default launcher/run.py).
    A script that extends the launcher before calling main() (registers a model family, wraps the Trainer) passes
    its own path, so that its ranks run it too.
    trainer_class: a subclass of engine.trainer.Trainer to train with (default Trainer); see
    examples/custom_family.py.
    """
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
    # Once per command: rank 0 (or the only process), not again in ranks this command started itself.
    if int(os.environ.get("RANK", 0)) == 0 and os.environ.get(WARNED_ENV) != "1":
        for warning in run.training.warnings():
            print(f"warning: {warning}", file=sys.stderr, flush=True)

    launched = launched_by_deepspeed()
    from launcher.nodes import job_nodes

    try:
        nodes = job_nodes(args, run.num_gpus, launched=launched)
    except ValueError as err:  # NodeError, or a bandwidth that does not parse
        print(f"error: {err}", file=sys.stderr)
        return 2
    world_size = int(os.environ["WORLD_SIZE"]) if launched else run.num_gpus * nodes.num_nodes
    run_name = args.preset or Path(config_path).stem
    if not launched and (world_size > 1 or args.hostfile) and not args.dry_run:
        # Plan here too, so that a run that cannot fit fails before any rank starts; the ranks plan again.
        if make_plan(run, args, world_size, run_name, launched=False, detect_in_subprocess=True,
                     nodes=nodes) is None:
            return 2
        put_venv_tools_on_path()
        return start_ranks(args, argv, run.num_gpus, entry_script,
                           nodes=nodes if nodes.num_nodes > 1 and nodes.node_rank is not None else None)
    device = configure_device(local_ranks(world_size))
    try:
        check_device_support(run, device)
    except ConfigError as err:
        if not args.dry_run:
            print(f"error: {err}", file=sys.stderr)
            return 2
        # A dry run trains nothing: it plans for the hardware it is given (--gpu_memory), not for this machine.
        print(f"note: a training run on this machine would stop here ({err}); the dry run plans for the hardware "
              "given", file=sys.stderr)

    from launcher.ds_config import build_ds_config, write_ds_config

    plan = make_plan(run, args, world_size, run_name, launched=launched, nodes=nodes)
    if plan is None:
        return 2
    ds_config = build_ds_config(run, plan, pin_memory=device == "cuda")
    rank = int(os.environ.get("RANK", 0))
    ds_config_path = Path(args.ds_config_dir) / f"{run_name}.json"
    if rank == 0:
        write_ds_config(ds_config, ds_config_path)
    if args.dry_run:
        print(f"config OK: {run_name}, model_type {run.model_type}, world size {world_size}")
        print(f"ds_config written to {ds_config_path}")
        return 0
    put_venv_tools_on_path()
    return train(run, plan, ds_config, args, world_size, trainer_class=trainer_class)


def local_ranks(default: int) -> int:
    """Ranks on this node: torchrun's LOCAL_WORLD_SIZE or the DeepSpeed launcher's LOCAL_SIZE, else `default`."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", default)))


def hostfile_nodes(path: str | None) -> int:
    """Number of hosts in a DeepSpeed hostfile (1 without one): each runs num_gpus ranks."""
    from launcher.nodes import read_hostfile

    return len(read_hostfile(path)) if path else 1


def make_plan(run: RunConfig, args: argparse.Namespace, world_size: int, run_name: str, *, launched: bool,
              detect_in_subprocess: bool = False, nodes=None):
    """Plan against the memory found (or given); print the table on a dry run, or why nothing fits (then None).

    Under a launcher every rank plans: each measures its own GPU, and the process group (started here, the
    trainer reuses it) agrees on the smallest figures, so all ranks choose the same plan.
    """
    from launcher.planning.hardware import (HardwareError, agree_across_ranks, detect_gpus,
                                            detect_gpus_in_subprocess, memory_budget, parse_memory_size)
    from engine.errors import CheckpointError
    from launcher.planning.plan import PlanError, choose_plan
    from launcher.resume import find_resume_point, plan_resumed_run
    from launcher.planning.report import render_candidates, render_plan

    rank = int(os.environ.get("RANK", 0))
    ranks_per_node = local_ranks(run.num_gpus if not launched else world_size)
    try:
        gpu_memory = parse_memory_size(args.gpu_memory) if args.gpu_memory else None
        cpu_memory = parse_memory_size(args.cpu_memory) if args.cpu_memory else None
        gpus = None
        if gpu_memory is None:
            gpus = own_gpu(ranks_per_node) if launched else (
                detect_gpus_in_subprocess() if detect_in_subprocess else detect_gpus(limit=ranks_per_node))
        budget = memory_budget(ranks_per_node, gpu_memory, gpus=gpus, host_bytes=cpu_memory,
                               ssm_type=run.model.ssm_type if run.model_type in ("mamba", "hybrid") else None)
        if launched:
            from engine.distributed import init_distributed

            init_distributed()
            budget = agree_across_ranks(budget)
        resume_point = find_resume_point(run)
        num_nodes = nodes.num_nodes if nodes is not None else 1
        plan = (plan_resumed_run(run, resume_point, world_size, budget, report=rank == 0) if resume_point else
                choose_plan(run.model, run.training, world_size, budget, num_nodes=num_nodes))
        if nodes is not None and nodes.num_nodes > 1:
            from launcher.planning.internode import plan_across_nodes

            plan = plan_across_nodes(plan, run.model, run.training, nodes)
    except PlanError as err:
        if rank == 0:
            if err.candidates:  # a refused setting (a sequence-parallel size that cannot split) evaluated none
                print(render_candidates(err.candidates), file=sys.stderr)
            print(f"error: {err}", file=sys.stderr)
        return None
    except (HardwareError, ValueError, CheckpointError) as err:
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        return None
    if args.dry_run and rank == 0:
        print(render_plan(plan, run.model, run.training, name=run_name))
    return plan


def own_gpu(ranks_per_node: int):
    """Under a launcher: this rank's GPU only (no CUDA context on the others), as if every local GPU were like it;
    agree_across_ranks then takes the smallest over all ranks. [] without CUDA."""
    import torch

    from launcher.planning.hardware import GpuInfo

    if not torch.cuda.is_available():
        return []
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    free, total = torch.cuda.mem_get_info(local_rank)
    name = torch.cuda.get_device_name(local_rank)
    return [GpuInfo(index=i, name=name, free_bytes=free, total_bytes=total) for i in range(ranks_per_node)]


def gpu_peak_flops_per_s(precision: str) -> float | None:
    """This rank's GPU's dense 16-bit peak from launcher/planning/gpu_specs.py (None on CPU, for fp32, or an unknown GPU):
    what the trainer's MFU divides by."""
    import torch

    from launcher.planning.gpu_specs import peak_tflops

    if not torch.cuda.is_available():
        return None
    tflops = peak_tflops(torch.cuda.get_device_name(), precision)
    return tflops * 1e12 if tflops else None


def train(run: RunConfig, plan, ds_config: dict, args: argparse.Namespace, world_size: int, *,
          trainer_class: type | None = None) -> int:
    if not launched_by_deepspeed():  # one process on its own: give DeepSpeed the environment a launcher would
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(args.master_port or free_port())})
    from data.statistics import unigram_cross_entropy
    from engine.distributed import is_main_process, teardown_distributed
    from engine.trainer import Trainer
    from launcher.exit_codes import is_user_error, report_stop

    training = run.training.model_copy(update={
        "batch_size": plan.micro_batch, "gradient_accumulation_steps": plan.grad_accum,
        "zero_stage": plan.zero_stage, "activation_checkpointing": plan.num_checkpointed_blocks,
        "sequence_parallel": plan.sequence_parallel,
        "offload": "optimizer+params" if plan.offload_params else "optimizer" if plan.offload_optimizer else "none"})
    resolved = run.model_copy(update={"training": training})
    run_record = {"run_config": json.loads(resolved.model_dump_json()), "ds_config": ds_config,
                  "version": code_version()}
    local_rank = args.local_rank if args.local_rank is not None else int(os.environ.get("LOCAL_RANK", 0))
    if int(os.environ.get("RANK", 0)) == 0:
        from launcher.planning.model_sizes import count_parameters

        num_params = count_parameters(run.model)
        print(f"training {args.preset or run.model_type}: {run.model_type} with {num_params / 1e6:,.1f}M parameters"
              f" on {world_size} {os.environ.get('DS_ACCELERATOR', 'cpu')} rank(s), ZeRO-{plan.zero_stage}, "
              f"micro-batch {plan.micro_batch} x accumulation {plan.grad_accum}"
              f"{f', sequences split over {plan.sequence_parallel} ranks' if plan.sequence_parallel > 1 else ''}, "
              f"{run.training.max_steps} steps, "
              f"{run.training.precision}; checkpoints in {run.training.checkpoint_dir}", flush=True)
    trainer = (trainer_class or Trainer)(model_config=run.model, training=training, data=run.data,
                                         ds_config=ds_config, run_record=run_record, local_rank=local_rank,
                                         peak_flops_per_s=gpu_peak_flops_per_s(run.training.precision))
    try:
        result = trainer.train()
    except BaseException as err:
        if world_size > 1 and not is_user_error(err):  # every rank writes to the same terminal: say which one failed, before its traceback
            print(f"error: rank {os.environ.get('RANK', '?')} of {world_size} failed at step {trainer.step}: "
                  f"{type(err).__name__}: {err}", file=sys.stderr, flush=True)
        raise
    from launcher.shutdown import RunOutcome, maybe_shut_down

    outcome = RunOutcome(auto_shutdown=run.system.auto_shutdown, no_shutdown=args.no_shutdown, dry_run=False,
                         succeeded=result.stop_reason is None, interrupted=result.stop_reason is not None,
                         rank=int(os.environ.get("RANK", 0)))
    if result.stop_reason is not None:
        maybe_shut_down(outcome, run.system.shutdown_delay)  # never shuts down here: says why on rank 0
        return report_stop(result, run.training.checkpoint_dir)
    if is_main_process():
        print(f"\nfinished {result.final_step} steps, {result.tokens_per_s:,.0f} tokens/s")
        # The unigram baseline is computed for the single catalog corpus (trainer.prepared is None for a mixture).
        baseline = f"; unigram baseline {unigram_cross_entropy(trainer.prepared):.4f}" if trainer.prepared else ""
        print(f"validation loss {result.final_val_loss:.4f} (best {result.best_val_loss:.4f}){baseline}")
        if run.training.sample_tokens > 0:
            sample = trainer.sample_text(result.final_model_path, "ROMEO:", max_new_tokens=run.training.sample_tokens)
            print(f"\n--- sample ---\n{sample}\n--------------")
        print(f"checkpoints: {Path(result.final_model_path).resolve()}")
        print(f"             {Path(result.best_model_path).resolve()}")
        print(f"             {Path(run.training.checkpoint_dir).resolve()}/checkpoint_step_{result.final_step} "
              f"(resumable DeepSpeed checkpoint)")
    teardown_distributed()  # its barrier: past this line every rank has finished
    maybe_shut_down(outcome, run.system.shutdown_delay)
    return 0


if __name__ == "__main__":
    sys.exit(main())

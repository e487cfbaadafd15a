"""Training throughput of a preset: tokens/s, TFLOP/s, MFU and peak memory of this project's DeepSpeed path,
next to a plain PyTorch loop on the same model and transformers' model of the same shape.

    python tools/throughput.py --preset tiny [--steps 10] [--warmup 3] [--repeats 3] [--seq_len N]
                               [--micro_batch N] [--contenders deepspeed,plain,transformers] [--json out.json]

The micro-batch is the memory plan's (as `launcher/run.py` would train) unless --micro_batch is given; one
micro-step per optimizer step. All contenders train on the same random batches. On CPU (where the machine may be
shared) all contenders are alive at once and timed one step each in turn, so that a burst of load slows them alike;
the median and spread are over steps. On GPU each contender is built, timed and freed in turn (its peak memory is
its own), repeated --repeats times; median and spread are over repeats. MFU = model FLOPs per token (stated by each family, model/*_costs.py, attention counted
as in PaLM appendix B) x tokens/s / the GPU's dense bf16 peak (launcher/planning/gpu_specs.py); on CPU there is no MFU.
Goals (issue 11): deepspeed >= 0.95x plain, and faster than transformers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

CONTENDERS = ("deepspeed", "plain", "transformers")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help="a preset name (see launcher/run.py --list_presets)")
    parser.add_argument("--markdown", nargs="+", type=Path, default=None, metavar="JSON",
                        help="instead of timing: print one Markdown table of earlier --json reports")
    parser.add_argument("--summary", action="store_true",
                        help="with --markdown: one line per report (for tools/gpu_check.sh's table)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each contender, in turn")
    parser.add_argument("--seq_len", type=int, default=None, help="sequence length (default: model.max_seq_len)")
    parser.add_argument("--micro_batch", type=int, default=None, help="sequences per step (default: the plan's)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="auto: the preset's on GPU, fp32 on CPU")
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help=f"comma-separated subset of {', '.join(CONTENDERS)}")
    parser.add_argument("--interleave", choices=("auto", "yes", "no"), default="auto",
                        help="time the contenders one step each in turn, all alive at once (auto: on CPU, where the "
                             "machine may be shared; on GPU whole runs in turn, so each peak memory is its own)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, as in launcher/run.py (repeatable)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    parser.add_argument("--sequence_parallel", type=int, default=1, metavar="N",
                        help="split each sequence over N ranks (Ulysses; deepspeed contender only): run the tool "
                             "under `torchrun --nproc_per_node N`; tokens/s counts each sequence once, MFU divides "
                             "by N GPUs")
    args = parser.parse_args(argv)
    if args.markdown is None and args.preset is None:
        parser.exit(2, "error: give --preset NAME to time, or --markdown REPORT.json ... to tabulate\n")
    problems = [f"--{name} must be >= {low}, got {getattr(args, name)}"
                for name, low in (("steps", 1), ("warmup", 0), ("repeats", 1)) if getattr(args, name) < low]
    problems += [f"--{name} must be >= 1, got {getattr(args, name)}"
                 for name in ("seq_len", "micro_batch") if getattr(args, name) is not None and getattr(args, name) < 1]
    ranks = int(os.environ.get("WORLD_SIZE", 1))
    if args.sequence_parallel < 1 or args.sequence_parallel != ranks and args.markdown is None:
        problems.append(f"--sequence_parallel {args.sequence_parallel} needs as many ranks, this is {ranks}: run "
                        f"`torchrun --nproc_per_node {max(args.sequence_parallel, 1)} tools/throughput.py ...`")
    unknown = set(args.contenders.split(",")) - set(CONTENDERS)
    if unknown:
        problems.append(f"unknown contender(s) {', '.join(sorted(unknown))}: choose from {', '.join(CONTENDERS)}")
    if problems:
        parser.exit(2, "error: " + "; ".join(problems) + "\n")
    return args


def _single_process_group() -> bool:
    """deepspeed.initialize needs a process group: a one-rank one on a free port unless one exists (then False)."""
    import socket

    import torch.distributed as dist

    from engine import distributed

    if dist.is_initialized():
        return False

    if "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    distributed.init_distributed()
    return True


def plan_run(args: argparse.Namespace, on_cuda: bool):
    """Run config and the memory plan for this machine, one micro-step per optimizer step."""
    from launcher.config import build_run_config
    from launcher.planning.hardware import memory_budget
    from launcher.planning.plan import choose_plan

    overrides = list(args.overrides)
    precision = args.precision
    if precision == "auto" and not on_cuda:
        precision = "fp32"  # 16-bit matmuls on CPU are emulated or slow; fp32 is what CPU training runs
    if precision != "auto":
        overrides += [f"training.bf16={precision == 'bf16'}", f"training.fp16={precision == 'fp16'}"]
    if args.seq_len:
        overrides.append(f"model.max_seq_len={args.seq_len}")
    if args.micro_batch:
        overrides.append(f"training.batch_size={args.micro_batch}")
    overrides.append("training.gradient_accumulation_steps=1")
    overrides.append(f"training.sequence_parallel={args.sequence_parallel}")
    run = build_run_config(preset=args.preset, overrides=overrides)
    ranks = args.sequence_parallel  # one sequence-parallel group: every rank times the same batches
    plan = choose_plan(run.model, run.training, ranks, memory_budget(ranks))
    return run, plan


class _TimingStopped(BaseException):
    """Raised by the SIGTERM handler inside the timing loop (a BaseException: no `except Exception` catches it)."""


def _stop_timing(signum: int, frame: object) -> None:
    raise _TimingStopped()


def _time_all(args: argparse.Namespace, contenders: list[str], builders: dict, batches: list, device: str,
              interleave: bool, timings: dict[str, list], errors: dict[str, str]) -> None:
    """Time every contender (interleaved steps, or whole runs in turn), filling timings and errors in place."""
    from tqdm import tqdm

    from engine.evaluation.step_timing import time_contender, time_interleaved

    if interleave:
        with tqdm(total=args.repeats * args.steps, desc="timing (interleaved steps)", file=sys.stderr) as bar:
            for _ in range(args.repeats):
                live = {name: builders[name] for name in contenders if name not in errors}
                time_interleaved(live, batches, warmup=args.warmup, device=device, errors=errors, into=timings,
                                 on_step=lambda: bar.update(1))
        return
    with tqdm(total=args.repeats * len(contenders), desc="timing", file=sys.stderr) as bar:
        for _ in range(args.repeats):
            for name in contenders:
                if name not in errors:
                    try:
                        timings[name].append(time_contender(builders[name], batches, warmup=args.warmup,
                                                            device=device))
                    except Exception as error:  # a peer that fails (e.g. out of memory) must not hide the others
                        errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                bar.update(1)


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def markdown_table(reports: list[dict[str, Any]]) -> str:
    """One Markdown table row per preset and contender, from earlier --json reports."""
    gib = 2**30
    rows = ["| preset | device | precision, layout | micro-batch x seq | SP | contender | tokens/s (median, spread) | "
            "TFLOP/s | MFU | peak GiB | predicted GiB | vs deepspeed |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for report in reports:
        ours = report["results"].get("deepspeed", {}).get("tokens_per_s", {}).get("median")
        for name, r in report["results"].items():
            head = (f"| {report['preset']} | {report['device']} | {report['precision']}, {report['layout']} | "
                    f"{report['micro_batch']} x {report['seq_len']} | {report.get('sequence_parallel', 1)} | {name} |")
            if "error" in r:
                rows.append(f"{head} failed: {r['error']} | | | | | |")
                continue
            t = r["tokens_per_s"]
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            mem = f"{r['peak_memory_bytes'] / gib:.2f}" if r["peak_memory_bytes"] is not None else "n/a"
            predicted = report["predicted_allocated_bytes"]
            pred = f"{predicted / gib:.2f}" if predicted is not None and name == "deepspeed" else ""
            ratio = f"{ours / t['median']:.2f}x" if ours and name != "deepspeed" else ""
            rows.append(f"{head} {t['median']:,.0f} ({t['min']:,.0f}-{t['max']:,.0f}) | {r['tflops']:.3g} | {mfu} | "
                        f"{mem} | {pred} | {ratio} |")
    return "\n".join(rows)


def summary_line(report: dict[str, Any]) -> str:
    """One line: our throughput, MFU, peak memory against the plan, and the peers' ratios."""
    gib = 2**30
    ours = report["results"].get("deepspeed", {})
    if "tokens_per_s" not in ours:
        return f"deepspeed failed: {ours.get('error', 'not run')}"
    parts = [f"{report['layout']}, {report['micro_batch']} x {report['seq_len']}: "
             f"{ours['tokens_per_s']['median']:,.0f} tokens/s, {ours['tflops']:.3g} TFLOP/s"]
    if ours["mfu"] is not None:
        parts.append(f"MFU {100 * ours['mfu']:.1f}%")
    measured, predicted = ours["peak_memory_bytes"], report["predicted_allocated_bytes"]
    if measured and predicted:
        parts.append(f"peak {measured / gib:.1f} GiB vs predicted {predicted / gib:.1f} GiB "
                     f"({100 * (predicted / measured - 1):+.1f}%)")
    parts += [f"{key} {value:.2f}x" for key, value in report["ratios"].items()]
    parts += [f"{name} failed: {error}" for name, error in report["errors"].items()]
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.markdown is not None:
        try:
            reports = [json.loads(path.read_text()) for path in args.markdown]
        except (OSError, ValueError) as error:
            print(f"error: cannot read a report: {error}", file=sys.stderr)
            return 2
        print("\n".join(map(summary_line, reports)) if args.summary else markdown_table(reports))
        return 0
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _cuda_available() else "cpu")
    import torch
    from engine.evaluation.step_timing import BenchSetup, deepspeed_contender, make_batches, plain_contender, transformers_contender
    from launcher.config import ConfigError
    from launcher.ds_config import build_ds_config
    from launcher.planning.gpu_specs import peak_tflops
    from launcher.planning.model_sizes import training_flops_per_token
    from launcher.planning.plan import PlanError

    on_cuda = torch.cuda.is_available()
    device = "cuda:0" if on_cuda else "cpu"
    try:
        run, plan = plan_run(args, on_cuda)
    except (ConfigError, PlanError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    contenders = [c for c in CONTENDERS if c in args.contenders.split(",")]
    if args.sequence_parallel > 1 and contenders != ["deepspeed"]:
        print("--sequence_parallel: only the deepspeed contender splits sequences; skipping the peers")
        contenders = ["deepspeed"]
    if "transformers" in contenders:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("transformers is not installed: skipping that peer (pip install -r requirements-dev.txt)")
            contenders.remove("transformers")
    if not on_cuda:
        torch.set_flush_denormal(True)  # as the Trainer does on CPU (engine/trainer.py)
    created_group = _single_process_group()

    seq_len, micro_batch = run.model.max_seq_len, plan.micro_batch
    setup = BenchSetup(model=run.model, training=run.training, device=device,
                       num_checkpointed_blocks=plan.num_checkpointed_blocks)
    ds_config = build_ds_config(run, plan, pin_memory=on_cuda)
    batches = make_batches(setup, count=args.warmup + args.steps, micro_batch=micro_batch, seq_len=seq_len)
    builders = {"deepspeed": lambda: deepspeed_contender(setup, ds_config, args.sequence_parallel),
                "plain": lambda: plain_contender(setup),
                "transformers": lambda: transformers_contender(setup)}
    flops_per_token = training_flops_per_token(run.model, seq_len)
    device_name = torch.cuda.get_device_name(0) if on_cuda else f"CPU ({platform.processor() or platform.machine()}, "\
        f"{torch.get_num_threads()} threads)"
    peak = peak_tflops(device_name, run.training.precision) if on_cuda else None
    if peak:
        peak *= args.sequence_parallel  # the sequences' FLOPs are shared by N GPUs
    predicted = plan.memory.allocated if plan.memory is not None else None

    timings: dict[str, list] = {name: [] for name in contenders}
    errors: dict[str, str] = {}
    interleave = args.interleave == "yes" or (args.interleave == "auto" and not on_cuda)
    # A time limit (`timeout` sends SIGTERM, as tools/gpu_check.sh uses) stops the timing, and what finished is
    # still reported and written: a slow peer must not cost the numbers of the contenders before it.
    signal.signal(signal.SIGTERM, _stop_timing)
    try:
        _time_all(args, contenders, builders, batches, device, interleave, timings, errors)
    except _TimingStopped:
        for name in contenders:
            if not timings[name]:
                errors.setdefault(name, "stopped by SIGTERM (time limit) before it finished")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    results: dict[str, Any] = {}
    for name in contenders:
        if not timings[name]:
            results[name] = {"error": errors.get(name, "not run")}
            continue
        rates = [t.tokens_per_s for t in timings[name]]
        tflops = statistics.median(rates) * flops_per_token / 1e12
        peaks = [t.peak_bytes for t in timings[name] if t.peak_bytes is not None]
        results[name] = {"tokens_per_s": summarize(rates), "runs": rates, "tflops": tflops,
                         "mfu": tflops / peak if peak else None, "peak_memory_bytes": max(peaks) if peaks else None,
                         "final_loss": timings[name][-1].final_loss}
    ratios = {}
    ours = results.get("deepspeed", {}).get("tokens_per_s", {}).get("median")
    for peer in ("plain", "transformers"):
        theirs = results.get(peer, {}).get("tokens_per_s", {}).get("median")
        if ours and theirs:
            ratios[f"deepspeed/{peer}"] = ours / theirs
    report = {
        "preset": args.preset, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name, "torch": torch.__version__, "precision": run.training.precision,
        "seq_len": seq_len, "micro_batch": micro_batch, "steps": args.steps, "warmup": args.warmup,
        "repeats": args.repeats, "interleaved": interleave,
        "layout": f"ZeRO-{plan.zero_stage}{plan.checkpointing_label}", "sequence_parallel": args.sequence_parallel,
        "num_params": plan.memory.num_params if plan.memory else None, "flops_per_token": flops_per_token,
        "peak_tflops": peak, "predicted_allocated_bytes": predicted if on_cuda else None,
        "results": results, "ratios": ratios, "errors": errors,
    }
    if int(os.environ.get("RANK", 0)) != 0:  # the other ranks of a sequence-parallel group timed the same steps
        args.json = None
    else:
        print(render(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(args.json)  # never a half-written file
    if created_group:
        from engine import distributed

        distributed.teardown_distributed()
    return 0


def render(report: dict[str, Any]) -> str:
    """A plain-text table of one report."""
    gib = 2**30
    lines = [f"{report['preset']}: {report['num_params']:,} parameters, {report['precision']}, {report['layout']}, "
             f"micro-batch {report['micro_batch']} x {report['seq_len']} tokens"
             f"{', split over ' + str(report['sequence_parallel']) + ' ranks' if report.get('sequence_parallel', 1) > 1 else ''}"
             f", {report['steps']} timed steps "
             f"after {report['warmup']}, {report['repeats']} repeat(s); {report['device']}; "
             f"{report['flops_per_token'] / 1e9:.3f} GFLOP per token"
             + ("; interleaved steps (tokens/s per step)" if report.get("interleaved") else ""),
             f"{'contender':<14}{'tokens/s (median)':>19}{'spread':>22}{'TFLOP/s':>10}{'MFU':>8}{'peak GiB':>10}"
             f"{'loss':>8}"]
    for name, r in report["results"].items():
        if "error" in r:
            lines.append(f"{name:<14}  failed: {r['error']}")
            continue
        t = r["tokens_per_s"]
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_memory_bytes'] / gib:.2f}" if r["peak_memory_bytes"] is not None else "n/a"
        spread = f"{t['min']:,.0f}-{t['max']:,.0f}"
        lines.append(f"{name:<14}{t['median']:>19,.0f}{spread:>22}{r['tflops']:>10.3g}"
                     f"{mfu:>8}{mem:>10}{r['final_loss']:>8.3f}")
    predicted = report["predicted_allocated_bytes"]
    if predicted is not None:
        lines.append(f"memory plan's predicted peak (allocated) for deepspeed: {predicted / gib:.2f} GiB")
    else:
        lines.append("peak memory and MFU: no GPU (CPU run)")
    for key, value in report["ratios"].items():
        lines.append(f"ratio {key}: {value:.3f}")
    return "\n".join(lines)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())

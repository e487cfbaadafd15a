"""Weights out of (and into) this project's checkpoints.

    python tools/convert_checkpoint.py checkpoints --to pt --output model.pt            # original plain .pt
    python tools/convert_checkpoint.py checkpoints --to safetensors --output model_st   # safetensors + config
    python tools/convert_checkpoint.py checkpoints --to hf --output hf_model            # transformers folder
    python tools/convert_checkpoint.py checkpoints --tag checkpoint_step_500 --to universal   # resume elsewhere
    python tools/convert_checkpoint.py --from_hf hf_model --output model.pt             # a published model in

CHECKPOINT is a checkpoint_dir (its `latest` tag, or --tag) or one checkpoint_step_N folder, any ZeRO stage and
world size. Every pickle it holds is checked before anything loads it (engine/checkpoint/safe_load.py). Outputs are written
under a temporary name and renamed when complete (data/output.py); an existing --output is refused unless
--overwrite is given, and an output that is, contains or lies inside a checkpoint folder or the input is refused
always. A user error prints one `error: ...` line and exits 2.
"""
from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

UNITS = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "b": 1}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes (the hub's max_shard_size spelling)."""
    lowered = text.strip().lower()
    for unit in sorted(UNITS, key=len, reverse=True):
        if lowered.endswith(unit) and lowered[:-len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(lowered[:-len(unit)]) * UNITS[unit])
    if lowered.isdigit():
        return int(lowered)
    raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 5GB, 500MB, 2GiB)")


class AnonymousMemorySampler:
    """Peak anonymous resident memory (Linux RssAnon, sampled every 5 ms). ru_maxrss also counts the pages of
    files DeepSpeed maps (mmap) while it reads a checkpoint: page cache the kernel can drop at any time, not memory
    the conversion needs. Anonymous memory is what must fit in RAM."""

    def __init__(self):
        import threading

        self.start_gib = self.peak_gib = self._read()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _read() -> float:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 2**20  # kB -> GiB
        except OSError:
            pass
        return float("nan")

    def _run(self) -> None:
        while not self._done.wait(0.005):
            self.peak_gib = max(self.peak_gib, self._read())

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        return max(self.peak_gib, self._read())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", help="checkpoint_dir or checkpoint_step_N folder")
    parser.add_argument("--tag", help="checkpoint_step_N inside checkpoint_dir (default: its 'latest')")
    parser.add_argument("--to", choices=["pt", "safetensors", "hf", "universal"], help="output format")
    parser.add_argument("--output", help="output file (pt) or folder (safetensors, hf)")
    parser.add_argument("--from_hf", metavar="FOLDER", help="import a transformers Llama/Mamba/Mamba2/Bamba folder as .pt")
    parser.add_argument("--tokenizer", help="SentencePiece .model for --to hf (default: the run's data cache)")
    parser.add_argument("--max_shard_size", type=parse_size, default="5GB",
                        help="split safetensors above this size (default 5GB, as the hub)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output written by this command (never a checkpoint or the input)")
    parser.add_argument("--report_memory", action="store_true", help="print the peak resident memory at the end")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.from_hf:
        if args.checkpoint or args.to:
            parser.error("--from_hf takes no CHECKPOINT or --to: it writes a .pt to --output")
        if not args.output:
            parser.error("--from_hf needs --output model.pt")
    elif not args.checkpoint or not args.to:
        parser.error("give CHECKPOINT and --to FORMAT (or --from_hf FOLDER)")
    elif args.to != "universal" and not args.output:
        parser.error(f"--to {args.to} needs --output")

    from data.errors import OutputError
    from engine.errors import CheckpointError

    if args.report_memory:
        import deepspeed.utils.zero_to_fp32  # noqa: F401  (imported now, so the baseline includes it)

        import engine.checkpoint.hugging_face  # noqa: F401
        imports_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        anon = AnonymousMemorySampler()
    try:
        written = convert(args)
    except (CheckpointError, OutputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    if args.report_memory:
        # ru_maxrss is in KiB on Linux: the largest resident set this process had.
        print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.3f} GiB "
              f"(after imports: {imports_rss:.3f} GiB; peak anonymous: {anon.stop():.3f} GiB, "
              f"after imports: {anon.start_gib:.3f} GiB)")
    return 0


def convert(args: argparse.Namespace) -> Path:
    from engine.checkpoint import export, hugging_face as hf_export, universal

    from data.output import check_output

    if args.from_hf:
        check_output(Path(args.output).with_suffix(".yaml"), overwrite=args.overwrite, inputs=[args.from_hf])
        written = hf_export.import_hf_folder(args.from_hf, args.output, overwrite=args.overwrite)
        write_run_yaml(written, overwrite=args.overwrite, inputs=[args.from_hf])
        return written
    folder = export.resolve_checkpoint(args.checkpoint, args.tag)
    if args.to == "pt":
        return export.write_plain_pt(args.checkpoint if args.tag is None else folder, args.output, progress=True,
                                     overwrite=args.overwrite)
    if args.to == "safetensors":
        return export.write_safetensors(args.checkpoint if args.tag is None else folder, args.output,
                                        max_shard_bytes=args.max_shard_size, progress=True, overwrite=args.overwrite)
    if args.to == "hf":
        return hf_export.write_hf_folder(args.checkpoint if args.tag is None else folder, args.output,
                                         tokenizer_path=args.tokenizer, max_shard_bytes=args.max_shard_size,
                                         progress=True, overwrite=args.overwrite)
    return universal.ensure_universal(folder)


def write_run_yaml(pt_path: Path, *, overwrite: bool = False, inputs: list = ()) -> Path:
    """A config file for launcher/run.py --config that continues training from an imported model: its
    architecture as `model:` and `training.init_from` pointing at the .pt."""
    import yaml

    from data.output import staged_output
    from engine.checkpoint.safe_load import load_weights_file

    config = load_weights_file(pt_path, mmap=True)["config"]  # reads no weights
    tree = {"model_type": config.pop("model_type"), "model": config,
            "training": {"init_from": str(Path(pt_path).resolve())}}
    path = Path(pt_path).with_suffix(".yaml")
    with staged_output(path, overwrite=overwrite, inputs=inputs) as tmp:
        tmp.write_text(f"# continue training from {Path(pt_path).name}: python launcher/run.py --config {path}\n"
                       + yaml.safe_dump(tree, sort_keys=False))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    sys.exit(main())

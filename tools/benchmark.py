"""Benchmark against baselines: this project's checkpoints and small pretrained models on the same texts, in bits
per byte (independent of the tokenizer).

    python tools/benchmark.py --datasets-only       # fetch WikiText-103 test and LAMBADA into <data_cache>/eval_sets
    python tools/benchmark.py --models-only         # fetch Pythia-160M and Mamba-130M into the Hugging Face cache
    python tools/benchmark.py                       # compare checkpoints/best_model.pt with the baselines
    python tools/benchmark.py --checkpoint a.pt --checkpoint b.pt --baseline pythia-160m --text_file my.txt

Fetching needs the internet and fails at once without it. Comparing runs offline on what was fetched; texts are,
in this order of preference, --text_file, the fetched WikiText-103 test set, or the validation documents of the
checkpoint's own corpus. The original project's `test_benchmark.py` (`--datasets-only`, `--models-only`) did this.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from data import DataConfig  # noqa: E402
from data.corpora.embedded import load_corpus  # noqa: E402
from data.errors import DataError  # noqa: E402
from data.corpora.eval_sets import EVAL_SETS, fetch_eval_set, hub_reachable, read_eval_set  # noqa: E402
from data.output import check_output, staged_output  # noqa: E402
from data.prepare import load_prepared  # noqa: E402
from data.training_data import open_training_data  # noqa: E402
from engine.evaluation.baselines import BASELINES, load_transformers_baseline, score_all, scorable_checkpoint  # noqa: E402
from engine.errors import TrainingError  # noqa: E402
from engine.checkpoint.loading import load_trained_model  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tools/benchmark.py", description=__doc__.splitlines()[0])
    fetch = parser.add_mutually_exclusive_group()
    fetch.add_argument("--datasets-only", dest="datasets_only", action="store_true",
                       help="fetch the evaluation sets and exit")
    fetch.add_argument("--models-only", dest="models_only", action="store_true",
                       help="fetch the baseline models and exit")
    parser.add_argument("--checkpoint", action="append", help="our checkpoint(s) to compare (default: "
                                                              "checkpoints/best_model.pt); .pt, DeepSpeed or exported")
    parser.add_argument("--baseline", action="append", help=f"baseline short name ({', '.join(BASELINES)}) or a "
                                                            "transformers folder/repo (default: all short names)")
    parser.add_argument("--data_cache", default="./data_cache", help="where evaluation sets are stored")
    parser.add_argument("--text_file", action="append", help="score this UTF-8 text file (one document each)")
    parser.add_argument("--max_documents", type=int, default=50, help="documents of an evaluation set to score")
    parser.add_argument("--output_dir", default="test_results")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier benchmark.json in --output_dir")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def require_hub(what: str) -> None:
    reachable, why = hub_reachable()
    if not reachable:
        raise DataError(f"{what} needs the Hugging Face hub, which is not reachable ({why}). Run it on a machine "
                        "with internet, then copy <data_cache>/eval_sets and ~/.cache/huggingface here")


def fetch_datasets(args: argparse.Namespace) -> None:
    require_hub("--datasets-only")
    for name in EVAL_SETS:
        path = fetch_eval_set(name, args.data_cache)
        print(f"{name}: {sum(1 for _ in path.open(encoding='utf-8'))} documents -> {path}")


def fetch_models(args: argparse.Namespace) -> None:
    require_hub("--models-only")
    for name in args.baseline or list(BASELINES):
        scorable = load_transformers_baseline(name, local_only=False)
        print(f"{name}: {scorable.name} cached (context {scorable.context})")


def read_text_file(path: str) -> str:
    """A --text_file's text; DataError when it is missing, not a file, not UTF-8 text, or has no text."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"--text_file {path}: {'is a folder' if file.is_dir() else 'does not exist'}: give a UTF-8 "
                        "text file to score")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"--text_file {path} is not UTF-8 text (byte {err.start}): convert it, e.g. with iconv") \
            from None
    if not text.strip():
        raise DataError(f"--text_file {path} is empty: there is nothing to score; give a file with text")
    return text


def texts_to_score(args: argparse.Namespace, run_config: dict) -> tuple[str, list[str]]:
    if args.text_file:
        return ", ".join(args.text_file), [read_text_file(p) for p in args.text_file]
    wikitext = read_eval_set("wikitext103_test", args.data_cache, args.max_documents)
    if wikitext:
        return f"WikiText-103 test ({len(wikitext)} articles)", wikitext
    data = DataConfig(**run_config.get("data", {}))
    if data.sources:
        raise DataError("the checkpoint was trained on data.sources, whose raw validation text is not kept: pass "
                        "--text_file, or fetch WikiText-103 with --datasets-only")
    texts = list(load_corpus(data).val)[:args.max_documents]
    return f"validation documents of {data.dataset} ({len(texts)})", texts


def compare(args: argparse.Namespace) -> dict:
    models, run_config = [], {}
    for path in args.checkpoint or ["checkpoints/best_model.pt"]:
        loaded = load_trained_model(path, device=args.device)
        if loaded.model_config is None:  # an exported transformers folder: score it as a baseline
            models.append(load_transformers_baseline(str(path), local_only=True, device=args.device))
            continue
        run_config = run_config or loaded.run_config
        data = DataConfig(**loaded.run_config.get("data", {}))
        vocab_size = loaded.model_config.vocab_size
        if not data.sources and load_prepared(data, vocab_size=vocab_size) is None:
            raise DataError(f"{path}: its tokenizer is not in {data.cache_dir} (prepare the data or train once)")
        tokenizer = open_training_data(data, vocab_size=vocab_size, seq_len=loaded.model_config.max_seq_len,
                                       seed=0).tokenizer
        models.append(scorable_checkpoint(str(path), loaded.model, tokenizer, loaded.model_config.max_seq_len))
    notes = []
    for name in args.baseline or list(BASELINES):
        try:
            models.append(load_transformers_baseline(name, local_only=True, device=args.device))
        except OSError as err:  # not in the local cache
            notes.append(f"baseline {name} not available locally ({str(err).splitlines()[0]}); fetch it with "
                         "--models-only on a machine with internet")
    source, texts = texts_to_score(args, run_config)
    scores = score_all(models, texts, device=args.device)
    return {"texts": source, "num_bytes": sum(len(t.encode("utf-8")) for t in texts), "notes": notes,
            "created_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "scores": {name: score.as_dict() for name, score in scores.items()}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.datasets_only:
            fetch_datasets(args)
            return 0
        if args.models_only:
            fetch_models(args)
            return 0
        for path in args.text_file or []:  # checked before any model is loaded
            read_text_file(path)
        output = Path(args.output_dir) / "benchmark.json"
        inputs = [*(args.checkpoint or ["checkpoints/best_model.pt"]), *(args.text_file or [])]
        check_output(output, overwrite=args.overwrite, inputs=inputs, what="--output_dir")
        result = compare(args)
        with staged_output(output, overwrite=args.overwrite, inputs=inputs, what="--output_dir") as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    except (DataError, TrainingError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"\ntexts: {result['texts']}, {result['num_bytes']} bytes")
    print(f"{'model':<40} {'tokens':>8} {'nats/token':>10} {'bits/byte':>9}")
    for name, score in sorted(result["scores"].items(), key=lambda item: item[1]["bits_per_byte"]):
        print(f"{name:<40} {score['num_tokens']:>8} {score['nll_per_token']:>10.4f} {score['bits_per_byte']:>9.4f}")
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

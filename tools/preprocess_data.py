"""Tokenize a corpus with N worker processes into Megatron-format `.bin/.idx` shards plus meta.json.

    python tools/preprocess_data.py --input 'corpus/*.jsonl' --tokenizer data_cache/tokenizer.model \
        --output data_cache/shards/mycorpus --workers 2

Writes train_NNNNN / val_NNNNN shard pairs (validation chosen by document hash, exact duplicates dropped), at most
--max_shard_tokens tokens per training shard, into `.<output>.partial` beside --output, renamed to --output when
complete. Rerunning an interrupted command resumes it. An existing --output is not replaced without --overwrite. Errors a user can fix
print one line and exit 2; nothing half-written is left under a shard's name.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from data.errors import DataError  # noqa: E402
from data.preprocess import PreprocessOptions, preprocess  # noqa: E402
from data.corpora.sources import resolve_source  # noqa: E402


def add_preprocess_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", type=Path, help="SentencePiece .model (tools/train_tokenizer.py makes one)")
    parser.add_argument("--output", type=Path, help="folder of the shard set")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing worker processes")
    parser.add_argument("--text_field", default=None, help="JSON/parquet column with the text (default 'text')")
    parser.add_argument("--val_fraction", type=float, default=0.01, help="share of documents for validation")
    parser.add_argument("--max_shard_tokens", type=int, default=1 << 28, help="tokens per training shard at most")
    parser.add_argument("--max_tokens", type=int, default=None, help="stop after this many tokens")
    parser.add_argument("--no_dedup", action="store_true", help="keep exact duplicate documents")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a finished shard set of other settings at --output (never other files)")


def run_preprocess(spec: str, args: argparse.Namespace) -> int:
    """Shared by this tool and list_datasets.py --download."""
    try:
        if args.tokenizer is None or args.output is None:
            raise DataError("--tokenizer and --output are required (train a tokenizer with tools/train_tokenizer.py)")
        source = resolve_source(spec, text_field=args.text_field)
        meta = preprocess(source, PreprocessOptions(
            output_dir=args.output, tokenizer_path=args.tokenizer, num_workers=args.workers,
            val_fraction=args.val_fraction, max_shard_tokens=args.max_shard_tokens, max_tokens=args.max_tokens,
            dedup=not args.no_dedup, overwrite=args.overwrite))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished shards are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    print(f"{args.output}: {meta['num_train_tokens']:,} training tokens in {meta['num_shard_pairs']} shard(s), "
          f"{meta['num_val_tokens']:,} validation tokens; {meta['num_train_documents']:,} + "
          f"{meta['num_val_documents']:,} documents, {meta['num_documents_skipped']:,} duplicate or empty skipped"
          + (f", {meta['num_rows_not_text']:,} rows skipped whose {meta['text_field']!r} is not a string "
             "(null, a number, a list)" if meta.get("num_rows_not_text") else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True,
                        help="a .txt/.jsonl/.json/.parquet file, a quoted glob, a folder, or a catalog name")
    add_preprocess_arguments(parser)
    args = parser.parse_args(argv)
    return run_preprocess(args.input, args)


if __name__ == "__main__":
    sys.exit(main())

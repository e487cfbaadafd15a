"""Browse the dataset catalog, get a mixture recommended for a model size, and download a dataset into shards.

    python tools/list_datasets.py                       # the catalog: id/config, language, size, license, purpose
    python tools/list_datasets.py --recommend 1B --lang en
    python tools/list_datasets.py --download wikitext-103 --max_tokens 50000000 \
        --tokenizer data_cache/tokenizer.model --output data_cache/shards/wikitext-103

--download streams the dataset (`datasets`, streaming=True), tokenizes on the fly and writes shards as it goes;
rerunning it resumes. Without network it stops within seconds and says how to use local files instead.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from data.corpora.catalog import (CHINCHILLA_TOKENS_PER_PARAM, MIXTURES, format_catalog,  # noqa: E402
                                  format_recommendation, parse_model_size, recommend)
from data.errors import DataError  # noqa: E402
from tools.preprocess_data import add_preprocess_arguments, run_preprocess  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recommend", metavar="SIZE", help="model size, e.g. 125M, 1B, 7B: print a mixture")
    parser.add_argument("--lang", choices=sorted(MIXTURES), default="en", help="language of the mixture")
    parser.add_argument("--tokens_per_param", type=float, default=CHINCHILLA_TOKENS_PER_PARAM,
                        help="training tokens per parameter (20 = Chinchilla compute-optimal)")
    parser.add_argument("--download", metavar="NAME", help="stream a catalog dataset into token shards")
    add_preprocess_arguments(parser)
    args = parser.parse_args(argv)
    if args.download:
        return run_preprocess(args.download, args)
    try:
        if args.recommend:
            num_params = parse_model_size(args.recommend)
            sources = recommend(num_params, lang=args.lang, tokens_per_param=args.tokens_per_param)
            lines = format_recommendation(num_params, sources, tokens_per_param=args.tokens_per_param)
        else:
            lines = format_catalog()
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

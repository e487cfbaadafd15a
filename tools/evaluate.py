"""After-training evaluation: perplexity and bits per byte, sample generations, a JSON + Markdown report.

    python tools/evaluate.py                                   # the run's best model: checkpoints/best_model.pt
    python tools/evaluate.py --checkpoint checkpoints/final_model.pt
    python tools/evaluate.py --checkpoint checkpoints          # DeepSpeed folder (latest tag) or checkpoint_step_N
    python tools/evaluate.py --checkpoint exported/            # config.json + *.safetensors (ours or transformers)

Scores the validation shards of the run's corpus and the standard sets fetched with
`tools/benchmark.py --datasets-only` (WikiText-103 test, LAMBADA); generates from each prompt with the KV cache
(Transformer), the recurrent state (Mamba) or both (hybrid), starting after an eos as every training document does;
reads the loss curves from the run's TensorBoard logs. Writes test_results/eval_<name>.json, .md and _loss.png.
The original project's `test_after_training.py --checkpoint` did this.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data import DataConfig  # noqa: E402
from data.errors import DataError  # noqa: E402
from data.corpora.eval_sets import lambada_split, read_eval_set  # noqa: E402
from data.prepare import load_prepared  # noqa: E402
from data.training_data import open_training_data  # noqa: E402
from engine.errors import TrainingError  # noqa: E402
from data.output import staged_output  # noqa: E402
from engine.evaluation.report import check_report_paths, report_paths, write_report  # noqa: E402
from engine.evaluation.scoring import (last_word_accuracy, model_logits_fn, score_texts,  # noqa: E402
                                       score_token_stream)
from engine.evaluation.loss_curves import plot_loss_curves, read_scalar_curves  # noqa: E402
from engine.checkpoint.loading import load_trained_model  # noqa: E402

DEFAULT_PROMPTS = ("ROMEO:", "To be, or not to be")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tools/evaluate.py", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a .pt, a DeepSpeed checkpoint folder or an exported folder "
                                             "(default: <checkpoint_dir>/best_model.pt)")
    parser.add_argument("--checkpoint_dir", default="./checkpoints", help="the run's checkpoint folder")
    parser.add_argument("--data_cache", help="data cache folder (default: the run's data.cache_dir)")
    parser.add_argument("--log_dir", help="TensorBoard folder (default: <run's output_dir>/tensorboard)")
    parser.add_argument("--output_dir", default="test_results", help="where the report goes")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier report of the same checkpoint name in --output_dir")
    parser.add_argument("--max_tokens", type=int, default=200_000,
                        help="score at most this many validation tokens (whole documents)")
    parser.add_argument("--max_documents", type=int, default=200, help="documents per standard set")
    parser.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--prompt", action="append", dest="prompts", help="a generation prompt (repeatable)")
    parser.add_argument("--max_new_tokens", type=int, default=80)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    for name in ("max_tokens", "max_documents", "batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 1:
        parser.error("need --temperature >= 0, 0 < --top_p <= 1 and --top_k >= 1")
    return args


def evaluate(args: argparse.Namespace) -> dict:
    checkpoint = Path(args.checkpoint or Path(args.checkpoint_dir) / "best_model.pt")
    stem = f"eval_{checkpoint.stem if checkpoint.is_file() else checkpoint.name}"
    check_report_paths(args.output_dir, stem, overwrite=args.overwrite, inputs=[checkpoint])
    print(f"loading {checkpoint}")
    loaded = load_trained_model(checkpoint, device=args.device)
    if loaded.model_config is None:
        raise TrainingError(f"{checkpoint} is a transformers model of another tokenizer: score it with "
                            "tools/benchmark.py, which compares models on the same text in bits per byte")
    config, run_config = loaded.model_config, loaded.run_config
    data = DataConfig(**run_config.get("data", {}))
    if args.data_cache:
        data = data.model_copy(update={"cache_dir": args.data_cache})
    if not data.sources and load_prepared(data, vocab_size=config.vocab_size) is None:
        raise DataError(f"no prepared data for {data.dataset} (vocab {config.vocab_size}) under {data.cache_dir}: "
                        "pass --data_cache, or train once so that the data is prepared")
    # The data exactly as the trainer opens it: the catalog corpus or every data.sources entry, checked shards.
    training_data = open_training_data(data, vocab_size=config.vocab_size, seq_len=config.max_seq_len, seed=0)
    tokenizer = training_data.tokenizer
    logits_fn = model_logits_fn(loaded.model)
    window, eos = config.max_seq_len, tokenizer.eos_id
    report = {"checkpoint": str(checkpoint), "kind": loaded.kind, "model": f"{config.model_type}, "
              f"{loaded.model.num_parameters() / 1e6:.1f}M parameters, d_model {config.d_model} x {config.n_layers}",
              "device": args.device, "created_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
              "stored": loaded.extra, "scores": {}, "notes": []}
    with torch.no_grad():
        for source in training_data.sources:
            if source.val is None:
                continue
            # Every shard (part) holds whole documents, each ending with eos: the parts join into one stream.
            name = "validation" if len(training_data.sources) == 1 else f"validation/{source.name}"
            val = score_token_stream(logits_fn, np.concatenate([np.asarray(p) for p in source.val.parts]),
                                     separator_id=eos, decode=tokenizer.decode, window=window,
                                     batch_size=args.batch_size, device=args.device, max_tokens=args.max_tokens,
                                     progress=True, desc=name)
            report["scores"][name] = val.as_dict()
        wikitext = read_eval_set("wikitext103_test", data.cache_dir, args.max_documents)
        if wikitext:
            score = score_texts(logits_fn, wikitext, encode=tokenizer.encode, separator_id=eos, window=window,
                                batch_size=args.batch_size, device=args.device, progress=True, desc="wikitext103")
            report["scores"]["wikitext103_test"] = score.as_dict()
        else:
            report["notes"].append("WikiText-103 test not available locally: fetch it with "
                                   "`python tools/benchmark.py --datasets-only` on a machine with internet")
        lambada = read_eval_set("lambada_test", data.cache_dir, args.max_documents)
        if lambada:
            examples = [([eos] + tokenizer.encode(context), tokenizer.encode(word))
                        for context, word in map(lambada_split, lambada)]
            accuracy, count = last_word_accuracy(logits_fn, examples, device=args.device, progress=True)
            report["lambada"] = {"accuracy": accuracy, "num_examples": count}
        else:
            report["notes"].append("LAMBADA not available locally: fetch it with "
                                   "`python tools/benchmark.py --datasets-only` on a machine with internet")
        report["sampling"] = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                              "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                              "decoding": {"transformer": "KV cache", "hybrid": "KV cache + recurrent state"}.get(
                                  config.model_type, "recurrent state")}
        report["samples"] = []
        for prompt in args.prompts or DEFAULT_PROMPTS:
            # Documents in the shards end with eos and none starts with bos: eos is what precedes a document.
            ids = [eos] + tokenizer.encode(prompt)
            torch.manual_seed(args.seed)
            out = loaded.model.generate(torch.tensor([ids], device=args.device), args.max_new_tokens,
                                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                        eos_id=eos)
            # A model may have more ids than its tokenizer (a padded vocabulary); those ids have no text.
            new_ids = [i for i in out[0, len(ids):].tolist() if i < tokenizer.vocab_size]
            report["samples"].append({"prompt": prompt, "text": prompt + tokenizer.decode(new_ids)})
    log_dir = Path(args.log_dir or Path(run_config.get("training", {}).get("output_dir", "./outputs")) / "tensorboard")
    curves = read_scalar_curves(log_dir) if log_dir.is_dir() else {}
    if curves:
        png = report_paths(args.output_dir, stem)[2]
        with staged_output(png, overwrite=args.overwrite, inputs=[checkpoint], what="report") as tmp:
            backend = plot_loss_curves(curves, tmp, title=f"loss of {checkpoint.name}")
        report["loss_curve"], report["loss_curve_drawn_with"] = str(png), backend
        report["loss_points"] = {tag: len(points) for tag, points in curves.items()}
    else:
        report["notes"].append(f"no TensorBoard loss curves under {log_dir}: pass --log_dir")
    report["paths"] = [str(p) for p in write_report(report, args.output_dir, stem, overwrite=args.overwrite,
                                                    inputs=[checkpoint])]
    return report


def print_summary(report: dict) -> None:
    print(f"\n{'set':<18} {'tokens':>9} {'nats/tok':>9} {'ppl':>9} {'bits/byte':>9}")
    for name, score in report["scores"].items():
        bpb = f"{score['bits_per_byte']:.4f}" if score["bits_per_byte"] is not None else "n/a"
        print(f"{name:<18} {score['num_tokens']:>9} {score['nll_per_token']:>9.4f} {score['perplexity']:>9.2f} "
              f"{bpb:>9}")
    if "lambada" in report:
        print(f"LAMBADA last-word accuracy {report['lambada']['accuracy']:.4f} "
              f"({report['lambada']['num_examples']} passages)")
    for sample in report["samples"]:
        print(f"\n--- sample ({report['sampling']['decoding']}) ---\n{sample['text']}")
    for note in report["notes"]:
        print(f"note: {note}")
    if report.get("loss_curve"):
        print(f"loss curves ({report['loss_points']} points) drawn with {report['loss_curve_drawn_with']}: "
              f"{report['loss_curve']}")
    print("report: " + ", ".join(report["paths"]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = evaluate(args)
    except (TrainingError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_summary(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The data command lines: catalog, recommendation, offline download, bad inputs (exit 2, one line, nothing
written), and the whole path local files -> tokenizer -> shards -> training through launcher/run.py."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO_ROOT, SMALL_MODEL, run_cli, run_job
from tests.data.corpus_files import make_documents, write_jsonl, write_parquet, write_txt_folder


def run_tool(name, *args, env=None, cwd=None, timeout=120):
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return run_job([sys.executable, str(REPO_ROOT / "tools" / name), *map(str, args)], cwd=cwd or REPO_ROOT,
                   env=full_env, timeout=timeout)


def assert_clean_failure(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tools")
    corpus = write_txt_folder(folder / "texts", make_documents(150, seed=21))
    result = run_tool("train_tokenizer.py", "--input", corpus, "--vocab_size", 400, "--output", folder / "tok.model")
    assert result.returncode == 0, result.stderr
    assert "400 pieces" in result.stdout
    return folder / "tok.model"


def test_catalog_and_recommendation_print(tmp_path):
    listing = run_tool("list_datasets.py")
    assert listing.returncode == 0 and "HuggingFaceFW/fineweb-edu" in listing.stdout and "zh" in listing.stdout
    advice = run_tool("list_datasets.py", "--recommend", "7B", "--lang", "mix")
    assert advice.returncode == 0
    assert "= 140B tokens" in advice.stdout  # 20 tokens per parameter
    assert_clean_failure(run_tool("list_datasets.py", "--recommend", "seven"), "seven")


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "unreachable"])
def test_download_without_network_fails_fast_and_writes_nothing(tmp_path, tokenizer, how):
    env = {"HF_HUB_OFFLINE": "1"} if how == "HF_HUB_OFFLINE" else \
        {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    started = time.monotonic()
    result = run_tool("list_datasets.py", "--download", "wikitext-103", "--max_tokens", 1000, "--tokenizer",
                      tokenizer, "--output", tmp_path / "out", env=env)
    # datasets alone retries for ~23 s; the probe answers in well under that (the bound is loose for a busy CI).
    assert time.monotonic() - started < 20
    assert_clean_failure(result, "local files", "shakespeare")
    assert not (tmp_path / "out").exists()


def test_bad_inputs_exit_2_with_one_line(tmp_path, tokenizer, capsys):
    import tools.preprocess_data
    import tools.train_tokenizer

    def in_process(main, *args):
        """The tool's main() in this process (a subprocess each would cost seconds); stderr captured."""
        code = main([str(a) for a in args])
        return subprocess.CompletedProcess(args, code, *capsys.readouterr())

    out = tmp_path / "out"
    (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "empty.jsonl").write_text("")
    write_jsonl(tmp_path / "body.jsonl", ["some text"], field="body")
    (tmp_path / "fake.model").write_text("not a model")
    cases = [
        (["--input", tmp_path / "missing.jsonl"], "missing.jsonl"),
        (["--input", tmp_path / "empty.jsonl"], "empty"),
        (["--input", tmp_path / "body.jsonl"], "--text_field"),
        (["--input", tmp_path / "latin.txt"], "latin.txt"),
        (["--input", "no-such-dataset"], "no-such-dataset"),
    ]
    for args, fragment in cases:
        result = in_process(tools.preprocess_data.main, *args, "--tokenizer", tokenizer, "--output", out,
                            "--workers", 2)
        assert_clean_failure(result, fragment)
        assert not out.exists()
    # One case end to end in a subprocess: the exit code and the absence of a traceback are the real ones.
    assert_clean_failure(run_tool("preprocess_data.py", "--input", tmp_path / "body.jsonl", "--tokenizer",
                                  tmp_path / "nope.model", "--output", out), "nope.model")
    assert_clean_failure(in_process(tools.train_tokenizer.main, "--from_model", tmp_path / "fake.model", "--output",
                                    tmp_path / "t.model"), "fake.model")
    assert_clean_failure(in_process(tools.train_tokenizer.main, "--input", tmp_path / "empty.jsonl", "--output",
                                    tmp_path / "t.model"), "empty")
    assert not list(tmp_path.glob("t.model*")) and not out.exists()


def test_negative_or_zero_weights_are_config_errors():
    from launcher.config import ConfigError, build_run_config

    for sources, fragment in (("[{path: a, weight: -1}]", "data.sources[0].weight must be >= 0"),
                              ("[{path: a, weight: 0}, {path: b, weight: 0}]", "all zero")):
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            build_run_config(preset="tiny", overrides=[f"data.sources={sources}"])


@pytest.mark.slow
def test_local_files_to_shards_to_training(tmp_path, tokenizer):
    """.txt and .parquet preprocessed by the tool, a raw .jsonl prepared on first use, trained as one mixture."""
    texts = write_txt_folder(tmp_path / "texts", make_documents(120, seed=31))
    table = write_parquet(tmp_path / "t.parquet", make_documents(120, seed=32))
    raw = write_jsonl(tmp_path / "raw.jsonl", make_documents(120, seed=33))
    for name, path in (("texts", texts), ("table", table)):
        result = run_tool("preprocess_data.py", "--input", path, "--tokenizer", tokenizer, "--output",
                          tmp_path / "shards" / name, "--workers", 2, "--val_fraction", 0.1)
        assert result.returncode == 0, result.stderr
        assert "training tokens" in result.stdout
    sources = (f"[{{path: '{tmp_path / 'shards' / 'texts'}', weight: 2}}, "
               f"{{path: '{tmp_path / 'shards' / 'table'}', weight: 1}}, {{path: '{raw}', weight: 1}}]")
    settings = [*SMALL_MODEL, "model.vocab_size=512", "training.batch_size=2", "training.gradient_accumulation_steps=1",
                "training.max_steps=2", "training.eval_interval=2", "training.eval_batches=2",
                "training.save_interval=2", "training.warmup_steps=1", "training.sample_tokens=4",
                f"data.cache_dir={tmp_path / 'cache'}", f"data.sources={sources}", f"data.tokenizer={tokenizer}",
                f"training.checkpoint_dir={tmp_path / 'ckpt'}", f"training.output_dir={tmp_path / 'out'}"]
    result = run_cli(["--preset", "tiny", *[a for s in settings for a in ("--set", s)]], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "finished 2 steps" in result.stdout
    assert "texts" in result.stdout and "table" in result.stdout and "raw" in result.stdout  # per-source losses
    assert list((tmp_path / "cache" / "sources").glob("raw-*/meta.json"))  # the raw file was prepared once


def test_bench_data_compares_equal_work(data_cache):
    """tools/bench/data_pipeline.py runs end to end, and its rates compare the same work: the pipeline wrote as many tokens as
    SentencePiece itself makes for those documents (one eos each), counted here with sentencepiece directly."""
    import sentencepiece as spm

    from data.corpora.embedded import load_shakespeare

    result = run_tool("bench/data_pipeline.py", "--repeat", 1, "--documents", 120, "--workers", 1, 2, "--rounds", 2,
                      "--cache_dir", data_cache, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    [model] = data_cache.glob("*/tokenizer.model")
    processor = spm.SentencePieceProcessor(model_file=str(model))
    expected = sum(len(processor.encode(doc)) + 1 for doc in load_shakespeare(data_cache)[:120])
    assert f"tokens: raw encode {expected:,}, pipeline {expected:,} (1 worker(s)), {expected:,} (2 worker(s))" \
        in result.stdout
    for label in ("per worker", "scaling 1 -> 2 workers", "loader / training"):
        assert label in result.stdout


def test_bench_data_refuses_counts_below_one():
    result = run_tool("bench/data_pipeline.py", "--rounds", 0)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "argument --rounds: must be >= 1, got 0" in result.stderr

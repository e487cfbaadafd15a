"""tools/benchmark.py: offline fetching fails at once; comparing our checkpoint with a tiny random transformers
model (built and saved here, never downloaded) on local texts, its bits per byte checked against transformers' own
loss."""
from __future__ import annotations

import json
import math
import time

import pytest
import torch

from data.corpora.eval_sets import hub_reachable
from tools import benchmark

transformers = pytest.importorskip("transformers")
TEXTS = ["Shall I compare thee to a summer's day?", "Thou art more lovely and more temperate: naïve ☕."]


@pytest.mark.parametrize("flag", ["--datasets-only", "--models-only"])
def test_fetching_offline_fails_at_once_with_a_clear_message(monkeypatch, capsys, flag):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    assert benchmark.main([flag]) == 2
    assert time.perf_counter() - started < 5  # no retries: datasets alone would take ~23 s (docs/machine_notes.md)
    err = capsys.readouterr().err
    assert f"error: {flag} needs the Hugging Face hub" in err and "HF_HUB_OFFLINE is set" in err


def test_an_unreachable_endpoint_is_detected(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:1")
    reachable, why = hub_reachable(timeout_s=2)
    assert not reachable and "127.0.0.1:443" in why


@pytest.fixture
def tiny_transformers_model(tmp_path):
    """A random GPT-2 with a byte-level BPE trained on TEXTS, saved as a transformers folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(hf_tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                                     eos_token_id=hf_tokenizer.eos_token_id, bos_token_id=hf_tokenizer.eos_token_id)
    model = transformers.GPT2LMHeadModel(config).eval()
    folder = tmp_path / "tiny-gpt2"
    model.save_pretrained(folder)
    hf_tokenizer.save_pretrained(folder)
    return folder, model, hf_tokenizer


def test_compare_our_checkpoint_and_a_transformers_model_in_bits_per_byte(trained_run, tiny_transformers_model,
                                                                           tmp_path, capsys):
    root, result = trained_run
    folder, model, hf_tokenizer = tiny_transformers_model
    files = []
    for i, text in enumerate(TEXTS):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(text, encoding="utf-8")
    code = benchmark.main(["--checkpoint", str(result.final_model_path), "--baseline", str(folder),
                           *[f"--text_file={f}" for f in files], "--output_dir", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr()
    report = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    num_bytes = sum(len(t.encode("utf-8")) for t in TEXTS)
    assert report["num_bytes"] == num_bytes
    ours, theirs = report["scores"][str(result.final_model_path)], report["scores"]["tiny-gpt2"]
    # The oracle: transformers' own mean loss over the stream [eos] doc1 [eos] doc2 [eos].
    eos = hf_tokenizer.eos_token_id
    stream = [eos]
    for text in TEXTS:
        stream += hf_tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
    ids = torch.tensor([stream])
    with torch.no_grad():
        total_nats = model(ids, labels=ids).loss.item() * (len(stream) - 1)
    assert theirs["num_tokens"] == len(stream) - 1
    assert theirs["bits_per_byte"] == pytest.approx(total_nats / math.log(2) / num_bytes, rel=1e-5)
    assert ours["num_bytes"] == num_bytes and ours["bits_per_byte"] > 0
    out = capsys.readouterr().out
    assert "tiny-gpt2" in out and "bits/byte" in out

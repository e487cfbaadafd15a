"""The Hugging Face export agrees with what the run trained on: its tokenizer gives SentencePiece's ids for any
text, and tools/evaluate.py takes it as this project's model (not as "a model of another tokenizer").

Oracles: the run's SentencePiece model itself, and the DeepSpeed checkpoint the export was made from.
"""
from __future__ import annotations

import pytest
import torch

from engine.checkpoint import hugging_face as hf_export
from engine.checkpoint.loading import load_trained_model
from tests.engine import export_layouts

# Whitespace SentencePiece keeps (identity normalization, no whitespace folding) and scripts outside Latin.
TEXTS = [" x", "x", "  two leading", "trailing  ", "a   b", " ", "   ", "\tindented\twith tabs", "new\nline\n\n",
         "\n leading newline", "Ünïcödé ñ", "日本語のテキスト", "Привет, мир", "مرحبا بالعالم", "😀 emoji", "", "x y z "]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, data_cache, process_group):
    out = tmp_path_factory.mktemp("hf_fidelity")
    folder = export_layouts.train_layout(str(data_cache), out, "transformer-0-fp32")
    return folder, hf_export.write_hf_folder(folder / "ckpt", out / "hf")


def test_exported_tokenizer_gives_sentencepieces_ids(exported):
    transformers = pytest.importorskip("transformers")
    import sentencepiece

    folder, hf_dir = exported
    run_config = load_trained_model(folder / "ckpt").run_config
    sp = sentencepiece.SentencePieceProcessor(model_file=str(hf_export.default_tokenizer_path(run_config)))
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == sp.encode(text), repr(text)
        assert tokenizer.decode(ids) == sp.decode(ids) == text, repr(text)
    assert tokenizer(" x")["input_ids"] == [2, *sp.encode(" x")]  # eos first, as training saw a document start


def test_evaluate_takes_the_projects_own_export(exported):
    folder, hf_dir = exported
    from_export, from_checkpoint = load_trained_model(hf_dir), load_trained_model(folder / "ckpt")
    assert from_export.model_config == from_checkpoint.model_config  # not None: "another tokenizer" before
    assert from_export.run_config["data"] == from_checkpoint.run_config["data"]
    ids = torch.randint(0, from_export.model_config.vocab_size, (1, 32))
    with torch.no_grad():
        torch.testing.assert_close(from_export.model(ids)[0], from_checkpoint.model(ids)[0])

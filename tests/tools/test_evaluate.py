"""tools/evaluate.py and engine/checkpoint/loading.py on one run trained here (ZeRO-2, so the DeepSpeed folder holds
partitioned optimizer state that DeepSpeed's zero_to_fp32 must consolidate)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from data.corpora.eval_sets import write_eval_set
from engine.errors import CheckpointError
from engine.checkpoint.loading import load_trained_model
from tools import evaluate as evaluate_tool


def test_every_checkpoint_form_loads_the_same_weights(trained_run):
    root, result = trained_run
    pt = load_trained_model(result.final_model_path)
    deepspeed_root = load_trained_model(root / "ckpt")  # the `latest` tag: step 4, the final weights
    deepspeed_tag = load_trained_model(root / "ckpt" / "checkpoint_step_4")
    assert (pt.kind, deepspeed_root.kind) == ("pt", "deepspeed") and deepspeed_root.extra["step"] == 4
    expected = pt.model.state_dict()
    for loaded in (deepspeed_root, deepspeed_tag):
        assert loaded.model_config == pt.model_config
        for name, tensor in loaded.model.state_dict().items():
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)
    from safetensors.torch import save_file

    from engine.checkpoint.export import write_safetensors

    exported = root / "exported"
    exported.mkdir()
    save_file({k: v.contiguous() for k, v in expected.items() if k != "lm_head.weight"},
              str(exported / "model.safetensors"))
    (exported / "config.json").write_text(json.dumps(pt.model_config.model_dump()))
    from_folder = load_trained_model(exported)
    # What tools/convert_checkpoint.py writes: sharded safetensors (forced here by a tiny shard limit) and
    # model_config.json.
    converted = write_safetensors(root / "ckpt", root / "converted", max_shard_bytes=300_000)
    assert (converted / "model.safetensors.index.json").is_file()
    from_converted = load_trained_model(converted)
    for loaded in (from_folder, from_converted):
        assert loaded.kind == "safetensors"
        for name, tensor in loaded.model.state_dict().items():
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_trained_model(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_trained_model(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="neither a DeepSpeed checkpoint folder"):
        load_trained_model(tmp_path)


def test_the_tool_scores_samples_and_writes_the_report(trained_run, data_cache, tmp_path, capsys):
    root, result = trained_run
    texts = ["It was the best of times, it was the worst of times.", "A second article, short."]
    write_eval_set("wikitext103_test", texts, data_cache)
    write_eval_set("lambada_test", ["the cat sat on the mat and the cat", "one two three four"], data_cache)
    try:
        code = evaluate_tool.main(["--checkpoint_dir", str(root / "ckpt"), "--output_dir", str(tmp_path),
                                   "--max_new_tokens", "12", "--prompt", "ROMEO:", "--max_tokens", "5000"])
    finally:
        for name in ("wikitext103_test", "lambada_test"):
            (data_cache / "eval_sets" / f"{name}.jsonl").unlink()
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((tmp_path / "eval_best_model.json").read_text())
    assert report["kind"] == "pt" and report["checkpoint"].endswith("best_model.pt")
    val = report["scores"]["validation"]
    # Independent of the trainer's own validation windows, the same stream must give about the same loss.
    assert val["nll_per_token"] == pytest.approx(result.best_val_loss, abs=0.25)
    assert val["perplexity"] == pytest.approx(math.exp(val["nll_per_token"]))
    assert 0 < val["bits_per_byte"] < 8 * val["nll_per_token"] / math.log(2)
    assert report["scores"]["wikitext103_test"]["num_bytes"] == sum(len(t.encode()) for t in texts)
    assert report["lambada"]["num_examples"] == 2
    [sample] = report["samples"]
    assert sample["text"].startswith("ROMEO:") and report["sampling"]["decoding"] == "KV cache"
    assert report["loss_points"]["train/loss"] >= 1 and report["loss_points"]["val/loss"] == 2
    png = tmp_path / "eval_best_model_loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "eval_best_model.md").read_text()
    assert "| validation |" in md and "eval_best_model_loss.png" in md and "ROMEO:" in md


def test_the_tool_refuses_a_missing_checkpoint_with_exit_2(tmp_path, capsys):
    assert evaluate_tool.main(["--checkpoint_dir", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err

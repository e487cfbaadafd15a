"""Checkpoint conversion (engine/checkpoint/export.py, engine/checkpoint/hugging_face.py, tools/convert_checkpoint.py) against independent
oracles: the live fp32 master weights of the engine that saved the checkpoint (bit-exact), transformers' own
LlamaForCausalLM / Mamba2ForCausalLM / MambaForCausalLM (same logits), and the SentencePiece model (same ids).
ZeRO 0, 2, 3 x fp32, bf16 x both families at world size 1 in-process; a few layouts at world size 2 (slow)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from data.output import staged_output
from engine.checkpoint import export, hugging_face as hf_export
from model import ModelConfig, create_model
from tests.conftest import REPO_ROOT, run_job, run_two_ranks
from tests.engine import export_layouts
from tools import convert_checkpoint

# Every stage and precision once, families alternating; Mamba-1 once (the HF round trip needs it).
LAYOUTS_WS1 = ["transformer-0-fp32", "mamba2-0-bf16", "mamba2-2-fp32", "transformer-2-bf16", "transformer-3-fp32",
               "mamba2-3-bf16", "mamba1-2-fp32", "hybrid-0-fp32", "hybrid-2-bf16", "hybrid-3-fp32"]
LAYOUTS_WS2 = ["transformer-0-bf16", "mamba2-2-fp32", "transformer-3-bf16", "mamba2-3-fp32", "hybrid-3-bf16"]


@pytest.fixture(scope="session")
def trained_ws1(tmp_path_factory, data_cache, process_group) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("export_ws1")
    return {layout: export_layouts.train_layout(str(data_cache), out, layout) for layout in LAYOUTS_WS1}


@pytest.fixture(scope="session")
def trained_ws2(tmp_path_factory, data_cache) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("export_ws2")
    run_two_ranks(export_layouts.__file__, str(data_cache), str(out), *LAYOUTS_WS2, cwd=out, timeout=400)
    return {layout: out / f"{layout}-ws2" for layout in LAYOUTS_WS2}


def assert_equal_to_live(state: dict[str, torch.Tensor], folder: Path) -> None:
    live = torch.load(folder / "live.pt", weights_only=True)
    assert state.keys() == live.keys()
    for name, tensor in live.items():
        assert state[name].dtype == torch.float32, name
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)  # the masters, bit for bit


def load_with_readme_snippet(path: Path) -> torch.nn.Module:
    checkpoint = torch.load(path, weights_only=True)
    model_config = ModelConfig(**checkpoint['config'])
    model = create_model(model_config.model_type, model_config)
    model.load_state_dict(checkpoint['model_state_dict'])
    return model.eval()


def check_pt_and_safetensors(folder: Path, tmp_path: Path) -> None:
    out = export.write_plain_pt(folder / "ckpt", tmp_path / "model.pt")
    model = load_with_readme_snippet(out)
    state = torch.load(out, weights_only=True)["model_state_dict"]
    assert_equal_to_live(state, folder)
    if folder.name.split("-")[2] == "bf16":  # fp32 masters carry bits that bf16 copies of them would have lost
        assert any(not torch.equal(w, w.bfloat16().float()) for w in state.values())
    st_dir = export.write_safetensors(folder / "ckpt", tmp_path / "st", max_shard_bytes=200_000)
    assert (st_dir / "model.safetensors.index.json").is_file()  # 2+ MB of weights over 200 kB shards
    index = json.loads((st_dir / "model.safetensors.index.json").read_text())
    assert {st_dir / f for f in index["weight_map"].values()} == set(st_dir.glob("model-*.safetensors"))
    reloaded = export.load_safetensors_model(st_dir)
    assert_equal_to_live(reloaded.state_dict(), folder)
    assert reloaded.config == model.config
    assert not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize("layout", LAYOUTS_WS1)
def test_world_size_1_converts_to_the_live_master_weights(trained_ws1, layout, tmp_path):
    check_pt_and_safetensors(trained_ws1[layout], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS_WS2)
def test_world_size_2_converts_to_the_live_master_weights(trained_ws2, layout, tmp_path):
    check_pt_and_safetensors(trained_ws2[layout], tmp_path)


@pytest.mark.parametrize("layout, hf_class", [("transformer-3-fp32", "LlamaForCausalLM"),
                                              ("mamba2-2-fp32", "Mamba2ForCausalLM"),
                                              ("mamba1-2-fp32", "MambaForCausalLM"),
                                              ("hybrid-3-fp32", "BambaForCausalLM")])
def test_hf_round_trip(trained_ws1, layout, hf_class, tmp_path, data_cache, native_linear):
    transformers = pytest.importorskip("transformers")
    folder = trained_ws1[layout]
    hf_dir = hf_export.write_hf_folder(folder / "ckpt", tmp_path / "hf", max_shard_bytes=300_000)
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= {p.name for p in hf_dir.iterdir()}

    ours = load_with_readme_snippet(export.write_plain_pt(folder / "ckpt", tmp_path / "ours.pt"))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(hf_model).__name__ == hf_class
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = "ROMEO: But soft, what light through yonder window breaks?"
    sp = export_tokenizer_ids(folder, text)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == [2] + sp  # eos (a document start, as in training), then SentencePiece's pieces
    with torch.no_grad():
        theirs = hf_model(ids).logits
        mine, _ = ours(ids)
    torch.testing.assert_close(theirs, mine, rtol=1e-4, atol=1e-4)

    back = hf_export.import_hf_folder(hf_dir, tmp_path / "back.pt")
    imported = torch.load(back, weights_only=True)
    got = ModelConfig(**imported["config"])
    # The same architecture: an explicit SwiGLU width equal to the derived one; Mamba's config.json has no
    # context length (a training setting there), Llama's max_position_embeddings carries it.
    assert got.ffn_dim == ours.config.ffn_dim
    exclude = {"ffn_hidden"} | ({"max_seq_len"} if got.model_type == "mamba" else set()) | \
        ({"chunk_size"} if got.ssm_type == "mamba1" and got.model_type == "mamba" else set()) | \
        ({"layer_pattern"} if got.model_type == "hybrid" else set())  # Bamba lists the attention layers' indices
    if got.model_type == "hybrid":
        assert got.layer_pattern == [1] and ours.config.layer_pattern == "MA"
    assert got.model_dump(exclude=exclude) == ours.config.model_dump(exclude=exclude)
    assert_equal_to_live(imported["model_state_dict"], folder)


def export_tokenizer_ids(folder: Path, text: str) -> list[int]:
    import sentencepiece

    run_config = json.loads((folder / "ckpt" / "checkpoint_step_3" / "run_config.json").read_text())
    return sentencepiece.SentencePieceProcessor(
        model_file=str(hf_export.default_tokenizer_path(run_config))).encode(text)


@pytest.mark.parametrize("kind", ["llama", "mamba2", "mamba", "bamba"])
def test_import_of_a_model_built_by_transformers(kind, tmp_path, native_linear):
    """A transformers model made in the test (never downloaded) imports into our .pt with the same logits."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2)
    if kind == "llama":
        hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **common, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, rope_theta=500000.0, tie_word_embeddings=False))
    elif kind == "mamba2":
        hf_model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
            **common, num_heads=4, head_dim=32, n_groups=1, state_size=16, chunk_size=16, tie_word_embeddings=True))
    elif kind == "bamba":  # rotary over the whole head, as this project's attention (BambaConfig's default: half)
        hf_model = transformers.BambaForCausalLM(transformers.BambaConfig(
            **common, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[1],
            mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16, mamba_chunk_size=16, max_position_embeddings=128,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}))
    else:
        hf_model = transformers.MambaForCausalLM(transformers.MambaConfig(**common, state_size=8))
    hf_model.save_pretrained(tmp_path / "hf")
    assert convert_checkpoint.main(["--from_hf", str(tmp_path / "hf"), "--output", str(tmp_path / "m.pt")]) == 0
    ours = load_with_readme_snippet(tmp_path / "m.pt")
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], hf_model.eval()(ids).logits, rtol=1e-4, atol=1e-4)


def test_bad_input_is_one_clear_error_and_writes_nothing(trained_ws1, tmp_path, capsys):
    ckpt = trained_ws1["transformer-0-fp32"] / "ckpt"
    other_project = tmp_path / "other"
    other_project.mkdir()
    torch.save({"module": {}}, other_project / "mp_rank_00_model_states.pt")  # DeepSpeed's, but not ours
    (tmp_path / "empty").mkdir()
    unsupported = tmp_path / "gpt2"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    biased = tmp_path / "biased"
    biased.mkdir()
    (biased / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "attention_bias": True}))
    cases = {
        "does not exist": [str(tmp_path / "missing"), "--to", "pt"],
        "holds no checkpoint": [str(tmp_path / "empty"), "--to", "pt"],
        "no checkpoint 'checkpoint_step_99'": [str(ckpt), "--tag", "checkpoint_step_99", "--to", "pt"],
        "has no run_config.json": [str(other_project), "--to", "pt"],
        "model_type is 'gpt2'": ["--from_hf", str(unsupported)],
        "attention_bias=True": ["--from_hf", str(biased)],
    }
    for message, argv in cases.items():
        out = tmp_path / "out.pt"
        assert convert_checkpoint.main([*argv, "--output", str(out)]) == 2, message
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err
        assert not out.exists() and not list(tmp_path.glob(".*partial*")), message


def test_a_failed_write_leaves_nothing_and_keeps_an_earlier_output(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"earlier")
    with pytest.raises(RuntimeError):
        with staged_output(target, overwrite=True) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"earlier" and not list(tmp_path.glob(".*partial*"))


def test_command_line_end_to_end(trained_ws1, tmp_path):
    """The real command in a subprocess: exit 0 and a .pt, then exit 2 with one line for a bad tag."""
    ckpt = trained_ws1["mamba2-3-bf16"] / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    tool = str(REPO_ROOT / "tools" / "convert_checkpoint.py")
    ok = run_job([sys.executable, tool, str(ckpt), "--to", "pt", "--output", str(tmp_path / "m.pt"),
                  "--report_memory"], cwd=tmp_path, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "peak RSS:" in ok.stdout
    assert_equal_to_live(torch.load(tmp_path / "m.pt", weights_only=True)["model_state_dict"], ckpt.parent)
    bad = run_job([sys.executable, tool, str(ckpt), "--tag", "nope", "--to", "pt", "--output", str(tmp_path / "n.pt")],
                  cwd=tmp_path, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


@pytest.mark.parametrize("kind", ["llama", "bamba"])
def test_training_continues_from_an_imported_model(tmp_path, data_cache, process_group, native_linear, kind):
    """--from_hf writes a .pt and a YAML; a ZeRO-3 run from that YAML starts from exactly the imported weights
    and its first loss is the transformers model's own loss on the same batch."""
    transformers = pytest.importorskip("transformers")
    from engine.checkpoint.manager import gather_fp32_state_dict
    from engine.trainer import Trainer
    from launcher.config import build_run_config
    from launcher.ds_config import build_ds_config
    from launcher.planning.plan import choose_plan

    torch.manual_seed(0)
    common = dict(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True)
    if kind == "llama":
        hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        hf_model = transformers.BambaForCausalLM(transformers.BambaConfig(
            **common, attn_layer_indices=[0], mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16,
            mamba_chunk_size=32, pad_token_id=None,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}))
    hf_model.save_pretrained(tmp_path / "published")
    assert convert_checkpoint.main(["--from_hf", str(tmp_path / "published"), "--output",
                                    str(tmp_path / "imported.pt")]) == 0
    run = build_run_config(config_path=str(tmp_path / "imported.yaml"), overrides=[
        "training.zero_stage=3", "training.batch_size=2", "training.gradient_accumulation_steps=1",
        "training.max_steps=1", "training.warmup_steps=1", f"training.checkpoint_dir={tmp_path / 'ckpt'}",
        f"training.output_dir={tmp_path / 'out'}", f"data.cache_dir={data_cache}"])
    plan = choose_plan(run.model, run.training, 1)
    trainer = Trainer(model_config=run.model, training=run.training.model_copy(update={"zero_stage": 3}),
                      data=run.data, ds_config=build_ds_config(run, plan), run_record={})
    trainer.setup()
    imported = torch.load(tmp_path / "imported.pt", weights_only=True)["model_state_dict"]
    started = gather_fp32_state_dict(trainer.engine.module, trainer.engine.optimizer)
    assert started.keys() == imported.keys()
    for name, tensor in imported.items():
        torch.testing.assert_close(started[name], tensor, rtol=0, atol=0, msg=name)
    from data import sample_indices

    batch = trainer.train_windows.batch(sample_indices(step=0, micro_step=0, rank=0, world_size=1, micro_batch=2,
                                                       grad_accum=1))
    with torch.no_grad():
        logits = hf_model.eval()(batch[:, :-1]).logits  # (B, T, V)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 8192), batch[:, 1:].reshape(-1)).item()
    assert trainer.train_step()["loss"] == pytest.approx(expected, rel=1e-4)


def test_universal_by_hand(trained_ws1, capsys):
    """`--to universal` writes DeepSpeed's universal layout inside the checkpoint; ZeRO-0 has none to write."""
    from engine.checkpoint.universal import universal_folder

    ckpt = trained_ws1["mamba2-2-fp32"] / "ckpt"
    assert convert_checkpoint.main([str(ckpt), "--to", "universal"]) == 0
    out = universal_folder(ckpt / "checkpoint_step_3")
    live = torch.load(trained_ws1["mamba2-2-fp32"] / "live.pt", weights_only=True)
    for name in ("backbone.layers.0.mixer.A_log", "backbone.norm_f.weight"):
        saved = torch.load(out / "zero" / name / "fp32.pt", weights_only=False)["param"]
        torch.testing.assert_close(saved, live[name], rtol=0, atol=0)
    assert convert_checkpoint.main([str(trained_ws1["transformer-0-fp32"] / "ckpt"), "--to", "universal"]) == 2
    assert "only ZeRO-1/2/3 checkpoints" in capsys.readouterr().err

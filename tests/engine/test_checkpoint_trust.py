"""The trust boundary, command by command: no code in any checkpoint file ever runs, whatever command reads it and
however deep the file lies (engine/checkpoint/safe_load.py), and no command deletes or replaces what it did not write
(data/output.py).

Oracles: a payload whose unpickling creates a marker file (it exists afterwards if any loader ran it), PyTorch's own
weights-only unpickler, the bytes on disk before and after, and the live fp32 weights of the engine that saved
the checkpoint. One small ZeRO-2 run and one ZeRO-0 run (a few seconds, in-process) host every planted copy.
"""
from __future__ import annotations

import ast
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from engine.checkpoint.manager import CheckpointManager
from engine.checkpoint.commit import MANIFEST
from engine.errors import CheckpointError, UnsafeCheckpointError
from engine.checkpoint.export import load_initial_weights
from engine.checkpoint.safe_load import check_file, check_tree
from model import ModelConfig, create_model
from tests.conftest import REPO_ROOT
from tests.engine import export_layouts
from tools import benchmark, convert_checkpoint, evaluate

# Every command that reads a checkpoint file, and where each is run below.
COMMANDS_THAT_READ_CHECKPOINTS = {
    "resume (CheckpointManager.load_latest, as Trainer.setup calls it)": "test_resume_never_runs_a_payload",
    "resume steered into the universal path by an extra rank file": "test_resume_never_runs_a_payload",
    "resume, init_from and the universal path through launcher/run.py": "test_launcher_exits_2_on_a_payload",
    "convert_checkpoint.py --to pt / safetensors / hf / universal": "test_convert_evaluate_benchmark_refuse",
    "evaluate.py --checkpoint (DeepSpeed folder, .pt, exported folder)": "test_convert_evaluate_benchmark_refuse",
    "benchmark.py --checkpoint": "test_convert_evaluate_benchmark_refuse",
    "training.init_from": "test_init_from_and_from_hf_refuse",
    "convert_checkpoint.py --from_hf with pytorch_model.bin": "test_init_from_and_from_hf_refuse",
}
STEP = export_layouts.STEPS
TAG = f"checkpoint_step_{STEP}"
PARAM = "layers.0.attn.wq.weight"
"""One parameter whose universal files get a payload."""


class Payload:
    """Unpickling this runs `open(marker, 'w')`: what a tampered checkpoint would do with os.system."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path) -> Path:
    """Add a payload to a file DeepSpeed or the trainer wrote, and fix the manifest as a careful attacker would."""
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own fixture's clean file
    state["evil"] = Payload(str(marker))
    torch.save(state, path)
    for folder in path.parents:
        if (folder / MANIFEST).is_file():
            manifest = json.loads((folder / MANIFEST).read_text())
            name = str(path.relative_to(folder))
            if name in manifest["files"]:
                manifest["files"][name] = path.stat().st_size
                (folder / MANIFEST).write_text(json.dumps(manifest))
            break
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache, process_group) -> dict[str, Path]:
    """ZeRO-2 (optimizer partitions in per-rank files, plus its universal copy) and ZeRO-0 bf16 (fp32 masters in
    the model-states file), both with best_model.pt and final_model.pt."""
    out = tmp_path_factory.mktemp("trust")
    runs = {layout: export_layouts.train_layout(str(data_cache), out, layout)
            for layout in ("transformer-2-fp32", "transformer-0-bf16")}
    universal = out / "universal-ws1"
    shutil.copytree(runs["transformer-2-fp32"], universal)
    assert convert_checkpoint.main([str(universal / "ckpt"), "--to", "universal"]) == 0
    return {"zero2": runs["transformer-2-fp32"], "zero0": runs["transformer-0-bf16"], "universal": universal}


def copy_run(trained: dict[str, Path], kind: str, tmp_path: Path) -> Path:
    """A private copy of a trained run's checkpoint dir to plant into."""
    return Path(shutil.copytree(trained[kind] / "ckpt", tmp_path / kind / "ckpt"))


def extra_rank_file(ckpt: Path) -> Path:
    """A second rank's optimizer file: the folder now looks saved by 2 ranks, so a 1-rank resume goes universal."""
    folder = ckpt / TAG
    extra = folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shutil.copy(folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt", extra)
    return extra


def refused(code: int, err: str, planted: Path, marker: Path) -> None:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, (code, err[-2000:])
    assert str(planted) in lines[0] and "refers to code" in lines[0], lines[0]
    assert "Traceback" not in err and not marker.exists()


# Where each kind of file lives (relative to the checkpoint dir), in which run.
PLANTED_FILES = {
    "model states": ("zero2", f"{TAG}/mp_rank_00_model_states.pt"),
    "rank 0 optimizer states": ("zero2", f"{TAG}/zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    "ZeRO-0 model states with fp32 masters": ("zero0", f"{TAG}/mp_rank_00_model_states.pt"),
    "universal fp32.pt": ("universal", f"{TAG}/universal/zero/{PARAM}/fp32.pt"),
    "universal exp_avg.pt": ("universal", f"{TAG}/universal/zero/{PARAM}/exp_avg.pt"),
    "universal optimizer_state.pt": ("universal", f"{TAG}/universal/zero/optimizer_state.pt"),
    "universal model states": ("universal", f"{TAG}/universal/mp_rank_00_model_states.pt"),
    "best_model.pt": ("zero2", "best_model.pt"),
    "final_model.pt": ("zero2", "final_model.pt"),
}


@pytest.fixture(scope="module")
def engine(trained, process_group, tmp_path_factory):
    """A live 1-rank ZeRO-2 engine of the trained model's shape, that resumes are attempted into."""
    from engine.trainer import Trainer
    from launcher.config import build_run_config
    from launcher.ds_config import build_ds_config
    from launcher.planning.plan import choose_plan

    folder = tmp_path_factory.mktemp("engine")
    run_config = json.loads((trained["zero2"] / "ckpt" / TAG / "run_config.json").read_text())
    run = build_run_config(preset="tiny", overrides=[
        *export_layouts.FAMILIES["transformer"][1], "model.max_seq_len=64", "training.zero_stage=2",
        "training.batch_size=2", "training.gradient_accumulation_steps=1", "training.max_steps=1",
        f"training.checkpoint_dir={folder / 'ckpt'}", f"training.output_dir={folder / 'out'}",
        f"data.cache_dir={run_config['data']['cache_dir']}"])
    trainer = Trainer(model_config=run.model, training=run.training.model_copy(update={"zero_stage": 2}),
                      data=run.data, ds_config=build_ds_config(run, choose_plan(run.model, run.training, 1)),
                      run_record={})
    trainer.setup()
    yield trainer.engine
    trainer.engine.destroy()


@pytest.mark.parametrize("what", ["model states", "rank 0 optimizer states", "ZeRO-0 model states with fp32 masters",
                                  "extra rank file", "universal fp32.pt", "universal exp_avg.pt",
                                  "universal optimizer_state.pt", "universal model states"])
def test_resume_never_runs_a_payload(trained, engine, tmp_path, what):
    marker = tmp_path / "pwned"
    kind, relative = PLANTED_FILES.get(what, ("zero2", None))
    ckpt = copy_run(trained, kind, tmp_path)
    if kind == "universal":
        extra_rank_file(ckpt)  # steers the 1-rank resume into the universal path, where the payload lies
    planted = plant(extra_rank_file(ckpt) if relative is None else ckpt / relative, marker)
    before = snapshot(ckpt)
    with pytest.raises(UnsafeCheckpointError) as raised:
        CheckpointManager(ckpt, keep_last=3, run_record={}).load_latest(engine)
    assert str(planted) in str(raised.value) and "\n" not in str(raised.value)
    assert not marker.exists() and snapshot(ckpt) == before
    with pytest.raises(pickle.UnpicklingError):  # the oracle: PyTorch's own weights-only loader refuses it too
        torch.load(planted, weights_only=True)


CONVERSIONS = {"pt": ["--output", "OUT/model.pt"], "safetensors": ["--output", "OUT/st"],
               "hf": ["--output", "OUT/hf"], "universal": []}


@pytest.mark.parametrize("what", ["model states", "rank 0 optimizer states", "extra rank file",
                                  "ZeRO-0 model states with fp32 masters", "universal fp32.pt", "best_model.pt",
                                  "final_model.pt", "exported folder's pytorch_model.bin"])
def test_convert_evaluate_benchmark_refuse(trained, tmp_path, capsys, what):
    marker = tmp_path / "pwned"
    kind, relative = PLANTED_FILES.get(what, ("zero2", None))
    ckpt = copy_run(trained, kind, tmp_path)
    out = tmp_path / "out"
    if what == "extra rank file":
        planted = plant(extra_rank_file(ckpt), marker)
    elif what == "exported folder's pytorch_model.bin":
        assert convert_checkpoint.main([str(ckpt), "--to", "safetensors", "--output", str(tmp_path / "st")]) == 0
        planted = tmp_path / "st" / "pytorch_model.bin"
        torch.save({"evil": Payload(str(marker))}, planted)
    else:
        planted = plant(ckpt / relative, marker)
    capsys.readouterr()
    if planted.name.endswith("_model.pt"):  # best/final .pt: read by evaluate, benchmark (and init_from, below)
        runs = {"evaluate": lambda: evaluate.main(["--checkpoint", str(planted), "--output_dir", str(out)]),
                "benchmark": lambda: benchmark.main(["--checkpoint", str(planted), "--output_dir", str(out)])}
    elif planted.name == "pytorch_model.bin":
        runs = {"evaluate": lambda: evaluate.main(["--checkpoint", str(planted.parent), "--output_dir", str(out)]),
                "benchmark": lambda: benchmark.main(["--checkpoint", str(planted.parent), "--output_dir", str(out)])}
    else:
        runs = {f"convert --to {to}": lambda to=to, extra=extra: convert_checkpoint.main(
                    [str(ckpt), "--to", to, *[a.replace("OUT", str(out)) for a in extra]])
                for to, extra in CONVERSIONS.items()
                if not (to == "universal" and kind != "zero2")}  # ZeRO-0 has none; an existing one is not re-read
        runs["evaluate"] = lambda: evaluate.main(["--checkpoint", str(ckpt), "--output_dir", str(out)])
        runs["benchmark"] = lambda: benchmark.main(["--checkpoint", str(ckpt), "--output_dir", str(out)])
    before = snapshot(tmp_path / kind)
    for name, run in runs.items():
        code = run()
        refused(code, capsys.readouterr().err, planted, marker)
        assert not out.exists(), name
        assert snapshot(tmp_path / kind) == before, name


def test_init_from_and_from_hf_refuse(trained, tmp_path, capsys):
    marker = tmp_path / "pwned"
    final = plant(copy_run(trained, "zero2", tmp_path) / "final_model.pt", marker)
    config = ModelConfig(**torch.load(trained["zero2"] / "ckpt" / "final_model.pt", weights_only=True)["config"])
    with pytest.raises(UnsafeCheckpointError, match="refers to code"):
        load_initial_weights(create_model(config.model_type, config), final, config)
    assert not marker.exists()

    transformers = pytest.importorskip("transformers")
    hf = tmp_path / "published"
    hf.mkdir()
    hf_config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    hf_config.to_json_file(hf / "config.json")
    weights = transformers.LlamaForCausalLM(hf_config).state_dict()
    torch.save({**weights, "evil": Payload(str(marker))}, hf / "pytorch_model.bin")
    capsys.readouterr()
    code = convert_checkpoint.main(["--from_hf", str(hf), "--output", str(tmp_path / "imported.pt")])
    refused(code, capsys.readouterr().err, hf / "pytorch_model.bin", marker)
    assert not (tmp_path / "imported.pt").exists() and not (tmp_path / "imported.yaml").exists()


def test_a_latest_tag_outside_the_checkpoint_dir_is_refused(trained, tmp_path, capsys):
    ckpt = copy_run(trained, "zero2", tmp_path)
    elsewhere = Path(shutil.copytree(ckpt / TAG, tmp_path / "elsewhere"))
    for tag in ("../elsewhere", str(elsewhere)):
        (ckpt / "latest").write_text(tag)
        assert convert_checkpoint.main([str(ckpt), "--to", "pt", "--output", str(tmp_path / "m.pt")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "not a folder inside" in err and str(ckpt / "latest") in err, err
        assert convert_checkpoint.main([str(ckpt), "--tag", tag, "--to", "pt", "--output",
                                        str(tmp_path / "m.pt")]) == 2
        assert "not a folder inside" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.slow
def test_launcher_exits_2_on_a_payload(trained, tmp_path, data_cache):
    """The real command: a resume steered into the universal path, and training.init_from, each with a payload."""
    from tests.launcher.reliability_runs import clean_env, finish, start

    settings = [*export_layouts.FAMILIES["transformer"][1], "model.max_seq_len=64", "training.zero_stage=2",
                "training.batch_size=2", "training.gradient_accumulation_steps=1", "training.learning_rate=3e-3",
                "training.warmup_steps=1", f"training.max_steps={STEP + 2}", f"training.save_interval={STEP}",
                f"training.eval_interval={STEP}", "training.eval_batches=1", "training.sample_tokens=0",
                f"data.cache_dir={data_cache}"]
    marker = tmp_path / "pwned"
    ckpt = copy_run(trained, "universal", tmp_path)
    extra_rank_file(ckpt)
    planted = plant(ckpt / TAG / "universal" / "zero" / PARAM / "exp_avg_sq.pt", marker)
    final = plant(copy_run(trained, "zero0", tmp_path) / "final_model.pt", marker)
    for extra in ([f"training.checkpoint_dir={ckpt}", "training.resume=true"],
                  [f"training.checkpoint_dir={tmp_path / 'fresh'}", f"training.init_from={final}",
                   "training.zero_stage=0", "training.bf16=true"]):
        args = ["--preset", "tiny", *[a for s in [*settings, *extra] for a in ("--set", s)]]
        before = snapshot(tmp_path / "universal")
        code, out, err = finish(start(args, cwd=tmp_path, env=clean_env()), timeout=300)
        refused(code, err, planted if "training.resume=true" in extra else final, marker)
        assert snapshot(tmp_path / "universal") == before


LOADER_CALLS = {"load_checkpoint", "get_fp32_state_dict_from_zero_checkpoint", "load_state_dict_from_zero_checkpoint",
                "convert_zero_checkpoint_to_fp32_state_dict", "load_universal_checkpoint"}
"""DeepSpeed's functions that unpickle checkpoint files (deepspeed 0.19.8) besides torch.load itself."""


def loader_calls(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        if (owner, name) in {("torch", "load"), ("ds_to_universal", "main"), ("pickle", "load"),
                             ("pickle", "loads")} or name in LOADER_CALLS:
            found.append(f"{owner}.{name}" if owner else name)
        found += [f"{name}(weights_only=False)" for k in node.keywords
                  if k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is False]
    return found


def test_no_module_reads_a_checkpoint_around_the_loader():
    """Every torch.load and DeepSpeed loader call lives in engine/checkpoint/safe_load.py (the benchmark of the
    check itself loads the synthetic files it just wrote, as DeepSpeed would, to time it)."""
    allowed = {"engine/checkpoint/safe_load.py", "tools/bench/safe_load.py"}
    offenders = []
    for package in ("engine", "tools", "launcher", "data", "model", "train.py"):
        root = REPO_ROOT / package
        for path in ([root] if root.is_file() else sorted(root.rglob("*.py"))):
            relative = str(path.relative_to(REPO_ROOT))
            if relative not in allowed:
                offenders += [f"{relative}: {call}" for call in loader_calls(ast.parse(path.read_text("utf-8")))]
    assert not offenders, offenders
    # The search itself finds what it looks for:
    assert loader_calls(ast.parse("torch.load(p, weights_only=False)\nengine.load_checkpoint(d)")) == [
        "torch.load", "load(weights_only=False)", "engine.load_checkpoint"]


def test_clean_deepspeed_files_pass_at_every_depth(trained):
    """The allowlist admits everything DeepSpeed 0.19.8 writes: ZeRO-2 optimizer partitions, ZeRO-0 bf16 masters,
    the universal format's per-parameter and optimizer files, and the trainer's exports."""
    checked = [p for kind in trained for p in check_tree(trained[kind] / "ckpt")]
    names = {p.name for p in checked}
    assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "fp32.pt", "exp_avg.pt",
            "exp_avg_sq.pt", "optimizer_state.pt", "best_model.pt", "final_model.pt"} <= names, names
    assert any("universal" in p.parts for p in checked)


def test_fp16_loss_scaler_states_pass_at_any_depth(tmp_path):
    """What DeepSpeed writes under fp16 (a dynamic loss scaler; this CPU trains no fp16 checkpoint to plant in),
    as a universal-copy file would hold it."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    folder = tmp_path / TAG / "universal" / "zero"
    folder.mkdir(parents=True)
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "dynamic": DynamicLossScaler(
                                             init_scale=2**16, scale_window=1000, min_scale=1, delayed_shift=2,
                                             consecutive_hysteresis=False),
                                         "zero_stage": ZeroStageEnum.gradients,
                                         "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}]}},
               folder / "optimizer_state.pt")
    assert check_tree(tmp_path) == [folder / "optimizer_state.pt"]


def test_damaged_and_disguised_files(tmp_path):
    """A pickle under a name torch.load is not usually pointed at is found by its bytes; a protocol-0 pickle
    (no magic bytes, which torch.load would still unpickle) under a .pt name is refused too; a cut file is damage,
    not a payload."""
    marker = tmp_path / "pwned"
    (tmp_path / "sub").mkdir()
    disguised = tmp_path / "sub" / "notes"
    torch.save({"evil": Payload(str(marker))}, disguised)
    with pytest.raises(UnsafeCheckpointError, match="notes"):
        check_tree(tmp_path)
    disguised.unlink()
    legacy = tmp_path / "sub" / "old.pt"
    legacy.write_bytes(pickle.dumps(Payload(str(marker)), protocol=0))
    with pytest.raises(UnsafeCheckpointError, match=r"old.pt refers to code .*\(io.open\)"):
        check_tree(tmp_path)
    truncated = tmp_path / "cut.pt"
    torch.save({"w": torch.ones(100)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        check_file(truncated)
    assert not marker.exists()


# ---- no command deletes or replaces what it did not write (data/output.py) ------------------------------------------

def convert_targets(tmp_path: Path, ckpt: Path) -> dict[str, Path]:
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("the user's own file")
    return {"the checkpoint dir": ckpt, "a checkpoint_step_N folder": ckpt / TAG,
            "a folder inside a checkpoint": ckpt / TAG / "export", "a folder of user files": user,
            "a folder holding the checkpoint dir": tmp_path / "zero2"}


def test_convert_never_replaces_a_checkpoint_the_input_or_user_files(trained, tmp_path, capsys):
    ckpt = copy_run(trained, "zero2", tmp_path)
    targets = convert_targets(tmp_path, ckpt)
    before = snapshot(tmp_path)
    for name, target in targets.items():
        for to in ("pt", "safetensors", "hf"):
            for extra in ([], ["--overwrite"]):
                code = convert_checkpoint.main([str(ckpt), "--to", to, "--output", str(target), *extra])
                err = capsys.readouterr().err
                assert code == 2 and err.startswith("error: ") and str(target) in err, (name, to, extra, err)
                assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
                assert snapshot(tmp_path) == before, (name, to, extra)
    hf = tmp_path / "published"  # --from_hf: the output may not be (or lie inside) its input either
    shutil.copytree(ckpt / TAG, hf)
    (hf / "config.json").write_text("{}")
    before = snapshot(tmp_path)
    for output in (hf, hf / "model.pt"):
        assert convert_checkpoint.main(["--from_hf", str(hf), "--output", str(output), "--overwrite"]) == 2
        assert "this command's input" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_an_existing_output_needs_overwrite_and_then_gets_the_new_weights(trained, tmp_path, capsys):
    ckpt = trained["zero2"] / "ckpt"
    earlier = tmp_path / "model.pt"
    earlier.write_bytes(b"an earlier model")
    assert convert_checkpoint.main([str(ckpt), "--to", "pt", "--output", str(earlier)]) == 2
    assert "already exists: pass --overwrite" in capsys.readouterr().err and earlier.read_bytes() == b"an earlier model"
    assert convert_checkpoint.main([str(ckpt), "--to", "pt", "--output", str(earlier), "--overwrite"]) == 0
    live = torch.load(trained["zero2"] / "live.pt", weights_only=True)
    written = torch.load(earlier, weights_only=True)["model_state_dict"]
    assert all(torch.equal(written[name], tensor) for name, tensor in live.items())
    st = tmp_path / "st"
    assert convert_checkpoint.main([str(ckpt), "--to", "safetensors", "--output", str(st)]) == 0
    (st / "README.md").write_text("notes the user added")  # now the folder holds a file the command did not write
    before = snapshot(st)
    assert convert_checkpoint.main([str(ckpt), "--to", "safetensors", "--output", str(st), "--overwrite"]) == 2
    assert "README.md" in capsys.readouterr().err and snapshot(st) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "st"]  # no staging copy left behind


def test_reports_and_shard_sets_never_replace_what_they_did_not_write(trained, tmp_path, capsys, data_cache):
    from tools import preprocess_data, train_tokenizer

    ckpt = copy_run(trained, "zero2", tmp_path)
    targets = convert_targets(tmp_path, ckpt)
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "eval_final_model.json").write_text("an earlier report")
    (reports / "benchmark.json").write_text("an earlier benchmark")
    (reports / "tokenizer.model").write_text("an earlier tokenizer")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a few words of text\n" * 50)
    tokenizer = next(Path(data_cache).rglob("tokenizer.model"))
    before = snapshot(tmp_path)
    runs = {"evaluate into a checkpoint": lambda: evaluate.main(["--checkpoint", str(ckpt / "final_model.pt"),
                                                                  "--output_dir", str(ckpt), "--overwrite"]),
            "evaluate over an earlier report": lambda: evaluate.main(["--checkpoint", str(ckpt / "final_model.pt"),
                                                                       "--output_dir", str(reports)]),
            "benchmark into a checkpoint": lambda: benchmark.main(["--checkpoint", str(ckpt / "final_model.pt"),
                                                                    "--output_dir", str(ckpt / TAG), "--overwrite"]),
            "benchmark over an earlier one": lambda: benchmark.main(["--checkpoint", str(ckpt / "final_model.pt"),
                                                                     "--output_dir", str(reports)])}
    for name, target in targets.items():
        for extra in ([], ["--overwrite"]):
            runs[f"preprocess into {name} {extra}"] = lambda target=target, extra=extra: preprocess_data.main(
                ["--input", str(corpus), "--tokenizer", str(tokenizer), "--output", str(target), *extra])
    runs["train_tokenizer over an earlier one"] = lambda: train_tokenizer.main(
        ["--from_model", str(tokenizer), "--output", str(reports / "tokenizer.model")])
    runs["train_tokenizer into a checkpoint"] = lambda: train_tokenizer.main(
        ["--from_model", str(tokenizer), "--output", str(ckpt / "tokenizer.model"), "--overwrite"])
    runs["preprocess into its own input"] = lambda: preprocess_data.main(
        ["--input", str(corpus), "--tokenizer", str(tokenizer), "--output", str(tmp_path), "--overwrite"])
    for name, run in runs.items():
        code = run()
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, (name, err[-1500:])
        assert snapshot(tmp_path) == before, name

"""Every user-supplied value is checked where it enters: each family of bad input ends in exactly one `error: ...`
line naming the key or file, exit code 2, no traceback, and every file that was there before byte-identical.

One parametrized table per command family. The oracle for each case is the command's own exit code and stderr
against the rule above, plus a snapshot of the working folder taken before the command ran.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest

from engine.config import parse_duration
from tests.conftest import REPO_ROOT, run_job
from tests.launcher.reliability_runs import clean_env, run_args, snapshot

TOKENIZER = "shakespeare-v8192-s1234-f0.05/tokenizer.model"


def run_tool(tool: str, args: list[str], *, cwd, timeout: float = 240):
    """`python <tool> args` in cwd, a real process; returns (exit code, stdout, stderr)."""
    result = run_job([sys.executable, str(REPO_ROOT / tool), *args], cwd=cwd,
                     env={**clean_env(), "PYTHONPATH": str(REPO_ROOT)}, timeout=timeout)
    return result.returncode, result.stdout, result.stderr


def check_one_error(code: int, err: str, expected: list[str]) -> str:
    assert code == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-3000:]
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


@contextlib.contextmanager
def unchanged(folder: Path, must_not_exist=()):
    """Every file in `folder` before the block is byte-identical after it; `must_not_exist` never appears."""
    before = snapshot(folder)
    yield
    after = snapshot(folder)
    assert {name: after.get(name) for name in before} == before
    for name in must_not_exist:
        assert not (folder / name).exists(), name


def tool_main(tool: str):
    return importlib.import_module(f"tools.{tool}").main


@pytest.fixture
def workdir(tmp_path, data_cache, monkeypatch):
    """The working folder (the current one): a text file, an empty file, a folder that looks like a Hugging Face
    model with a text "safetensors" file, and a copy of the prepared data cache."""
    (tmp_path / "notes.txt").write_text("hello world\n")
    (tmp_path / "empty.txt").write_text("")
    hf = tmp_path / "hf_model"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 8192, "max_position_embeddings": 64}))
    (hf / "model.safetensors").write_text("not weights")
    shutil.copytree(data_cache, tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# (name, tool, args, texts the error line must hold, outputs that must not appear)
TOOL_CASES = [
    ("tokenizer is a text file (preprocess)", "preprocess_data",
     ["--input", "notes.txt", "--tokenizer", "notes.txt", "--output", "shards"],
     ["notes.txt is not a SentencePiece model"], ["shards"]),
    ("--from_hf safetensors is text", "convert_checkpoint", ["--from_hf", "hf_model", "--output", "imported.pt"],
     ["hf_model/model.safetensors is not a safetensors file"], ["imported.pt", "imported.yaml"]),
    ("--text_file missing", "benchmark", ["--checkpoint", "nope.pt", "--text_file", "missing.txt"],
     ["--text_file missing.txt", "does not exist"], ["test_results"]),
    ("--text_file empty", "benchmark", ["--checkpoint", "nope.pt", "--text_file", "empty.txt"],
     ["--text_file empty.txt is empty"], ["test_results"]),
    ("--tokens_per_param nan", "list_datasets", ["--recommend", "125M", "--tokens_per_param", "nan"],
     ["--tokens_per_param must be a positive finite number, got nan"], []),
    ("model size inf", "list_datasets", ["--recommend", "infB"], ["model size", "finite"], []),
    ("vocabulary too small for the corpus", "train_tokenizer",
     ["--input", "notes.txt", "--output", "tok.model", "--vocab_size", "100"],
     ["--vocab_size 100 is too small for notes.txt", "at least 267"], ["tok.model"]),
    ("vocabulary too large for the corpus", "train_tokenizer",
     ["--input", "notes.txt", "--output", "tok.model", "--vocab_size", "8192"],
     ["--vocab_size 8192 is too large for notes.txt", "at most 287"], ["tok.model"]),
]


@pytest.mark.parametrize("name, tool, args, expected, absent", TOOL_CASES, ids=[c[0] for c in TOOL_CASES])
def test_tools_refuse_bad_values(workdir, capsys, name, tool, args, expected, absent):
    with unchanged(workdir, absent):
        code = tool_main(tool)(args)
    check_one_error(code, capsys.readouterr().err, expected)


def small_run(*overrides: str) -> list[str]:
    """launcher/run.py arguments of a 2-step run of the small model on ./cache."""
    return run_args(Path("cache"), *overrides, max_steps=2)


# Refused while the config is read, before anything starts.
CONFIG_CASES = [
    ("learning rate nan", ["training.learning_rate=nan"], ["training.learning_rate", "finite number"]),
    ("mixture weight .inf", ["data.sources=[{path: a, weight: .inf}]"], ["data.sources.0.weight", "finite"]),
    ("max_runtime .inf", ["training.max_runtime=.inf"], ["training.max_runtime must be a finite number"]),
    ("max_runtime 1:99:99", ["training.max_runtime=1:99:99"], ["'1:99:99': minutes must be 0-59, got 99"]),
    ("max_runtime 1-24", ["training.max_runtime=1-24"], ["'1-24': hours must be 0-23, got 24"]),
]


@pytest.mark.parametrize("name, overrides, expected", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_values_are_checked_where_they_enter(workdir, capsys, name, overrides, expected):
    from launcher.run import main

    with unchanged(workdir, ["checkpoints", "ds_configs"]):
        code = main([*small_run(*overrides), "--dry_run"])
    check_one_error(code, capsys.readouterr().err, expected)


# Refused when the training run reaches them: data preparation, the tokenizer, the initial weights.
RUN_CASES = [
    ("data.tokenizer is a text file", ["data.sources=[{path: notes.txt}]", "data.tokenizer=notes.txt"],
     ["data.tokenizer: notes.txt is not a SentencePiece model"]),
    ("init_from is a text file", ["training.init_from=notes.txt"],
     ["training.init_from: notes.txt is not a PyTorch .pt file"]),
    ("catalog dataset not downloaded", ["data.dataset=wikitext"],
     ["data.dataset 'wikitext' is the Hub dataset Salesforce/wikitext",
      "python tools/list_datasets.py --download wikitext-103 --tokenizer", "/shards/wikitext-103`"]),
    ("vocabulary too small for the corpus", ["model.vocab_size=200"],
     ["model.vocab_size 200 is too small for the shakespeare corpus", "at least 321"]),
]


def trainer_of(argv: list[str]):
    """The Trainer launcher/run.py would build for `argv` on one rank (without starting a process)."""
    from engine.trainer import Trainer
    from launcher.config import build_run_config
    from launcher.ds_config import build_ds_config
    from launcher.planning.plan import choose_plan

    overrides = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--set"]
    run = build_run_config(preset="tiny", overrides=overrides)
    plan = choose_plan(run.model, run.training, 1)
    training = run.training.model_copy(update={"batch_size": plan.micro_batch, "zero_stage": plan.zero_stage,
                                               "gradient_accumulation_steps": plan.grad_accum})
    return Trainer(model_config=run.model, training=training, data=run.data, ds_config=build_ds_config(run, plan),
                   run_record={})


@pytest.mark.parametrize("name, overrides, expected", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_training_run_refuses_bad_values(workdir, capsys, process_group, name, overrides, expected):
    """In-process, through the launcher's own error reporting (report_errors: the line and the exit code)."""
    from launcher.exit_codes import report_errors

    with unchanged(workdir / "cache"), report_errors(debug=False) as outcome:
        trainer_of(small_run(*overrides)).setup()
        outcome.code = 0
    check_one_error(outcome.code, capsys.readouterr().err, expected)


@pytest.mark.slow
def test_a_bad_value_from_the_real_command(workdir):
    """The same refusal as a real process: launcher/run.py exits 2 with one line."""
    with unchanged(workdir):
        code, out, err = run_tool("launcher/run.py", small_run("training.init_from=notes.txt"), cwd=workdir)
    check_one_error(code, "\n".join(line for line in err.splitlines() if not line.startswith("[")),
                    ["training.init_from: notes.txt is not a PyTorch .pt file"])


def test_catalog_dataset_uses_its_downloaded_shards(workdir, capsys):
    """With a shard set where the error message said to put it, `data.dataset: wikitext` opens it for training."""
    from data import DataConfig
    from data.training_data import open_training_data

    documents = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * 40 for i in range(40)]
    (workdir / "wiki.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    assert tool_main("preprocess_data")(["--input", "wiki.jsonl", "--tokenizer", f"cache/{TOKENIZER}", "--output",
                                         "cache/shards/wikitext-103", "--val_fraction", "0.2"]) == 0
    data = open_training_data(DataConfig(dataset="wikitext", cache_dir="cache"), vocab_size=8192, seq_len=64, seed=0)
    assert [s.name for s in data.sources] == ["wikitext-103"] and len(data.sources[0].train) > 0
    first = data.sources[0].train.batch([0])[0].tolist()  # the oracle: SentencePiece's own ids of those documents
    import sentencepiece

    ids = sentencepiece.SentencePieceProcessor(model_file=f"cache/{TOKENIZER}").encode(documents[0])
    assert set(first) <= set(ids) | {2}


@pytest.fixture(scope="module")
def zero1_checkpoint(tmp_path_factory, data_cache, process_group):
    """A bf16 ZeRO-1 checkpoint (in-process): its fp32 master weights live only in the optimizer partition."""
    from tests.engine import export_layouts

    return export_layouts.train_layout(str(data_cache), tmp_path_factory.mktemp("zero1"),
                                       "transformer-1-bf16") / "ckpt"


@pytest.mark.parametrize("manifest", [True, False], ids=["with manifest", "plain DeepSpeed folder"])
def test_converter_refuses_a_checkpoint_missing_a_ranks_optimizer_file(zero1_checkpoint, workdir, capsys,
                                                                         manifest):
    shutil.copytree(zero1_checkpoint, workdir / "ckpt")
    folder = workdir / "ckpt" / "checkpoint_step_3"
    (optimizer_file,) = folder.glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt")
    optimizer_file.unlink()
    if not manifest:
        (folder / "checkpoint_complete.json").unlink()
    for to in ("pt", "universal"):
        with unchanged(workdir, ["out"]):
            code = tool_main("convert_checkpoint")(["ckpt", "--to", to, "--output", "out"])
        check_one_error(code, capsys.readouterr().err, ["ckpt/checkpoint_step_3 is incomplete",
                                                        "zero_pp_rank_0_mp_rank_00_optim_states.pt"])


def test_converter_refuses_a_text_file_as_the_tokenizer(zero1_checkpoint, workdir, capsys):
    with unchanged(workdir, ["hf_out"]):
        code = tool_main("convert_checkpoint")([str(zero1_checkpoint), "--to", "hf", "--output", "hf_out",
                                                "--tokenizer", "notes.txt"])
    check_one_error(code, capsys.readouterr().err, ["--tokenizer: notes.txt is not a SentencePiece model"])


def test_a_tab_in_the_yaml_is_one_line_with_the_fix(workdir, capsys):
    from launcher.run import main

    (workdir / "tabbed.yaml").write_text("model:\n\td_model: 64\n")
    check_one_error(main(["--config", "tabbed.yaml", "--dry_run"]), capsys.readouterr().err,
                    ["tabbed.yaml is not valid YAML: a tab at line 2, column 1", "replace the tab with spaces"])


def wrong_shape_pt(path: Path) -> None:
    """A .pt of this project whose stored config is the small run's, with one weight of another shape."""
    import torch

    from launcher.config import build_run_config
    from model import create_model

    config = build_run_config(preset="tiny", overrides=small_run()[3::2]).model
    state = create_model(config.model_type, config).state_dict()
    state["layers.0.attn.wq.weight"] = torch.zeros(3, 5)
    torch.save({"config": config.model_dump(), "model_state_dict": state}, path)


def test_a_shape_mismatch_is_one_line(workdir, capsys, process_group):
    """torch's load_state_dict error spans a line per mismatch; both ways in say it on one line."""
    from engine.checkpoint.loading import load_trained_model
    from engine.errors import CheckpointError
    from launcher.exit_codes import report_errors

    wrong_shape_pt(workdir / "wrong.pt")
    with pytest.raises(CheckpointError) as raised:
        load_trained_model(workdir / "wrong.pt")
    assert "\n" not in str(raised.value) and "layers.0.attn.wq.weight is (3, 5) in the file" in str(raised.value)
    with report_errors(debug=False) as outcome:
        trainer_of(small_run("training.init_from=wrong.pt")).setup()
        outcome.code = 0
    check_one_error(outcome.code, capsys.readouterr().err,
                    ["training.init_from: wrong.pt does not match its model config", "layers.0.attn.wq.weight"])


def test_a_dry_run_plans_fp16_for_a_gpu_on_a_machine_without_fp16(workdir, capsys, monkeypatch):
    """The original's config.yaml (fp16) planned for a 24 GB GPU on a CPU machine: it trains nothing, so the
    device's precision support is a note there, and an error only for a real run."""
    from deepspeed.accelerator import get_accelerator

    from launcher.run import main

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: False)  # whatever this CPU has
    assert "fp16: true" in (REPO_ROOT / "config.yaml").read_text()
    assert main(["--config", str(REPO_ROOT / "config.yaml"), "--dry_run", "--gpu_memory", "24GB"]) == 0
    err = capsys.readouterr().err
    assert "error:" not in err and "float16 training is not supported" in err, err
    # Without --dry_run the same machine refuses before training (not run here: it would start to train on success).


@pytest.mark.parametrize("warmup, max_steps, warned", [(5, 2, True), (2, 2, True), (1, 2, False)])
def test_a_warmup_as_long_as_the_run_is_warned_about(workdir, capsys, warmup, max_steps, warned):
    """Valid, but the schedule never decays: a warning, and the dry run still succeeds."""
    from engine.schedule import WarmupCosine
    from launcher.run import main

    # The oracle: the schedule itself; it decays when the last step's lr is below the highest one.
    multiplier = WarmupCosine(warmup_steps=warmup, max_steps=max_steps, min_lr_ratio=0.1)
    factors = [multiplier(step) for step in range(max_steps)]  # the lr of steps 1 .. max_steps
    assert (factors[-1] < max(factors)) == (not warned), factors
    assert main([*run_args(Path("cache"), f"training.warmup_steps={warmup}", max_steps=max_steps), "--dry_run"]) == 0
    err = capsys.readouterr().err
    assert ("warning: training.warmup_steps" in err and "never decays" in err) == warned, err


# SLURM's --time forms (sbatch(1)): "minutes:seconds", "hours:minutes:seconds", "days-hours",
# "days-hours:minutes", "days-hours:minutes:seconds"; the seconds below are worked out by hand.
DURATIONS = {"30:00": 30 * 60, "0:59": 59, "2:30:00": 2 * 3600 + 30 * 60, "1-12": 36 * 3600,
             "1-12:30": 36 * 3600 + 30 * 60, "2-00:00:05": 48 * 3600 + 5, "90m": 90 * 60, "23h30m": 23.5 * 3600,
             "3600": 3600, 3600: 3600}


@pytest.mark.parametrize("text", list(DURATIONS), ids=str)
def test_durations_read_as_slurm_does(text):
    assert parse_duration(text) == DURATIONS[text]


@pytest.mark.parametrize("text", ["1:99:99", "1:30:60", "30:60", "1-24", "1-1:60", "1:2:3:4", "-5", "1.5:00",
                                  float("nan"), float("inf")], ids=str)
def test_durations_out_of_range_are_refused(text):
    with pytest.raises(ValueError, match="training.max_runtime"):
        parse_duration(text)


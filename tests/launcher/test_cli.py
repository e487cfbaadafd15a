"""launcher/run.py as a user runs it: listings, bad input, dry run, one process, and two ranks."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launcher.presets import PRESETS
from tests.conftest import REPO_ROOT, SMALL_MODEL, free_port, run_cli


def small_run_args(data_cache: Path, *extra: str) -> list[str]:
    settings = [*SMALL_MODEL, "training.batch_size=4", "training.gradient_accumulation_steps=1",
                "training.eval_interval=2", "training.eval_batches=2", "training.save_interval=2",
                "training.warmup_steps=1", "training.sample_tokens=8", f"data.cache_dir={data_cache}", *extra]
    return ["--preset", "tiny", *[arg for s in settings for arg in ("--set", s)]]


def test_list_presets_models_and_datasets(tmp_path):
    result = run_cli(["--list_presets", "--list_models", "--list_datasets"], cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    for name in PRESETS:
        assert name in result.stdout
    assert "transformer" in result.stdout and "shakespeare" in result.stdout


def test_train_py_is_the_same_entry_point(tmp_path):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), "--list_presets"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "1b_transformer" in result.stdout


def test_misspelled_key_gives_one_message_and_no_traceback(tmp_path):
    result = run_cli(["--preset", "tiny", "--set", "training.learning_rat=1e-3"], cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "training.learning_rat: unknown key (did you mean 'training.learning_rate'?)" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("value, fragment", [
    ("2.5", "training.activation_checkpointing must be true (every block), false, auto or a number of blocks to "
            "recompute from 0 to model.n_layers, got 2.5"),
    ("5", "training.activation_checkpointing=5 is more blocks than the model has: give 0 to 4 (model.n_layers)"),
])
def test_a_bad_count_of_checkpointed_blocks_is_refused_with_the_range(tmp_path, value, fragment):
    result = run_cli(["--preset", "tiny", "--set", f"training.activation_checkpointing={value}", "--dry_run"],
                     cwd=tmp_path, timeout=60)
    assert result.returncode == 2 and fragment in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_missing_default_config_is_explained(tmp_path):
    result = run_cli([], cwd=tmp_path, timeout=60)  # no config.yaml in this folder, no --preset
    assert result.returncode == 2 and "config.yaml" in result.stderr and "--preset" in result.stderr


def test_fp16_on_a_cpu_without_it_is_refused_clearly(tmp_path):
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().is_fp16_supported():
        pytest.skip("this CPU supports fp16 (AVX512-FP16); the refusal path cannot be reached here")
    # A real run is refused before anything starts; a dry run (it trains nothing) plans and says so in a note.
    result = run_cli(["--preset", "tiny", "--set", "training.fp16=true", "--set", "training.max_steps=1"],
                     cwd=tmp_path, timeout=60)
    assert result.returncode == 2 and "error: training.fp16" in result.stderr
    result = run_cli(["--preset", "tiny", "--set", "training.fp16=true", "--dry_run"], cwd=tmp_path, timeout=60)
    assert result.returncode == 0 and "note:" in result.stderr and "error:" not in result.stderr, result.stderr


def test_dry_run_writes_the_ds_config_and_trains_nothing(tmp_path):
    result = run_cli(["--preset", "7b_transformer", "--num_gpus", "4", "--gpu_memory", "24GB", "--dry_run"],
                     cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    written = list((tmp_path / "ds_configs").glob("*.json"))
    assert [p.name for p in written] == ["7b_transformer.json"]
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_one_process_trains_samples_and_resumes(tmp_path, data_cache):
    first = run_cli(small_run_args(data_cache, "training.max_steps=2"), cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "finished 2 steps" in first.stdout and "--- sample ---" in first.stdout
    assert (tmp_path / "checkpoints" / "final_model.pt").is_file()
    assert (tmp_path / "ds_configs" / "tiny.json").is_file()

    second = run_cli(small_run_args(data_cache, "training.max_steps=4"), cwd=tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from" in second.stdout and "finished 4 steps" in second.stdout
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("checkpoint_step_*")) == [
        "checkpoint_step_2", "checkpoint_step_4"]


@pytest.mark.slow
def test_two_ranks_under_the_deepspeed_launcher_zero2(tmp_path, data_cache):
    deepspeed_cli = str(Path(sys.executable).parent / "deepspeed")
    args = small_run_args(data_cache, "training.max_steps=3", "training.zero_stage=2")
    result = run_cli(args, cwd=tmp_path, timeout=400, env={"OMP_NUM_THREADS": "1"},
                     launcher=[deepspeed_cli, "--num_gpus", "2", "--master_port", str(free_port())])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "finished 3 steps" in output
    step = tmp_path / "checkpoints" / "checkpoint_step_3"
    assert sorted(p.name for p in step.glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    state = torch.load(tmp_path / "checkpoints" / "final_model.pt", weights_only=True)
    assert state["run_config"]["training"]["zero_stage"] == 2


def test_the_venvs_ninja_is_found_without_an_activated_venv(tmp_path, monkeypatch):
    """DeepSpeedCPUAdam (optimizer offload) JIT-builds with `ninja` from PATH; requirements.txt installs it next to
    the interpreter, which `.venv/bin/python launcher/run.py` does not put on PATH."""
    import shutil

    from launcher.run import put_venv_tools_on_path

    venv_ninja = Path(sys.executable).parent / "ninja"
    if not venv_ninja.is_file():
        pytest.skip("no ninja next to this interpreter (requirements.txt installs one)")
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine without a system ninja
    put_venv_tools_on_path()
    assert shutil.which("ninja") == str(venv_ninja)


def test_hostfile_multiplies_the_ranks_per_node(tmp_path):
    """A DeepSpeed hostfile ('host slots=N', comments and blank lines ignored): num_gpus ranks on each host."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-a slots=2\n\nnode-b slots=2  # second\n")
    result = run_cli(["--preset", "tiny", "--num_gpus", "2", "--hostfile", str(hostfile), "--dry_run",
                      "--gpu_memory", "24GB"], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "world size 4" in result.stdout
    assert "4 rank(s)" in result.stdout  # the memory plan is made for all of them

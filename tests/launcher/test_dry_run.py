"""`launcher/run.py --dry_run`: the memory plan table for every preset on several GPU counts and sizes, the
ds_config it writes, and the refusal (exit 2, what would fit) when nothing does. Runs main() in-process."""
from __future__ import annotations

import json

import pytest
import torch

from launcher import run as run_module
from launcher.presets import PRESETS


@pytest.fixture
def dry_run(tmp_path, monkeypatch, capsys):
    """Call main(argv) in tmp_path; return (exit code, stdout, stderr, ds_configs folder)."""
    monkeypatch.chdir(tmp_path)
    # The session's in-process engine tests set RANK/WORLD_SIZE=1 (the process_group fixture); main() would take
    # them for a launcher's and plan one rank whatever --num_gpus says.
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    threads = torch.get_num_threads()

    def call(*argv: str):
        try:
            code = run_module.main(["--dry_run", *argv])
        finally:
            torch.set_num_threads(threads)  # main() shares the cores between CPU ranks
        out = capsys.readouterr()
        return code, out.out, out.err, tmp_path / "ds_configs"

    return call


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("num_gpus, gpu_memory", [(1, "24GB"), (4, "24GB"), (8, "80GB")])
def test_every_preset_gets_a_table_or_a_reason(dry_run, name, num_gpus, gpu_memory):
    code, out, err, folder = dry_run("--preset", name, "--num_gpus", str(num_gpus), "--gpu_memory", gpu_memory,
                                     "--cpu_memory", "512GB")
    if code == 0:
        assert f"Memory plan for {name}" in out and "Chosen: " in out and "Why: " in out
        ds = json.loads((folder / f"{name}.json").read_text())
        chosen = next(line for line in out.splitlines() if line.startswith("*"))
        assert f"ZeRO-{ds['zero_optimization']['stage']}" in chosen
        assert f"micro-batch {ds['train_micro_batch_size_per_gpu']}," in out
    else:
        assert code == 2 and "no layout fits" in err and "What would fit:" in err
        assert not folder.exists()


def test_the_issue_example_plans_7b_on_four_24gb_gpus(dry_run):
    code, out, _, folder = dry_run("--preset", "7b_transformer", "--num_gpus", "4", "--gpu_memory", "24GB")
    assert code == 0
    assert "host RAM not checked" in out
    ds = json.loads((folder / "7b_transformer.json").read_text())
    # docs/memory.md: ZeRO-2 + optimizer offload + checkpointing, micro-batch 2 (22.0 GiB/GPU).
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (2, 128)
    assert "ZeRO-2 +opt offload +ckpt" in next(line for line in out.splitlines() if line.startswith("*"))
    assert ds["train_batch_size"] * 4096 == 4194304


def test_without_cuda_the_dry_run_plans_against_host_ram(dry_run):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out, _, _ = dry_run("--preset", "tiny")
    assert code == 0 and "no CUDA GPU: planning against host RAM" in out


def test_nothing_fits_exits_2_before_starting(dry_run):
    code, out, err, folder = dry_run("--preset", "7b_mamba", "--num_gpus", "1", "--gpu_memory", "16GB",
                                     "--cpu_memory", "32GB")
    assert code == 2 and not folder.exists()
    # 8 or 16 nodes of one 16 GB GPU and 32 GB of RAM: the GPUs fit only with offload, and then the node of rank 0
    # cannot also hold the 27 GiB fp32 copy an export gathers; 32 fit without offload.
    assert "no layout fits" in err and "- more GPUs: 32 of this size" in err and "- host RAM of at least" in err


def test_explicit_batch_size_that_does_not_fit_is_refused(dry_run):
    code, _, err, _ = dry_run("--preset", "1b_transformer", "--gpu_memory", "24GB", "--cpu_memory", "64GB",
                              "--set", "training.batch_size=64")
    assert code == 2 and "training.batch_size=64 does not fit" in err


def test_unreadable_memory_size_is_a_clear_error(dry_run):
    code, _, err, _ = dry_run("--preset", "tiny", "--gpu_memory", "lots")
    assert code == 2 and "e.g. 24GB" in err


def test_hostfile_counts_nodes(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode1 slots=4\n\nnode2 slots=4\n")
    assert run_module.hostfile_nodes(str(hostfile)) == 2 and run_module.hostfile_nodes(None) == 1

"""The plan across nodes: nodes from a hostfile or Slurm's environment, the dry run's nodes x GPUs, the inter-node
figures in the Why line and where they change the choice; the errors a multi-node start refuses with. In-process."""
from __future__ import annotations

import json

import pytest
import torch

from launcher import run as run_module
from launcher.nodes import NodeError, expand_nodelist, parse_bandwidth, read_hostfile

SLURM_KEYS = ("SLURM_NNODES", "SLURM_JOB_NUM_NODES", "SLURM_NODEID", "SLURM_JOB_NODELIST", "SLURM_NODELIST",
              "SLURM_GPUS_ON_NODE", "SLURM_JOB_ID")


@pytest.fixture
def dry_run(tmp_path, monkeypatch, capsys):
    """main(argv) in tmp_path, outside any launcher or Slurm job; returns (code, stdout, stderr, ds_config or None)."""
    monkeypatch.chdir(tmp_path)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "CROSS_SIZE", *SLURM_KEYS):
        monkeypatch.delenv(key, raising=False)
    threads = torch.get_num_threads()

    def call(*argv: str, preset: str = "7b_transformer"):
        try:
            code = run_module.main(["--preset", preset, *argv])
        finally:
            torch.set_num_threads(threads)
        out = capsys.readouterr()
        path = tmp_path / "ds_configs" / f"{preset}.json"
        return code, out.out, out.err, json.loads(path.read_text()) if path.exists() else None

    return call


@pytest.fixture
def four_nodes(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"gpu0{i} slots=8\n" for i in range(1, 5)))
    return hostfile


H100 = ("--num_gpus", "8", "--gpu_memory", "80GB", "--cpu_memory", "1TB", "--dry_run")


def seven_b_params() -> int:
    """The parameter count of 7b_transformer as torch counts it on the meta device (not the planner's estimate)."""
    from launcher.config import build_run_config
    from model.registry import create_model

    run = build_run_config(preset="7b_transformer")
    with torch.device("meta"):
        model = create_model(run.model_type, run.model)
    return sum(p.numel() for p in model.parameters())


def test_the_7b_plan_on_four_nodes_of_eight_h100s_is_pinned(dry_run, four_nodes):
    code, out, err, ds = dry_run(*H100, "--hostfile", str(four_nodes))
    assert code == 0, err
    assert "6.74B parameters, bf16, sequence 4096, 32 rank(s) = 4 nodes x 8 GPUs" in out
    assert (f"Nodes: 4 nodes x 8 GPU(s) (hostfile {four_nodes}: 4 node(s)); inter-node bandwidth 25 GB/s per node "
            "(assumed: one 200 Gb/s InfiniBand HDR port per node") in out
    zero = ds["zero_optimization"]
    assert (zero["stage"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
            ds["train_batch_size"]) == (2, 2, 16, 1024)
    assert "zero_hpz_partition_size" not in zero and "offload_optimizer" not in zero
    # Bytes each node sends per step (launcher/planning/internode.py's table), worked out here from torch's parameter count:
    # bf16 weights, 3 of 4 shards held by other nodes; ZeRO-2 (16 + 1) rounds, ZeRO-3 3 x 16.
    weights = seven_b_params() * 2
    zero2, zero3 = 17 * weights * 3 / 4, 48 * weights * 3 / 4
    why = next(line for line in out.splitlines() if line.startswith("Why: "))
    assert (f"across 4 nodes at 25 GB/s each, per step of 16 micro-batches: ZeRO-2 sends {zero2 / 1e9:,.1f} GB "
            f"(~{zero2 / 25e9:,.1f} s) between nodes, ZeRO-3 would send {zero3 / 1e9:,.1f} GB (~{zero3 / 25e9:,.1f} s)"
            ) in why, why


def test_across_nodes_recomputation_beats_zero3_where_one_node_would_take_zero3(dry_run, four_nodes):
    """40 GB GPUs: the same 32 ranks planned as one node take ZeRO-3 at micro-batch 1; across 4 nodes ZeRO-2 with
    checkpointing ranks first, and the Why line says so."""
    code, out, err, ds = dry_run("--num_gpus", "32", "--gpu_memory", "40GB", "--cpu_memory", "4TB", "--dry_run")
    assert code == 0 and ds["zero_optimization"]["stage"] == 3 and ds["train_micro_batch_size_per_gpu"] == 1, err
    code, out, err, ds = dry_run("--num_gpus", "8", "--gpu_memory", "40GB", "--cpu_memory", "1TB", "--dry_run",
                                 "--hostfile", str(four_nodes))
    assert code == 0, err
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_micro_batch_size_per_gpu"] == 4
    assert next(line for line in out.splitlines() if line.startswith("*")).split()[1:4] == ["ZeRO-2", "+ckpt",
                                                                                           "28/32"]
    assert "(with all 32 ranks on one node the plan would take ZeRO-3 at micro-batch 1)" in out


def test_zero3_across_nodes_partitions_hierarchically_within_a_node(dry_run, four_nodes):
    code, out, err, ds = dry_run(*H100, "--hostfile", str(four_nodes), "--set", "training.zero_stage=3",
                                 "--internode_bandwidth", "400Gb/s")
    assert code == 0, err
    assert ds["zero_optimization"]["zero_hpz_partition_size"] == 8
    assert "inter-node bandwidth 50 GB/s per node (given with --internode_bandwidth)" in out
    assert "hierarchical partitioning zero_hpz_partition_size=8 keeps the backward all-gather within each node" in out
    # One node: nothing to keep within it.
    code, out, err, ds = dry_run(*H100, "--set", "training.zero_stage=3")
    assert code == 0 and "zero_hpz_partition_size" not in ds["zero_optimization"] and "Nodes:" not in out


def test_slurm_environment_gives_the_same_plan_as_the_hostfile(dry_run, four_nodes, monkeypatch):
    _, _, _, from_hostfile = dry_run(*H100, "--hostfile", str(four_nodes))
    monkeypatch.setenv("SLURM_NNODES", "4")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[01-04]")
    monkeypatch.setenv("SLURM_NODEID", "2")
    code, out, err, ds = dry_run(*H100)
    assert code == 0, err
    assert ds == from_hostfile
    assert "Nodes: 4 nodes x 8 GPU(s) (Slurm: SLURM_NNODES=4, SLURM_JOB_NODELIST=gpu[01-04], this node SLURM_NODEID=2)" \
        in out
    # Started once in the batch script (not once per node through srun), a real run would wait for the other nodes.
    code, out, err, _ = dry_run("--num_gpus", "8", preset="tiny")
    assert code == 2 and "this is a 4-node Slurm job: start one runner per node" in err and "--node_rank" in err


@pytest.mark.parametrize("argv, message", [
    (["--node_rank", "4"], "--node_rank 4 is not a node of hostfile"),
    (["--node_rank", "1", "--master_addr", "10.0.0.1"], "--master_port is required with --node_rank"),
    (["--node_rank", "1", "--master_port", "29500"], "--master_addr is required with --node_rank"),
    (["--num_gpus", "16"], "num_gpus is 16 but each node offers 8"),
    (["--internode_bandwidth", "fast"], "cannot read bandwidth 'fast'"),
])
def test_a_multinode_start_without_what_every_node_must_agree_on_is_refused(dry_run, four_nodes, argv, message):
    code, out, err, ds = dry_run("--hostfile", str(four_nodes), *argv, preset="tiny")
    assert code == 2 and f"error: {message}" in err and "Traceback" not in err, err
    assert ds is None  # refused before anything was written


@pytest.mark.parametrize("text, message", [
    ("node-a slots=2\nnode-b slots=4\n", "different slot counts ([2, 4])"),
    ("node-a slots=2\nnode-a slots=2\n", "line 2: host 'node-a' is listed twice"),
    ("node-a 2\n", "line 1: 'node-a 2' is not 'hostname slots=N'"),
    ("# nothing\n", "lists no host"),
])
def test_a_bad_hostfile_is_refused_naming_the_line(dry_run, tmp_path, text, message):
    hostfile = tmp_path / "bad_hostfile"
    hostfile.write_text(text)
    code, _, err, _ = dry_run("--hostfile", str(hostfile), "--dry_run", preset="tiny")
    assert code == 2 and message in err, err


def test_hostfile_lines_and_slurm_node_lists():
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_nodelist("a[8-10]") == ["a8", "a9", "a10"]  # Slurm pads to the width written, here none
    assert expand_nodelist("node[001-002]-ib") == ["node001-ib", "node002-ib"]
    with pytest.raises(NodeError, match="cannot read the range"):
        expand_nodelist("gpu[a-c]")
    assert parse_bandwidth("200Gb/s") == parse_bandwidth("25GB/s") == 25e9
    assert parse_bandwidth("400 Gbit/s") == 50e9


def test_hostfile_comments_and_blank_lines(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-a slots=2\n\nnode-b slots=2  # second\n")
    assert read_hostfile(hostfile) == [("node-a", 2), ("node-b", 2)]

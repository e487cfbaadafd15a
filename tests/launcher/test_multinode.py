"""Two nodes on one machine, each started by DeepSpeed's own runner with --no_ssh (launcher/local_nodes.py), on CPU
with gloo: the same weights as one node with two ranks; a node killed mid-save (shared file system and node-local
disks) resumes to exactly the weights of an uninterrupted run; a rank that raises on one node ends both; SIGTERM to
one node's launcher stops every rank of both nodes at the same step with a checkpoint and exit code 75. Every test
ends with no process of either node alive (each node runs in its own process group, killed on the way out).
"""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch

from engine.checkpoint.commit import MANIFEST, damage_of
from launcher.local_nodes import start_local_nodes
from tests.conftest import EXTENSIONS_DIR, free_port, run_two_ranks
from tests.engine import rank_equivalence
from tests.launcher import rank_failure
from tests.launcher.reliability_runs import assert_same_weights, run_args, wait_for

JOB_TIMEOUT_S = 240
"""No two-node job may outlive this (start-up of both nodes is 15-40 s on a busy 2-core machine)."""
ENV = {"TORCH_EXTENSIONS_DIR": str(EXTENSIONS_DIR), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def run_nodes(args: list[str], workdir: Path, *, node_dirs: bool = False, node_env=None, form: str = "deepspeed",
              script=None, timeout: float = JOB_TIMEOUT_S):
    """Start two one-rank nodes, wait for both (bounded), check that nothing of either survives; returns (exit codes,
    [(stdout, stderr)] per node)."""
    nodes = start_local_nodes(args, num_nodes=2, master_port=free_port(), workdir=workdir, form=form, script=script,
                              node_dirs=[workdir / "n0", workdir / "n1"] if node_dirs else None, node_env=node_env,
                              env=ENV)
    try:
        codes = nodes.wait(timeout)
        wait_for(lambda: not nodes.alive(), 30, "every process of both nodes to end")
    finally:
        nodes.stop()
    return codes, [nodes.output(i) for i in range(2)]


def logs(outputs) -> str:
    return "\n".join(f"--- node {i} ---\n{out[-2000:]}\n{err[-3000:]}" for i, (out, err) in enumerate(outputs))


# ---- the same result ---------------------------------------------------------------------------------------------

STAGES = ["2", "3", "mamba:2", "mamba:3"]


@pytest.mark.slow
def test_two_nodes_of_one_rank_train_like_one_node_of_two(tmp_path, data_cache):
    """2 nodes x 1 rank (DeepSpeed runner, --no_ssh) against 1 node x 2 ranks (torchrun), global batch 4, ZeRO-2 and
    ZeRO-3, Transformer and Mamba: the losses and weights of tests/engine/test_rank_equivalence.py's comparison."""
    one_node, two_nodes = tmp_path / "one_node", tmp_path / "two_nodes"
    one_node.mkdir()
    run_two_ranks(rank_equivalence.__file__, str(data_cache), str(one_node), "2", "1", *STAGES, cwd=one_node,
                  timeout=JOB_TIMEOUT_S)
    codes, outputs = run_nodes([str(data_cache), str(two_nodes), "2", "1", *STAGES], two_nodes,
                               script=rank_equivalence.__file__)
    assert codes == [0, 0], logs(outputs)
    assert "nnodes=2, num_local_procs=1, node_rank=1" in outputs[1][0] + outputs[1][1]  # really two nodes
    for stage in STAGES:
        family, _, number = stage.rpartition(":")
        name = f"ws2_mb2_acc1_zero{number}" + (f"_{family}" if family else "") + ".pt"
        one, two = (torch.load(folder / name, weights_only=True) for folder in (one_node, two_nodes))
        assert one["samples"] == two["samples"], stage
        assert one["losses"] == pytest.approx(two["losses"], rel=1e-5), stage
        assert one["grad_norms"] == pytest.approx(two["grad_norms"], rel=1e-4), stage
        assert one["losses"][-1] < one["losses"][0] - 0.1, stage  # the steps changed the model
        assert one["weights"].keys() == two["weights"].keys()
        for key, weight in one["weights"].items():  # test_rank_equivalence.py says why 1e-4
            torch.testing.assert_close(weight, two["weights"][key], rtol=1e-4, atol=1e-4, msg=f"{stage} {key}")


# ---- a node killed mid-save ----------------------------------------------------------------------------------------

def job_args(data_cache: Path, *extra: str, max_steps: int = 6) -> list[str]:
    """Save every 2 steps (keep all), evaluate every 2, ZeRO-2: rank 1's optimizer partition is its own file."""
    return run_args(data_cache, "training.zero_stage=2", "training.keep_last_checkpoints=5", *extra,
                    max_steps=max_steps)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_cache) -> Path:
    folder = tmp_path_factory.mktemp("uninterrupted")
    codes, outputs = run_nodes(job_args(data_cache), folder)
    assert codes == [0, 0], logs(outputs)
    return folder / "checkpoints" / "final_model.pt"


def killed(codes: list[int], node: int) -> bool:
    """The killed node's runner passes its rank's SIGKILL on as 256 - 9 (launch.py exits with -9)."""
    return codes[node] in (-signal.SIGKILL, 256 - signal.SIGKILL, 128 + signal.SIGKILL)


@pytest.mark.slow
def test_node_one_killed_writing_its_partition_on_a_shared_file_system(tmp_path, data_cache, uninterrupted):
    root = tmp_path / "checkpoints"
    # Node 1's rank dies with its ZeRO partition of step 4 half written; rank 0 on node 0 never publishes step 4.
    codes, outputs = run_nodes(job_args(data_cache), tmp_path,
                               node_env=[{}, {"RAG_TEST_KILL_AT": "checkpoint.deepspeed@2"}])
    assert killed(codes, 1) and codes[0] != 0, logs(outputs)
    assert damage_of(root / "checkpoint_step_2") is None and not (root / "checkpoint_step_4").exists()
    # The half-written partition is never published: it stays in .tmp-checkpoint_step_4, or rank 0 removed that
    # folder when its own save failed on the dead peer (engine/checkpoint/commit.py); either way `latest` is step 2.
    assert (root / "latest").read_text().strip() == "checkpoint_step_2", logs(outputs)
    codes, outputs = run_nodes(job_args(data_cache), tmp_path)
    assert codes == [0, 0], logs(outputs)
    assert "resumed from" in outputs[0][0] and "at step 2" in outputs[0][0], logs(outputs)
    assert_same_weights(root / "final_model.pt", uninterrupted)
    assert not list(root.glob(".tmp-*"))


@pytest.mark.slow
def test_either_node_killed_mid_save_with_node_local_disks(tmp_path, data_cache, uninterrupted):
    """Each node writes its part to its own folder (training.node_local_checkpoints, a working directory per node)."""
    args = job_args(data_cache, "training.node_local_checkpoints=true")
    n0, n1 = tmp_path / "n0" / "checkpoints", tmp_path / "n1" / "checkpoints"
    # 1. Node 1 dies before publishing step 4; node 0 publishes its part of step 4.
    codes, outputs = run_nodes(args, tmp_path, node_dirs=True,
                               node_env=[{}, {"RAG_TEST_KILL_AT": "checkpoint.publish@2"}])
    assert killed(codes, 1), logs(outputs)
    assert damage_of(n0 / "checkpoint_step_4") is None and not (n1 / "checkpoint_step_4").exists(), logs(outputs)
    assert {p.name for p in (n1 / "checkpoint_step_2").glob("*optim_states.pt")} == {
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"}  # each node holds only its own ranks' partitions
    # 2. Resumed from step 2 on both nodes (step 4 is not complete on node 1); node 0 dies after publishing step 4
    #    again, before its `latest` names it.
    codes, outputs = run_nodes(args, tmp_path, node_dirs=True, node_env=[{"RAG_TEST_KILL_AT": "checkpoint.latest"}, {}])
    assert killed(codes, 0), logs(outputs)
    assert "checkpoint_step_4 is not complete on every node (node 1: no such folder)" in outputs[0][1], logs(outputs)
    assert "at step 2" in outputs[0][0] and "committed on this node only" in outputs[0][1], logs(outputs)
    assert (n0 / "latest").read_text() == "checkpoint_step_4"  # still launch 1's: this launch died before it
    # 3. Both nodes hold step 4 now: resumed there, the run ends with the uninterrupted weights.
    codes, outputs = run_nodes(args, tmp_path, node_dirs=True)
    assert codes == [0, 0], logs(outputs)
    assert "at step 4" in outputs[0][0], logs(outputs)
    assert_same_weights(n0 / "final_model.pt", uninterrupted)
    for node in (n0, n1):
        manifest = json.loads((node / "checkpoint_step_6" / MANIFEST).read_text())
        assert manifest["world_size"] == 2 and manifest["node_local"] is True


# ---- failures and signals ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_rank_that_raises_on_one_node_ends_both(tmp_path, data_cache):
    args = job_args(data_cache, "training.sample_tokens=0", max_steps=4)
    started = time.monotonic()
    codes, outputs = run_nodes(args, tmp_path, script=rank_failure.__file__,
                               node_env=[{"FAULT": "raise"}, {"FAULT": "raise"}])  # rank 1 = node 1 raises at step 2
    elapsed = time.monotonic() - started
    assert codes[0] != 0 and codes[1] != 0, logs(outputs)
    assert rank_failure.failure_message(1, 2) in outputs[1][1], logs(outputs)
    assert "finished" not in outputs[0][0] + outputs[1][0]
    # Start-up of both nodes plus seconds: node 0's rank sees the peer's connection close at its next collective.
    assert elapsed < 150, elapsed


@pytest.mark.slow
def test_sigterm_to_one_nodes_launcher_stops_both_nodes_with_a_checkpoint(tmp_path, data_cache):
    """The node command is `python launcher/run.py ... --hostfile H --node_rank R` (what examples/multinode.sbatch
    runs): SIGTERM reaches node 1's ranks, every rank agrees on the step, saves its part and exits 75."""
    args = job_args(data_cache, "training.save_interval=1000", max_steps=100_000)
    nodes = start_local_nodes(args, num_nodes=2, master_port=free_port(), workdir=tmp_path, form="run.py", env=ENV)
    try:
        wait_for(lambda: (tmp_path / "checkpoints" / "best_model.pt").exists(), JOB_TIMEOUT_S, "a first evaluation")
        nodes.signal_node(1, signal.SIGTERM)  # to node 1's launcher only, as a scheduler signals one node
        codes = nodes.wait(120)
        wait_for(lambda: not nodes.alive(), 30, "every process of both nodes to end")
    finally:
        nodes.stop()
    outputs = [nodes.output(i) for i in range(2)]
    assert codes == [75, 75], logs(outputs)
    step = int(outputs[0][1].split("stopped at step ")[1].split()[0])
    assert "by SIGTERM" in outputs[0][1], logs(outputs)
    folder = tmp_path / "checkpoints" / f"checkpoint_step_{step}"
    assert damage_of(folder) is None and json.loads((folder / MANIFEST).read_text())["step"] == step
    assert sorted(p.name for p in folder.glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert not (tmp_path / "checkpoints" / "final_model.pt").exists()

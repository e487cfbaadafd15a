"""tools/throughput.py and tools/gpu_check.sh on CPU: a real (tiny) timing of all three contenders in-process,
the reports and tables, bad input, and the GPU script's clean "no GPU" exit. Speeds are printed, not asserted."""
from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch

from launcher.planning.gpu_specs import peak_tflops
from model import ModelConfig, create_model
from model.registry import family_costs
from tests.conftest import REPO_ROOT, SMALL_MODEL
from tools import throughput


@pytest.fixture(scope="module")
def report(tmp_path_factory, process_group):
    path = tmp_path_factory.mktemp("throughput") / "tiny.json"
    overrides = [arg for item in SMALL_MODEL for arg in ("--set", item)]
    assert throughput.main(["--preset", "tiny", "--steps", "2", "--warmup", "1", "--micro_batch", "2",
                            "--json", str(path), *overrides]) == 0
    return json.loads(path.read_text()), path


def test_all_contenders_train_the_same_problem(report):
    data, _ = report
    assert set(data["results"]) == {"deepspeed", "plain", "transformers"}, data["errors"]
    for name, result in data["results"].items():
        assert result["tokens_per_s"]["median"] > 0 and len(result["runs"]) == 2  # interleaved on CPU: per step
        # After 3 steps from a random start every model still predicts ~uniformly over the vocabulary.
        assert abs(result["final_loss"] - math.log(8192)) < 0.5, name
        assert result["mfu"] is None and result["peak_memory_bytes"] is None  # no GPU
    assert data["micro_batch"] == 2 and data["seq_len"] == 64 and data["precision"] == "fp32"
    config = ModelConfig(model_type="transformer", vocab_size=8192, d_model=64, n_layers=2, n_heads=4,
                         n_kv_heads=2, max_seq_len=64)
    assert data["flops_per_token"] == family_costs("transformer").training_flops_per_token(config, 64)
    assert set(data["ratios"]) == {"deepspeed/plain", "deepspeed/transformers"}
    ours = data["results"]["deepspeed"]["tokens_per_s"]["median"]
    assert data["ratios"]["deepspeed/plain"] == pytest.approx(ours / data["results"]["plain"]["tokens_per_s"]["median"])


def test_every_contender_takes_an_optimizer_step(process_group, native_linear):
    """A contender that skipped its optimizer step would time forward + backward only and look faster, and the
    report above cannot tell: on random tokens every loss stays near ln(V) whether the weights move or not. Here
    each contender trains on ONE batch repeated, so its loss must fall step after step; without a step it stays
    exactly the same (the forward pass is deterministic). Oracle: plain AdamW by hand on the same model and batch."""
    from engine.evaluation.step_timing import BenchSetup, deepspeed_contender, make_batches, plain_contender, transformers_contender
    from launcher.ds_config import build_ds_config

    args = throughput.parse_args(["--preset", "tiny", "--micro_batch", "2", "--set", "training.learning_rate=1e-2",
                                  "--set", "training.warmup_steps=1", "--set", "training.grad_clip=0",
                                  *[arg for item in SMALL_MODEL for arg in ("--set", item)]])
    run, plan = throughput.plan_run(args, on_cuda=False)
    setup = BenchSetup(model=run.model, training=run.training, device="cpu", num_checkpointed_blocks=0)
    batch = make_batches(setup, count=1, micro_batch=2, seq_len=run.model.max_seq_len)[0]
    builders = {"deepspeed": lambda: deepspeed_contender(setup, build_ds_config(run, plan, pin_memory=False)),
                "plain": lambda: plain_contender(setup), "transformers": lambda: transformers_contender(setup)}
    falls = {}
    for name, build in builders.items():
        torch.manual_seed(0)
        step, cleanup = build()
        losses = [float(step(batch)) for _ in range(4)]
        cleanup()
        assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0] - 0.1, (name, losses)
        falls[name] = losses[0] - losses[-1]
    # The oracle: torch.optim.AdamW on this project's model, same settings, same batch.
    torch.manual_seed(0)
    model = create_model(run.model.model_type, run.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(run.training.adam_beta1, run.training.adam_beta2),
                                  eps=run.training.adam_eps, weight_decay=0.0)
    reference = []
    for _ in range(4):
        loss = model(batch[:, :-1], targets=batch[:, 1:])[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        reference.append(float(loss))
    print(f"loss fall over 3 steps on one batch: {falls}, AdamW by hand {reference[0] - reference[-1]:.3f}")
    for name in ("plain", "deepspeed"):  # the same model and initialisation (seed 0) as the oracle
        assert falls[name] == pytest.approx(reference[0] - reference[-1], rel=0.02), name


def test_whole_runs_in_turn_as_on_gpu(tmp_path, process_group):
    path = tmp_path / "plain.json"
    overrides = [arg for item in SMALL_MODEL for arg in ("--set", item)]
    assert throughput.main(["--preset", "tiny", "--steps", "1", "--warmup", "0", "--micro_batch", "1", "--repeats",
                            "2", "--interleave", "no", "--contenders", "plain", "--json", str(path), *overrides]) == 0
    data = json.loads(path.read_text())
    assert not data["interleaved"] and len(data["results"]["plain"]["runs"]) == 2 and data["ratios"] == {}


def test_a_time_limit_keeps_what_finished(tmp_path, process_group, monkeypatch):
    """SIGTERM (tools/gpu_check.sh's `timeout`) during the second contender: the first one's numbers are still
    reported and written."""
    import engine.evaluation.step_timing

    real = engine.evaluation.step_timing.time_contender
    calls = []

    def stopped_on_second_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            throughput._stop_timing(15, None)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.evaluation.step_timing, "time_contender", stopped_on_second_call)
    path = tmp_path / "stopped.json"
    overrides = [arg for item in SMALL_MODEL for arg in ("--set", item)]
    assert throughput.main(["--preset", "tiny", "--steps", "1", "--warmup", "0", "--micro_batch", "1",
                            "--interleave", "no", "--contenders", "plain,transformers", "--json", str(path),
                            *overrides]) == 0
    data = json.loads(path.read_text())
    assert data["results"]["plain"]["tokens_per_s"]["median"] > 0
    assert "stopped by SIGTERM" in data["results"]["transformers"]["error"]


def test_markdown_table_and_summary(report, capsys):
    _, path = report
    assert throughput.main(["--markdown", str(path)]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("| preset |") and len(table) == 2 + 3
    assert throughput.main(["--markdown", str(path), "--summary"]) == 0
    line = capsys.readouterr().out
    assert "tokens/s" in line and "deepspeed/plain" in line and "MFU" not in line


def test_bad_input_exits_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        throughput.main(["--preset", "tiny", "--steps", "0", "--contenders", "deepspeed,jax"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--steps must be >= 1" in err and "unknown contender(s) jax" in err
    assert throughput.main(["--preset", "no_such_preset"]) == 2
    assert "error:" in capsys.readouterr().err
    assert throughput.main(["--markdown", str(tmp_path / "missing.json")]) == 2


def test_gpu_peak_table():
    assert peak_tflops("NVIDIA H200", "bf16") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA H100 80GB HBM3", "fp16") == 989.0
    assert peak_tflops("NVIDIA H200", "fp32") is None and peak_tflops("Some GPU", "bf16") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script runs the real checks")
def test_gpu_check_script_says_no_gpu():
    done = subprocess.run(["bash", str(REPO_ROOT / "tools" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("no GPU"), done.stdout + done.stderr


def test_the_transformers_peer_checkpoints_the_first_layers_only():
    """The peer recomputes the same blocks as ours (engine/evaluation/step_timing.py checkpoint_first_layers): counted by the
    checkpoint function transformers calls once per checkpointed layer in a training forward."""
    transformers = pytest.importorskip("transformers")
    from engine.evaluation.step_timing import checkpoint_first_layers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2)
    for blocks in (0, 1, 3):
        model = transformers.LlamaForCausalLM(config).train()
        checkpoint_first_layers(model, blocks)
        called = []
        for index, layer in enumerate(model.model.layers):
            if layer.gradient_checkpointing:
                real = layer._gradient_checkpointing_func
                layer._gradient_checkpointing_func = (
                    lambda *args, index=index, real=real, **kwargs: called.append(index) or real(*args, **kwargs))
        model(input_ids=torch.randint(0, 64, (1, 8))).logits.sum().backward()
        assert called == list(range(blocks))


def test_the_hybrid_races_transformers_bamba(tmp_path, process_group):
    """tiny_hybrid against BambaForCausalLM as the transformers contender; the FLOPs per token are the hybrid's."""
    from engine.evaluation.step_timing import transformers_model

    path = tmp_path / "hybrid.json"
    small = [*SMALL_MODEL, "model.layer_pattern=MA", "model.d_state=16", "model.headdim=32", "model.chunk_size=32"]
    overrides = [arg for item in small for arg in ("--set", item)]
    assert throughput.main(["--preset", "tiny_hybrid", "--steps", "1", "--warmup", "0", "--micro_batch", "2",
                            "--contenders", "plain,transformers", "--json", str(path), *overrides]) == 0
    data = json.loads(path.read_text())
    assert set(data["results"]) == {"plain", "transformers"}, data["errors"]
    config = ModelConfig(model_type="hybrid", vocab_size=8192, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                         max_seq_len=64, layer_pattern="MA", d_state=16, headdim=32, chunk_size=32)
    assert data["flops_per_token"] == family_costs("hybrid").training_flops_per_token(config, 64)
    assert type(transformers_model(config)).__name__ == "BambaForCausalLM"
    for result in data["results"].values():
        assert abs(result["final_loss"] - math.log(8192)) < 0.5

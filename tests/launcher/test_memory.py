"""launcher/planning/memory.py and launcher/planning/model_sizes.py against the real models, DeepSpeed's estimators, the bytes a
DeepSpeed engine really holds (world size 1 in-process, 2 under torchrun), and the tensors autograd saves."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from launcher.planning import model_sizes
from launcher.config import build_run_config
from launcher.planning.memory import (DTYPE_BYTES, STAGE3_PARAM_PERSISTENCE_THRESHOLD, SUB_GROUP_SIZE, Layout,
                                      activation_bytes, estimate_memory, model_state_bytes)
from launcher.presets import PRESETS
from model import ModelConfig, create_model
from tests.conftest import run_two_ranks, wait_for_build_locks
from tests.launcher import engine_bytes

GIB = 1 << 30


# ---- parameter counts -------------------------------------------------------------------------------------------

TRANSFORMER_CONFIGS = [
    dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16),
    dict(vocab_size=96, d_model=48, n_layers=3, n_heads=4, max_seq_len=16, tie_embeddings=False, ffn_hidden=80),
    dict(vocab_size=80, d_model=64, n_layers=1, n_heads=8, n_kv_heads=1, max_seq_len=8),
]


@pytest.mark.parametrize("fields", TRANSFORMER_CONFIGS)
def test_transformer_parameter_shapes_match_the_model(fields):
    config = ModelConfig(model_type="transformer", **fields)
    model = create_model("transformer", config)
    assert model_sizes.parameter_shapes(config) == {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert model_sizes.count_parameters(config) == sum(p.numel() for p in model.parameters())


MAMBA_CONFIGS = [
    dict(ssm_type="mamba2", vocab_size=96, d_model=32, n_layers=2, d_state=16, headdim=16, max_seq_len=16),
    dict(ssm_type="mamba2", vocab_size=96, d_model=64, n_layers=1, d_state=8, headdim=16, ngroups=2, expand=3,
         d_conv=3, tie_embeddings=False, max_seq_len=16),
    dict(ssm_type="mamba1", vocab_size=96, d_model=32, n_layers=2, d_state=8, max_seq_len=16),
    dict(ssm_type="mamba1", vocab_size=96, d_model=40, n_layers=1, d_state=4, dt_rank=5, tie_embeddings=False,
         max_seq_len=16),
]


@pytest.mark.parametrize("fields", MAMBA_CONFIGS)
def test_mamba_parameter_shapes_match_the_model(fields):
    config = ModelConfig(model_type="mamba", **fields)
    model = create_model("mamba", config)
    assert model_sizes.parameter_shapes(config) == {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert model_sizes.count_parameters(config) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", ["tiny_hybrid", "1b_hybrid", "7b_hybrid"])
def test_hybrid_parameter_counts_match_transformers_bamba(preset):
    """The hybrid presets, built by transformers as BambaForCausalLM on the meta device: the same parameter count
    (an independent reading of every shape: Mamba heads, groups, conv, GQA, SwiGLU, tied or untied head)."""
    transformers = pytest.importorskip("transformers")
    from model.hybrid.hf import transformers_config_kwargs

    config = build_run_config(preset=preset).model
    with torch.device("meta"):
        bamba = transformers.BambaForCausalLM(transformers.BambaConfig(**transformers_config_kwargs(config)))
    assert model_sizes.count_parameters(config) == sum(p.numel() for p in bamba.parameters())


def test_preset_parameter_counts_match_their_published_sizes():
    # TinyLlama 1.10B (arXiv:2401.02385), LLaMA-2-7B 6.74B (HF config), mamba2-1.3b ~1.34B with its 50k vocab.
    counts = {name: model_sizes.count_parameters(build_run_config(preset=name).model) for name in PRESETS}
    assert counts["1b_transformer"] == 1_100_048_384
    assert counts["7b_transformer"] == 6_738_415_616
    assert counts["1b_mamba"] > 1.2e9 and counts["1b_mamba"] < 1.4e9
    assert counts["7b_mamba"] > 6.5e9 and counts["7b_mamba"] < 7.5e9
    # Bamba-9B's shape with its own 128,256-token vocabulary: 9.78B, its published size.
    bamba_9b = build_run_config(preset="7b_hybrid").model.model_copy(update={"vocab_size": 128256})
    assert round(model_sizes.count_parameters(bamba_9b) / 1e9, 2) == 9.78


# ---- DeepSpeed's own estimators ----------------------------------------------------------------------------------

def _deepspeed_estimates(total: int, largest: int, world_size: int, offload: str, stage: int) -> tuple[int, int]:
    """(cpu, gpu) bytes from DeepSpeed's estimator functions (the *_all_cold printers call these)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if stage == 2:
        return estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=world_size,
                                                     cpu_offload=offload != "none")
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        total, largest, num_gpus_per_node=world_size, cpu_offload=offload != "none",
        cpu_offload_params=offload == "optimizer+params", zero_init=True)
    return cpu, gpu


@pytest.mark.parametrize("preset", ["test_small", "1b_transformer", "7b_transformer", "1b_mamba", "7b_mamba",
                                    "7b_hybrid"])
@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
@pytest.mark.parametrize("stage,offload", [(2, "none"), (2, "optimizer"), (3, "none"), (3, "optimizer"),
                                           (3, "optimizer+params")])
def test_model_states_agree_with_deepspeed_estimators(preset, world_size, stage, offload):
    """DeepSpeed's estimators assume 16-bit weights and gradients with fp32 master weights and Adam (bf16 here).
    Its ZeRO-3 figures leave out one tensor stage3.py allocates: the 16-bit gradient partition buffer
    (grad_partitions_flat_buffer, 2 bytes per parameter per rank, on the optimizer's device); engine measurements
    (below) include it, so it is added to DeepSpeed's number before comparing. And ZeRO-3 converts fp32 gradients
    one sub-group (sub_group_size elements) at a time, where the estimator counts the whole partition at once."""
    config = build_run_config(preset=preset).model
    stats = model_sizes.parameter_stats(config, STAGE3_PARAM_PERSISTENCE_THRESHOLD)
    layout = Layout(world_size=world_size, zero_stage=stage, offload=offload, precision="bf16")
    ours = model_state_bytes(stats.total, layout, largest_tensor=stats.largest_tensor if stage == 3 else 0,
                             persistent=stats.persistent if stage == 3 else 0)
    ds_cpu, ds_gpu = _deepspeed_estimates(stats.total, stats.largest_tensor, world_size, offload, stage)
    part = -(-stats.total // world_size)
    grad_buffer = 2 * part if stage == 3 else 0
    sub_group_saving = 4 * max(0, part - SUB_GROUP_SIZE) if stage == 3 else 0
    expected_gpu = ds_gpu + (grad_buffer - sub_group_saving if offload == "none" else 0)
    assert ours.at_optimizer_step == pytest.approx(expected_gpu, rel=0.01)
    if offload != "none":
        # DeepSpeed's host figure is per node with its 1.5x buffer factor; ours is per rank before that factor.
        # Its ZeRO-2 figure also leaves out the host's 16-bit copy of the partition and its 16-bit gradient
        # accumulation buffer (2 + 2 bytes per parameter; launcher/planning/memory.py, checked against the engine below).
        offload_extra = 4 * part if stage == 2 else 0
        ours_node = world_size * ours.cpu * 1.5 if stage == 3 else max(4 * stats.total * world_size,
                                                                          world_size * (ours.cpu - offload_extra)) * 1.5
        assert ours_node == pytest.approx(ds_cpu + world_size * grad_buffer * 1.5, rel=0.01)


def test_fp32_zero_keeps_a_master_copy_that_deepspeed_estimators_do_not_describe():
    p = 10**9
    bf16 = model_state_bytes(p, Layout(world_size=4, zero_stage=2, precision="bf16")).at_optimizer_step
    fp32 = model_state_bytes(p, Layout(world_size=4, zero_stage=2, precision="fp32")).at_optimizer_step
    assert bf16 == 2 * p + 18 * p // 4  # ZeRO paper's 2 + 2 + 12 (K=12), as DeepSpeed counts it
    assert fp32 == 4 * p + 20 * p // 4  # fp32 weights + fp32 gradient partition, its fp32 copy, master, Adam


# ---- bytes held by a real engine --------------------------------------------------------------------------------

def _expected_engine_bytes(stage: int, precision: str, world_size: int, offload: str = "none") -> dict[str, int]:
    """Our prediction of engine_bytes.measure's three numbers."""
    stats = model_sizes.parameter_stats(engine_bytes.MODEL, STAGE3_PARAM_PERSISTENCE_THRESHOLD)
    zero3 = stage == 3
    layout = Layout(world_size=world_size, zero_stage=stage, offload=offload, precision=precision)
    states = model_state_bytes(stats.total, layout, largest_tensor=stats.largest_tensor if zero3 or offload != "none"
                               else 0, persistent=stats.persistent if zero3 else 0)
    # ZeRO-3 allocates its reduce bucket at start-up; ZeRO-1 keeps its bucket while micro-steps accumulate.
    bucket = engine_bytes.TEST_REDUCE_BUCKET * DTYPE_BYTES[precision]
    kept_bucket = bucket if stage in (1, 3) else 0
    # On a CPU host the offloaded states are in the same memory; and with one rank, a persistent parameter's
    # "GPU" copy is its host partition itself (DeepSpeed's .to(device) of a CPU tensor onto the CPU is no copy).
    host = states.cpu - (states.persistent_weights if offload == "optimizer+params" and world_size == 1 else 0)
    return {
        "after_backward": (states.resident - states.persistent_gradients + states.backward_gradients + kept_bucket
                           + host),
        "after_step": states.resident + (bucket if zero3 else 0) + host,
        "in_step": (states.weights + states.step_gradients + states.master_weights + states.optimizer_states
                    + (bucket if zero3 else 0) + states.cpu),
    }


def _assert_engine_agrees(measured: dict[str, int], stage: int, precision: str, world_size: int,
                          offload: str = "none") -> None:
    assert measured["num_params"] == model_sizes.count_parameters(engine_bytes.MODEL)
    expected = _expected_engine_bytes(stage, precision, world_size, offload)
    for key, value in expected.items():
        # DeepSpeed pads partitions by a few elements and keeps a few scalars (loss scale, step counts).
        assert measured[key] == pytest.approx(value, rel=1e-3, abs=4096), (key, measured, expected)


def _fp16_supported() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().is_fp16_supported()  # CPUs without AVX512-FP16 refuse fp16 (docs/machine_notes.md)


PRECISIONS = ["fp32", "bf16", pytest.param("fp16", marks=pytest.mark.skipif(
    "not __import__('tests.launcher.test_memory', fromlist=['_fp16_supported'])._fp16_supported()",
    reason="this CPU does not support fp16"))]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_model_states_match_engine_bytes_world_size_1(process_group, stage, precision):
    _assert_engine_agrees(engine_bytes.measure(stage, precision), stage, precision, world_size=1)


@pytest.mark.parametrize("stage,offload,precision", [(1, "optimizer", "bf16"), (2, "optimizer", "fp32"),
                                                     (2, "optimizer", "bf16"), (3, "optimizer", "bf16"),
                                                     (3, "optimizer+params", "bf16")])
def test_offloaded_model_states_match_engine_bytes_world_size_1(process_group, stage, offload, precision):
    """Optimizer offload runs DeepSpeedCPUAdam (the cpu_adam JIT build, shared with tests/engine/test_offload.py)."""
    wait_for_build_locks()
    measured = engine_bytes.measure(stage, precision, offload)
    _assert_engine_agrees(measured, stage, precision, world_size=1, offload=offload)


@pytest.mark.slow
def test_model_states_match_engine_bytes_world_size_2(tmp_path):
    cases = ["1:bf16", "2:fp32", "2:bf16", "3:fp32", "3:bf16"]
    result = run_two_ranks(engine_bytes.__file__, *cases, cwd=tmp_path, timeout=120)
    lines = [json.loads(line[7:]) for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == len(cases)
    for measured in lines:
        _assert_engine_agrees(measured, measured["stage"], measured["precision"], world_size=2)


# ---- activations -------------------------------------------------------------------------------------------------

def _saved_bytes(module: torch.nn.Module, fn) -> int:
    """Bytes of the distinct tensors autograd saves while fn() runs, the module's weights and buffers excluded."""
    excluded = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(seen.values())


ACTIVATION_CASES = [
    ("transformer", dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=320), 64),
    ("mamba", dict(ssm_type="mamba2", d_model=64, n_layers=2, d_state=16, headdim=16, ngroups=2, chunk_size=32),
     100),
    ("mamba", dict(ssm_type="mamba1", d_model=64, n_layers=2, d_state=16), 64),
    # Both of the hybrid's layer kinds; each is measured against its own stated bytes.
    ("hybrid", dict(layer_pattern="MA", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=160, d_state=16,
                    headdim=16, ngroups=2, chunk_size=32), 100),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model_type,fields,seq_len", ACTIVATION_CASES)
def test_layer_activations_match_the_tensors_autograd_saves(model_type, fields, seq_len, dtype, native_linear):
    """On CPU the model runs the reference kernels (composite RMSNorm, repeated K/V heads, PyTorch scans)."""
    config = ModelConfig(model_type=model_type, vocab_size=256, max_seq_len=128, **fields)
    torch.manual_seed(0)
    model = create_model(model_type, config).to(dtype)
    batch = 2
    x = torch.randn(batch, seq_len, config.d_model, requires_grad=True)
    act_bytes = DTYPE_BYTES["fp32" if dtype == torch.float32 else "bf16"]
    if model_type == "hybrid":  # every layer against its own kind's bytes
        x = x.to(dtype)
        cos, sin = model.rope.cos[:seq_len], model.rope.sin[:seq_len]
        stated = model_sizes.activation_bytes_per_layer(config, act_bytes, seq_len=seq_len, on_cuda=False)
        assert len(set(stated)) == 2
        for block, per_token in zip(model.layers, stated):
            measured = _saved_bytes(model, lambda: block(x, cos, sin))
            assert measured == pytest.approx(batch * seq_len * per_token, rel=0.01), block.kind
        return
    if model_type == "transformer":
        block = model.layers[0]
        x = x.to(dtype)
        cos, sin = model.rope.cos[:seq_len], model.rope.sin[:seq_len]
        measured = _saved_bytes(model, lambda: block(x, cos, sin))
    else:
        block = model.backbone.layers[0]
        measured = _saved_bytes(model, lambda: block(x))  # Mamba's residual stream is fp32
    predicted = batch * seq_len * model_sizes.layer_activation_bytes(config, act_bytes, seq_len=seq_len,
                                                                     on_cuda=False)
    assert measured == pytest.approx(predicted, rel=0.01)


def test_whole_model_activations_match_saved_tensors(native_linear):
    """Blocks, final norm and the loss's fp32 log-softmax (part of the logits term) add up."""
    config = ModelConfig(model_type="transformer", vocab_size=512, d_model=128, n_layers=3, n_heads=4,
                         n_kv_heads=2, ffn_hidden=320, max_seq_len=64)
    model = create_model("transformer", config).to(torch.bfloat16)
    idx = torch.randint(0, 512, (2, 64))
    measured = _saved_bytes(model, lambda: model(idx, idx))
    layout = Layout(world_size=1, zero_stage=0, precision="bf16", micro_batch=2, seq_len=64, on_cuda=False)
    per_token = (3 * model_sizes.layer_activation_bytes(config, 2, seq_len=64, on_cuda=False)
                 + model_sizes.head_activation_bytes(config, 2, on_cuda=False) + 4 * config.vocab_size)
    assert measured == pytest.approx(2 * 64 * per_token, rel=0.01)
    estimate = estimate_memory(config, layout)
    assert estimate.activations > measured - 2 * 64 * 4 * config.vocab_size  # plus backward workspace


CHECKPOINTING_CASES = [
    ("transformer", dict(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=160)),
    ("mamba", dict(ssm_type="mamba2", d_model=64, n_layers=4, d_state=16, headdim=16, ngroups=2, chunk_size=32)),
    ("hybrid", dict(layer_pattern="MAMM", d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=160,
                    d_state=16, headdim=16, ngroups=2, chunk_size=32)),
]


@pytest.mark.parametrize("model_type,fields", CHECKPOINTING_CASES)
def test_checkpointed_blocks_keep_their_inputs_and_the_others_their_activations(model_type, fields, native_linear):
    """Megatron-LM's block method, N of 4 blocks checkpointed: at the end of the forward pass autograd holds N block
    inputs (layer_input_bytes) and 4 - N blocks' activations (layer_activation_bytes), plus the head."""
    config = ModelConfig(model_type=model_type, vocab_size=256, max_seq_len=64, **fields)
    torch.manual_seed(0)
    model = create_model(model_type, config).train()
    idx = torch.randint(0, 256, (2, 64))
    per_layer = model_sizes.activation_bytes_per_layer(config, 4, seq_len=64, on_cuda=False)
    block_input = model_sizes.layer_input_bytes(config, 4)
    head = model_sizes.head_activation_bytes(config, 4, on_cuda=False) + 4 * config.vocab_size  # + fp32 log-softmax
    measured = []
    for blocks in range(5):
        model.num_checkpointed_blocks = blocks
        measured.append(_saved_bytes(model, lambda: model(idx, idx)))
        predicted = 2 * 64 * (blocks * block_input + sum(per_layer[blocks:]) + head)
        assert measured[-1] == pytest.approx(predicted, rel=0.01), blocks
        if blocks < 4:  # the plan's own sum (the end of the forward pass decides here), less its backward workspace
            layout = Layout(world_size=1, zero_stage=0, precision="fp32", micro_batch=2, seq_len=64, on_cuda=False,
                            num_checkpointed_blocks=blocks)
            planned = activation_bytes(config, layout) - 2 * 64 * max(per_layer) + 2 * 64 * 4 * config.vocab_size
            assert measured[-1] == pytest.approx(planned, rel=0.01), blocks
    assert measured == sorted(measured, reverse=True) and measured[4] < measured[0] / 5


def test_partial_checkpointing_counts_the_larger_of_forward_end_and_recomputation():
    """N of L checkpointed: N inputs and L - N blocks' activations at the end of forward, or, with all of them, the
    recomputed block (its input included) and the L - 1 inputs below it."""
    config = build_run_config(preset="1b_transformer").model  # 22 blocks
    layout = Layout(world_size=1, zero_stage=2, micro_batch=2, seq_len=2048)
    per_layer = model_sizes.layer_activation_bytes(config, 2, seq_len=2048)
    block_input = model_sizes.layer_input_bytes(config, 2)
    outside = 2 * 2048 * (per_layer + model_sizes.head_activation_bytes(config, 2))  # backward workspace and head
    by_blocks = [activation_bytes(config, replace(layout, num_checkpointed_blocks=n))
                 for n in range(23)]
    assert by_blocks[0] == outside + 2 * 2048 * 22 * per_layer
    assert by_blocks[6] == outside + 2 * 2048 * (6 * block_input + 16 * per_layer)
    assert by_blocks[21] == by_blocks[22] == outside + 2 * 2048 * (21 * block_input + per_layer)
    assert by_blocks == sorted(by_blocks, reverse=True)
    with pytest.raises(ValueError, match="model has 22"):
        activation_bytes(config, replace(layout, num_checkpointed_blocks=23))


def test_activation_checkpointing_keeps_block_inputs_only():
    config = build_run_config(preset="1b_transformer").model
    # activation_bytes directly: with the chunked loss the optimizer step is this layout's peak moment, where
    # the estimate's activations component is 0.
    plain = activation_bytes(config, Layout(world_size=1, zero_stage=2, micro_batch=4, seq_len=2048))
    ckpt = activation_bytes(config, Layout(world_size=1, zero_stage=2, micro_batch=4, seq_len=2048,
                                           num_checkpointed_blocks=22))
    per_layer = model_sizes.layer_activation_bytes(config, 2, seq_len=2048)
    # The inputs of blocks 0-20 and block 21 recomputed (its input among its activations), one block's workspace.
    assert ckpt == 4 * 2048 * (21 * 2 * 2048 + 2 * per_layer + model_sizes.head_activation_bytes(config, 2))
    assert ckpt < plain / 4


# ---- the whole estimate -------------------------------------------------------------------------------------------

def test_estimate_components_add_up_and_grow_with_batch():
    config = build_run_config(preset="1b_transformer").model
    small = estimate_memory(config, Layout(world_size=2, zero_stage=2, micro_batch=1, seq_len=2048))
    large = estimate_memory(config, Layout(world_size=2, zero_stage=2, micro_batch=8, seq_len=2048))
    assert small.gpu_total == small.allocated + small.fragmentation + small.cuda_context
    assert large.activations == 8 * small.activations and large.gpu_total > small.gpu_total
    assert small.num_params == 1_100_048_384


def test_zero_stages_and_offload_shrink_memory_in_order():
    config = build_run_config(preset="7b_transformer").model
    totals = [estimate_memory(config, Layout(world_size=4, zero_stage=stage, offload=offload,
                                             num_checkpointed_blocks=32, seq_len=4096)).gpu_total
              for stage, offload in [(0, "none"), (1, "none"), (2, "none"), (3, "none"), (3, "optimizer"),
                                     (3, "optimizer+params")]]
    assert totals == sorted(totals, reverse=True)
    offloaded = estimate_memory(config, Layout(world_size=4, zero_stage=3, offload="optimizer+params",
                                               seq_len=4096))
    assert offloaded.cpu_total > 6.7e9 * 20 / 4  # bf16 weights, gradients, fp32 master and Adam in host RAM


def test_invalid_layouts_are_refused():
    with pytest.raises(ValueError, match="ZeRO-3"):
        Layout(world_size=2, zero_stage=2, offload="optimizer+params")
    with pytest.raises(ValueError, match="stage 1-3"):
        Layout(world_size=2, zero_stage=0, offload="optimizer")


def test_host_plan_counts_the_fp32_copy_rank_0_gathers_at_export():
    """final_model.pt / best_model.pt: rank 0 gathers the full fp32 weights (4 bytes per parameter) while every
    rank still holds its offloaded states; the other ranks hold no copy."""
    run = build_run_config(preset="7b_transformer")
    params = model_sizes.count_parameters(run.model)
    layout = Layout(world_size=4, zero_stage=2, offload="optimizer", precision="bf16", micro_batch=1, seq_len=4096,
                    num_checkpointed_blocks=32)
    estimate = estimate_memory(run.model, layout)
    offloaded = estimate.model_states.cpu
    assert estimate.node_host_total >= 4 * offloaded + 4 * params  # all ranks' states + one fp32 model
    assert estimate.node_host_total < 4 * (estimate.cpu_total + 4 * params)  # not one fp32 model per rank
    plain = estimate_memory(run.model, Layout(world_size=4, zero_stage=2, precision="bf16", micro_batch=1,
                                              seq_len=4096))
    assert plain.node_host_total >= 4 * params  # nothing offloaded: the export copy is still host RAM

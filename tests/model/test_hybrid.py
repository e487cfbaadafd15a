"""The hybrid family (model/hybrid/) against independent oracles: transformers' BambaForCausalLM (same weights,
same logits; its own decoding with its own hybrid cache), the parallel forward pass (incremental decoding through
both caches), and its config rules (every bad pattern or shape one clear error)."""
from __future__ import annotations

import pytest
import torch

from model import ModelConfig, create_model
from model.hybrid.config import expand_layer_pattern
from model.hybrid.hf import (from_transformers_state_dict, model_config_from_transformers,
                             to_transformers_state_dict, transformers_config_kwargs)


def make_config(**fields) -> ModelConfig:
    base = dict(model_type="hybrid", vocab_size=97, max_seq_len=64, d_model=64, n_layers=4, layer_pattern="MA",
                n_heads=4, n_kv_heads=2, ffn_hidden=96, d_state=16, headdim=16, chunk_size=16)
    return ModelConfig(**(base | fields))


def make_model(**fields) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("hybrid", make_config(**fields))
    with torch.no_grad():  # move every norm and SSM scalar off its initial value, so a swapped name shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def bamba_of(model: torch.nn.Module):
    transformers = pytest.importorskip("transformers")
    bamba = transformers.BambaForCausalLM(transformers.BambaConfig(**transformers_config_kwargs(model.config)))
    bamba.load_state_dict(to_transformers_state_dict(model.state_dict()), strict=True)
    return bamba.eval()


# ---- config ------------------------------------------------------------------------------------------------------

def test_the_three_pattern_forms_give_one_letter_per_layer():
    assert expand_layer_pattern("MMMA", 8) == list("MMMAMMMA")
    assert expand_layer_pattern(["m", "A", "M"], 3) == ["M", "A", "M"]
    assert expand_layer_pattern([1, 3], 5) == list("MAMAM")
    assert make_config(layer_pattern=[9, 18, 27], n_layers=32).layer_pattern == [9, 18, 27]


@pytest.mark.parametrize("fields, named", [
    (dict(layer_pattern="MMA", n_layers=4), "do not repeat to model.n_layers=4"),
    (dict(layer_pattern="MXA"), "'M' (Mamba-2) and 'A' (attention)"),
    (dict(layer_pattern=[0, 4]), "lie in 0..3"),
    (dict(layer_pattern=["M", "A"]), "lists 2 layers but model.n_layers=4"),
    (dict(layer_pattern=None), "model.layer_pattern is required"),
    (dict(n_heads=5), "divisible by model.n_heads (5)"),
    (dict(n_kv_heads=3), "multiple of model.n_kv_heads (3)"),
    (dict(headdim=48), "divisible by model.headdim (48)"),
    (dict(ssm_type="mamba1"), "set ssm_type mamba2"),
])
def test_a_bad_config_is_one_error_naming_the_key(fields, named):
    with pytest.raises(ValueError, match="model\\.") as error:
        make_config(**fields)
    assert named in str(error.value)


def test_every_problem_is_reported_at_once_and_the_pattern_belongs_to_the_hybrid():
    with pytest.raises(ValueError) as error:
        make_config(layer_pattern="MMA", n_heads=5)
    assert "layer_pattern" in str(error.value) and "n_heads (5)" in str(error.value)
    with pytest.raises(ValueError, match="applies only to model_type hybrid"):
        ModelConfig(model_type="transformer", layer_pattern="MA")


def test_launcher_reports_a_bad_pattern_as_a_config_error():
    from launcher.config import ConfigError, build_run_config

    with pytest.raises(ConfigError, match="layer_pattern"):
        build_run_config(preset="tiny_hybrid", overrides=["model.layer_pattern=MMA"])
    assert build_run_config(preset="tiny_hybrid", overrides=["model.layer_pattern=MMMA"]).model.layer_pattern == "MMMA"


def test_layers_reuse_the_other_families_classes():
    from model.mamba.mixers import Mamba2Mixer
    from model.transformer.model import CausalSelfAttention, SwiGLU

    model = make_model(layer_pattern="MMAM")
    kinds = [type(block.mixer) for block in model.layers]
    assert kinds == [Mamba2Mixer, Mamba2Mixer, CausalSelfAttention, Mamba2Mixer]
    assert all(isinstance(block.mlp, SwiGLU) for block in model.layers)
    assert model.layers[2].attn.layer == 0  # the KV-cache slot among attention layers


# ---- transformers' Bamba -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields", [
    dict(),  # M A M A, tied embeddings, one group
    dict(layer_pattern=[0, 3], ngroups=2, tie_embeddings=False, rope_theta=500000.0),  # attention first and last
    dict(layer_pattern="MMMA", n_kv_heads=None, d_conv=3, expand=3, headdim=24, chunk_size=8),  # plain MHA, 3 chunks+
])
def test_same_logits_as_transformers_bamba(fields):
    """BambaForCausalLM's own torch path (no mamba-ssm on CPU) with the same weights: fp32, 41 positions over
    several SSD chunks."""
    model = make_model(**fields).eval()
    bamba = bamba_of(model)
    idx = torch.randint(0, 97, (2, 41))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], bamba(input_ids=idx).logits, rtol=1e-5, atol=1e-5)


def test_bamba_rotates_half_of_each_head_unless_told_otherwise():
    """The trap the exported config closes: BambaConfig forces partial_rotary_factor 0.5 when rope_parameters
    does not carry one, and that model computes something else."""
    transformers = pytest.importorskip("transformers")
    model = make_model().eval()
    kwargs = transformers_config_kwargs(model.config)
    assert kwargs["rope_parameters"]["partial_rotary_factor"] == 1.0
    kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": model.config.rope_theta}
    default = transformers.BambaForCausalLM(transformers.BambaConfig(**kwargs)).eval()
    assert default.config.rope_parameters["partial_rotary_factor"] == 0.5
    default.load_state_dict(to_transformers_state_dict(model.state_dict()))
    idx = torch.randint(0, 97, (1, 24))
    with torch.no_grad():
        assert not torch.allclose(model(idx)[0], default(input_ids=idx).logits, atol=1e-3)
    with pytest.raises(ValueError, match="partial_rotary_factor=0.5"):
        model_config_from_transformers(default.config.to_dict())


def test_config_and_names_round_trip_through_bamba():
    transformers = pytest.importorskip("transformers")
    config = make_config(layer_pattern="MMAM", ngroups=2, tie_embeddings=False)
    hf = transformers.BambaConfig(**transformers_config_kwargs(config)).to_dict()
    back = model_config_from_transformers(hf)
    assert back.layer_pattern == [2]
    exclude = {"layer_pattern", "dropout"}
    assert back.model_dump(exclude=exclude) == config.model_dump(exclude=exclude)
    state = make_model().state_dict()
    assert from_transformers_state_dict(to_transformers_state_dict(state)).keys() == state.keys()
    with pytest.raises(ValueError, match="time_step_limit"):
        model_config_from_transformers(hf | {"time_step_limit": [0.001, 0.1]})


def test_greedy_decoding_equals_transformers_generate_with_its_hybrid_cache():
    model = make_model(max_seq_len=64).eval()
    bamba = bamba_of(model)
    prompt = torch.randint(3, 97, (2, 9))
    ours = model.generate(prompt, 10, temperature=0)
    theirs = bamba.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)


# ---- decoding ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt_len", [1, 7, 19])
def test_decoding_through_both_caches_reproduces_the_parallel_forward(prompt_len):
    """Prefill the prompt (chunked scan, KV cache filled), then one token at a time: each step's logits equal the
    full forward pass's at that position."""
    model = make_model(layer_pattern="AMMA").double().eval()
    idx = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        expected = model(idx)[0]  # (B, T, V)
        cache = model.allocate_kv_cache(2, idx.device, torch.float64)
        logits, states = model.prefill(idx[:, :prompt_len], cache)
        steps = [logits]
        for t in range(prompt_len, idx.size(1)):
            steps.append(model.step(idx[:, t:t + 1], cache, states))
    assert len(cache.k) == 2  # K/V only for the two attention layers
    torch.testing.assert_close(torch.stack(steps, dim=1), expected[:, prompt_len - 1:], rtol=1e-9, atol=1e-9)


def test_sampling_past_the_context_window_equals_recomputing_the_window():
    """Past max_seq_len both caches are refilled from the last max_seq_len tokens: each sampled token equals the
    full forward pass over that window."""
    model = make_model(max_seq_len=16).double().eval()
    prompt = torch.randint(0, 97, (2, 10))
    torch.manual_seed(5)
    out = model.generate(prompt, 20, temperature=0)
    with torch.no_grad():
        for t in range(10, 30):
            window = out[:, max(0, t - 16):t]
            assert torch.equal(out[:, t], model(window)[0][:, -1].argmax(-1)), t


def test_checkpointing_the_first_blocks_gives_the_same_loss_and_gradients():
    idx = torch.randint(0, 97, (2, 19))
    results = []
    for setting in (0, 2, True):
        model = make_model().train()
        if setting is True:
            model.gradient_checkpointing = True
        else:
            model.num_checkpointed_blocks = setting
        loss = model(idx, idx)[1]
        loss.backward()
        results.append((loss.detach(), {k: p.grad for k, p in model.named_parameters()}))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=0, atol=0)
        for name, grad in results[0][1].items():
            torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-6, msg=name)


# ---- DeepSpeed ---------------------------------------------------------------------------------------------------

def test_hybrid_built_under_zero3_init_trains(process_group):
    """Under deepspeed.zero.Init parameters are partitioned as they are built: the initialisation gathers them and
    the Mamba mixers' direct use of conv1d / norm / out_proj weights is declared to ZeRO-3."""
    import deepspeed

    torch.manual_seed(0)
    expected = create_model("hybrid", make_config())
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path={"train_micro_batch_size_per_gpu": 2,
                                                  "zero_optimization": {"stage": 3}}):
        model = create_model("hybrid", make_config())
    assert model.num_parameters() == expected.num_parameters()
    a_log = model.layers[0].mamba.A_log
    with deepspeed.zero.GatheredParameters([a_log]):
        torch.testing.assert_close(a_log.data, expected.layers[0].mamba.A_log.data)  # same seed, same init
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
              "zero_optimization": {"stage": 3}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    pattern = torch.tensor([3, 14, 15, 9, 26, 5, 35, 8]).repeat(4)  # (32,)
    batch = torch.stack([pattern[i:i + 25] for i in range(2)])  # (2, 25)
    losses = []
    for _ in range(15):
        _, loss = engine(batch[:, :-1], batch[:, 1:])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    engine.destroy()


# ---- CUDA: mamba-ssm's fused Mamba-2 kernels and FlashAttention in one model (skipped without a GPU) -----------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_fused_mamba_and_flash_attention_in_one_model_match_the_cpu_reference():
    """bf16 on CUDA, the Mamba layers through mamba_split_conv1d_scan_combined and the attention layer through
    FlashAttention only, against the same weights in fp32 on the CPU reference kernels: loss and gradients."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from model.registry import create_model_on
    from model.ssm_ops import fused_kernel, fused_ops_report

    if fused_kernel("mamba_split_conv1d_scan_combined") is None:
        pytest.fail(f"CUDA is available but the fused Mamba-2 kernel is not: "
                    f"{fused_ops_report()['mamba_split_conv1d_scan_combined']}")
    fields = dict(vocab_size=512, d_model=256, n_layers=4, layer_pattern="MMAM", n_heads=4, n_kv_heads=2,
                  ffn_hidden=512, d_state=64, headdim=64, chunk_size=64, max_seq_len=512)
    reference = make_model(**fields).train()
    fast = create_model_on("hybrid", reference.config, device="cuda", dtype=torch.bfloat16).train()
    fast.load_state_dict(reference.state_dict())
    idx = torch.randint(0, 512, (2, 256))
    expected = reference(idx, idx)[1]
    expected.backward()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # fails rather than falls back if FlashAttention cannot run
        loss = fast(idx.cuda(), idx.cuda())[1]
        loss.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=2e-2)
    for (name, p), q in zip(reference.named_parameters(), fast.parameters()):
        error = (q.grad.float().cpu() - p.grad).norm() / p.grad.norm().clamp_min(1e-12)
        assert error < 0.1, name

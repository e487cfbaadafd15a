"""Tiled MLP and tiled loss (model/tiling.py, training.tiled_mlp / tiled_loss): the loss and every gradient equal
the untiled model's, which is the oracle (same weights, same batch, fp32)."""
import copy

import pytest
import torch

from model import ModelConfig, create_model
from model.tiling import configure_tiling, mlp_tiles

CASES = [
    ("transformer", dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96)),
    ("hybrid", dict(layer_pattern="MA", d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, d_state=8,
                    headdim=8, ngroups=1, chunk_size=16)),
]


def _loss_and_grads(model, idx):
    model.zero_grad(set_to_none=True)
    _, loss = model(idx, idx)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("tiled_mlp", [3, True])
@pytest.mark.parametrize("tiled_loss", [False, True])
@pytest.mark.parametrize("model_type,fields", CASES)
def test_tiled_run_equals_the_untiled_one(model_type, fields, tiled_mlp, tiled_loss, native_linear):
    config = ModelConfig(model_type=model_type, vocab_size=64, max_seq_len=96, **fields)
    torch.manual_seed(0)
    reference = create_model(model_type, config).float()
    tiled = copy.deepcopy(reference)
    configure_tiling(tiled, tiled_mlp=tiled_mlp, tiled_loss=tiled_loss)
    idx = torch.randint(0, 64, (2, 96))  # 96 tokens: 3 tiles, or ceil(96 / 32) = 3 for true
    calls = []
    from deepspeed.runtime.sequence_parallel import ulysses_sp
    original = ulysses_sp.TiledMLP.forward
    with pytest.MonkeyPatch.context() as mp:  # the tiled path really runs, with the expected tile count
        mp.setattr(ulysses_sp.TiledMLP, "forward",
                   staticmethod(lambda ctx, fn, mod, x, shards, params: calls.append(shards)
                                or original(ctx, fn, mod, x, shards, params)))
        loss, grads = _loss_and_grads(tiled, idx)
    assert calls == [3, 3]
    ref_loss, ref_grads = _loss_and_grads(reference, idx)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_tiled_loss_runs_the_chunked_cross_entropy_on_cpu(native_linear):
    """On CPU the logits are built unless training.tiled_loss: then they never are (None) and the loss equals."""
    config = ModelConfig(model_type="transformer", vocab_size=64, max_seq_len=32, d_model=32, n_layers=1, n_heads=4,
                         n_kv_heads=2, ffn_hidden=96)
    model = create_model("transformer", config).float()
    idx = torch.randint(0, 64, (2, 32))
    logits, ref = model(idx, idx)
    assert logits is not None
    configure_tiling(model, tiled_loss=True)
    logits, loss = model(idx, idx)
    assert logits is None
    torch.testing.assert_close(loss, ref)
    assert model(idx)[0].shape == (2, 32, 64)  # without targets: logits, as before


def test_mlp_tiles_rule():
    assert mlp_tiles(False, 4096, 2048) == 1
    assert mlp_tiles(True, 4096, 2048) == 2  # ceil(T / d_model)
    assert mlp_tiles(True, 4097, 2048) == 3
    assert mlp_tiles(8, 4, 2048) == 4  # never more tiles than tokens


@pytest.mark.parametrize("preset,value,needle", [
    ("tiny", "0", "training.tiled_mlp must be false, true (auto) or a number of tiles >= 1"),
    ("tiny_mamba", "true", "training.tiled_mlp tiles the SwiGLU MLP, which Mamba models have none of"),
])
def test_bad_tiled_mlp_values_are_refused(preset, value, needle):
    from launcher.config import ConfigError, build_run_config

    with pytest.raises((ConfigError, ValueError)) as error:
        build_run_config(preset=preset, overrides=[f"training.tiled_mlp={value}"])
    assert needle in str(error.value)
    assert build_run_config(preset="tiny", overrides=["training.tiled_mlp=4"]).training.tiled_mlp == 4
    assert build_run_config(preset="tiny", overrides=["training.tiled_mlp=true"]).training.tiled_mlp is True

"""DeepSpeed's Muon, as the trainer builds it (engine/optimizer.py), against a Muon written here from the papers.

The reference (`reference_steps`): gradients of the whole global batch from a plain copy of the model; for the
hidden matrices (named here by hand, per family, not by the rule under test) Nesterov momentum (below), the
Newton-Schulz quintic X <- aX + (bA + cA^2)X with A = XX^T and (a, b, c) = (3.4445, -4.7750,
2.0315), 5 steps from X = U / (||U||_F + 1e-7) (Jordan et al. 2024, "Muon: An optimizer for hidden layers in
neural networks", and its code, github.com/KellerJordan/Muon muon.py), and Moonlight's update
W <- W - lr (0.2 sqrt(max(A, B)) O + wd W) (arXiv:2502.16982, eq. 4); for the rest torch.optim.AdamW with the decay groups named here. The momentum is kept as that code keeps it, an
exponential moving average (B = mu B + (1 - mu) G, U = (1 - mu) G + mu B), not the blog's sum (B = mu B + G,
U = G + mu B), which is 1 / (1 - mu) = 20 times larger: the same direction, but the 1e-7 in the normalisation is
not negligible against the EMA's Frobenius norm when a gradient is tiny (Mamba's dt_proj, 64 x 2: |U| ~ 1e-6), so
the two forms differ there by a third of an update, and DeepSpeed follows the code.

DeepSpeed runs the project's default `ns_method: gram` (Dao's Gram Newton-Schulz, the same polynomial iterated on
X X^T) in fp16 where the accelerator has fp16 and in fp32 elsewhere (`ns_compute_dtype`): fp32 on the CPU, where
it matched this plain quintic to 1e-6. 'standard' runs in bf16, whose rounding the quintic's slope of 3.4 at zero
amplifies into ~5% of an update between any two implementations (measured: DeepSpeed's own against the same
iteration written here), too loose to catch a wrong step; it is the same code path otherwise.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT, free_port, run_job, run_two_ranks
from tests.engine import muon_steps

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
MOMENTUM = 0.95
MUON_NAMES = {
    # Every nn.Linear of a block: attention and SwiGLU projections.
    "transformer": r"layers\.\d+\.(attn\.w[qkvo]|mlp\.w[123])\.weight",
    # Mamba mixers' projections; not conv1d (3-D filters), A_log (2-D in Mamba-1), D, dt_proj.bias, norms.
    "mamba": r"backbone\.layers\.\d+\.mixer\.(in_proj|x_proj|dt_proj|out_proj)\.weight",
    "mamba2": r"backbone\.layers\.\d+\.mixer\.(in_proj|out_proj)\.weight",
    # the attention layer's q/k/v/o, the Mamba-2 layer's in/out projections, both SwiGLUs
    "hybrid": r"layers\.\d+\.(attn\.w[qkvo]|mamba\.(in_proj|out_proj)|mlp\.w[123])\.weight",
}
DECAYED_ADAM_NAMES = {"transformer": r"tok_embeddings\.weight", "mamba": r"backbone\.embedding\.weight",
                      "mamba2": r"backbone\.embedding\.weight", "hybrid": r"tok_embeddings\.weight"}


def newton_schulz(update: torch.Tensor, dtype: torch.dtype, steps: int = 5) -> torch.Tensor:
    """The quintic iteration of Jordan et al. (github.com/KellerJordan/Muon, muon.py `zeropower_via_newtonschulz5`),
    in `dtype`, with Muon's aspect-ratio factor sqrt(max(1, rows / cols)) applied in that dtype as that code does."""
    a, b, c = NS_COEFFICIENTS
    x = update.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    x = x.T if tall else x
    return x * max(1.0, update.size(0) / update.size(1)) ** 0.5


def reference_steps(run: dict, family: str, accum: int = 1) -> dict[str, torch.Tensor]:
    from deepspeed.runtime.zero.muon.original_muon import ns_compute_dtype
    from model import create_model

    config = muon_steps.model_config(family)
    model = create_model(config.model_type, config)
    model.load_state_dict(run["initial"])
    params = dict(model.named_parameters())
    muon = {n for n in params if re.fullmatch(MUON_NAMES[family], n)}
    decayed = [p for n, p in params.items() if re.fullmatch(DECAYED_ADAM_NAMES[family], n)]
    plain = [p for n, p in params.items() if n not in muon and not re.fullmatch(DECAYED_ADAM_NAMES[family], n)]
    adam = torch.optim.AdamW([{"params": decayed, "weight_decay": muon_steps.WEIGHT_DECAY},
                              {"params": plain, "weight_decay": 0.0}], lr=muon_steps.LEARNING_RATE,
                             betas=(0.9, 0.95), eps=1e-8)
    momentum = {n: torch.zeros_like(params[n]) for n in muon}
    lr, wd, dtype = muon_steps.LEARNING_RATE, muon_steps.WEIGHT_DECAY, ns_compute_dtype("gram")
    assert dtype == torch.float32, "a tight comparison needs DeepSpeed's Newton-Schulz in fp32 (CPU: no fp16)"
    for step in range(muon_steps.STEPS):
        batch = run["batch"][step]
        model.zero_grad()
        for chunk in batch.chunk(accum):  # the mean over micro-batches, as DeepSpeed scales each by 1/accum
            _, loss = model(chunk[:, :-1], chunk[:, 1:])
            (loss / accum).backward()
        with torch.no_grad():
            for name in muon:
                weight, grad = params[name], params[name].grad
                momentum[name].lerp_(grad, 1 - MOMENTUM)  # B <- mu B + (1 - mu) G
                nesterov = grad.lerp(momentum[name], MOMENTUM)  # (1 - mu) G + mu B
                orthogonal = newton_schulz(nesterov, dtype)  # O sqrt(max(1, rows / cols))
                rows, cols = weight.shape
                # Moonlight: lr (0.2 sqrt(max(A, B)) O + wd W), O the orthogonal matrix without Muon's own factor.
                moonlight = 0.2 * max(rows, cols) ** 0.5 / max(1.0, rows / cols) ** 0.5
                weight.sub_(lr * (moonlight * orthogonal + wd * weight))
                weight.grad = None
        adam.step()
    return {n: p.detach() for n, p in model.named_parameters()}


TOLERANCE = 2e-5
"""Max |difference| of a weight after 3 steps. Each step moves a Muon matrix by lr x 0.2 = 2e-3 RMS per element
(1.8e-2 at most after 3 steps); the two implementations differed by at most 5e-6 (fp32 reduction order, Gram
against plain Newton-Schulz), on 1 and 2 ranks, ZeRO 0-3. A wrong lr factor, a lost momentum or a Muon step
for an AdamW parameter moves weights by ~1e-3."""


def run_one_rank(out: Path, *args: str) -> None:
    env = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO_ROOT),
           "MASTER_PORT": str(free_port()), "PATH": __import__("os").environ["PATH"],
           "TORCH_EXTENSIONS_DIR": str(REPO_ROOT / ".torch_extensions")}
    result = run_job([sys.executable, muon_steps.__file__, str(out), *args], cwd=out, env=env, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def assert_matches_reference(path: Path, family: str, accum: int) -> None:
    run = torch.load(path, weights_only=True)
    expected_muon = {n for n in run["tags"] if re.fullmatch(MUON_NAMES[family], n)}
    assert {n for n, muon in run["tags"].items() if muon} == expected_muon  # the tags the ZeRO stages read
    reference = reference_steps(run, family, accum)
    assert run["final"].keys() >= reference.keys()
    for name, weight in reference.items():
        assert (weight - run["initial"][name]).abs().max() > 50 * TOLERANCE, name  # the steps moved it
        torch.testing.assert_close(run["final"][name], weight, rtol=0, atol=TOLERANCE, msg=name)


STAGES = ["0", "1", "2", "3"]


@pytest.mark.slow
def test_one_rank_zero_0_to_3_match_the_reference_muon(tmp_path):
    run_one_rank(tmp_path, "transformer", "1", "gram", "0", *STAGES)
    for stage in STAGES:
        assert_matches_reference(tmp_path / f"transformer_ws1_acc1_gram_clip0.0_zero{stage}.pt", "transformer", 1)


@pytest.mark.slow
def test_two_ranks_zero_0_to_3_match_the_reference_muon(tmp_path):
    run_two_ranks(muon_steps.__file__, str(tmp_path), "transformer", "1", "gram", "0", *STAGES, cwd=tmp_path,
                  timeout=400)
    for stage in STAGES:
        assert_matches_reference(tmp_path / f"transformer_ws2_acc1_gram_clip0.0_zero{stage}.pt", "transformer", 1)


@pytest.mark.slow
def test_mamba_with_accumulation_matches_the_reference_muon(tmp_path):
    """Mamba-1 (conv1d filters and a 2-D A_log that must stay with AdamW) at ZeRO 0-3, two micro-batches per step:
    Muon must run once per step on the accumulated gradient."""
    run_one_rank(tmp_path, "mamba", "2", "gram", "0", *STAGES)
    for stage in STAGES:
        assert_matches_reference(tmp_path / f"mamba_ws1_acc2_gram_clip0.0_zero{stage}.pt", "mamba", 2)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mamba2", "hybrid"])
def test_mamba2_and_hybrid_match_the_reference_muon_at_every_stage(tmp_path, family):
    """The other families on 2 ranks, ZeRO 0-3: Mamba-2's mixer (conv1d filters, 1-D A_log, D, dt_bias and the
    gated norm stay with AdamW) and the hybrid's attention, Mamba-2 and SwiGLU matrices."""
    run_two_ranks(muon_steps.__file__, str(tmp_path), family, "1", "gram", "0", *STAGES, cwd=tmp_path, timeout=600)
    for stage in STAGES:
        assert_matches_reference(tmp_path / f"{family}_ws2_acc1_gram_clip0.0_zero{stage}.pt", family, 1)

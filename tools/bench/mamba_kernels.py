"""Benchmark the Mamba scans and models; prints tables (numbers, not pass/fail).

CPU (always):
  1. forward+backward of the reference scans, chunked vs a step-by-step loop, B=2, L=256..2048:
     Mamba-2 SSD (d_inner 256 = 4 heads x 64, N 64, chunk 64) and Mamba-1 selective scan (d_inner 256, N 16),
     the latter also against mamba-ssm's `selective_scan_ref` style loop that slices x[:, :, t].
     Goal (issue 4): the chunked path >= 5x faster than the loop at L=256 and linear in L.
  2. training tokens/s (forward + backward + AdamW step) of the `tiny_mamba`, `tiny` and `tiny_hybrid` presets.
CUDA (when available):
  3. fused (mamba-ssm Triton/CUDA) vs reference scans: max difference and time, forward+backward.
  4. `1b_mamba` in bf16 on one GPU: training tokens/s and model FLOPs utilisation, with
       FLOPs/token = 6 * (P_nonembedding + V * d) + 3 * n_layers * F_scan,
       F_scan = 2 * Q * (G * N + H * P) + 4 * H * P * N   (SSD forward per token and layer, chunk Q:
       C B^T and its product with X inside the chunk, then chunk states and their read-out; Dao & Gu 2024,
       section 6), and MFU = FLOPs/token * tokens/s / peak (H100/H200 dense bf16: 989 TFLOP/s).

    python tools/bench/mamba_kernels.py                 # everything this machine can run
    python tools/bench/mamba_kernels.py --lengths 256 512 --skip_models
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from launcher.presets import PRESETS  # noqa: E402
from model import ModelConfig, create_model  # noqa: E402
from model.mamba.mixers import inverse_softplus_dt  # noqa: E402
from model.mamba.selective_scan import selective_scan_fused, selective_scan_ref, selective_scan_stepwise_ref  # noqa: E402
from model.mamba.ssd_scan import (mamba_split_conv1d_scan_combined_fused, mamba_split_conv1d_scan_combined_ref,  # noqa: E402
                                  ssd_chunk_scan_fused, ssd_chunk_scan_ref, ssd_scan_stepwise_ref)
from model.mamba.ssm_ops import flush_denormals, fused_ops_status, reference_ops  # noqa: E402

H100_BF16_PEAK = 989e12  # dense bf16 tensor-core FLOP/s of an H100/H200 SXM (NVIDIA H100 datasheet)


def timed(fn: Callable[[], None], repeats: int, device: torch.device) -> float:
    """Best wall time of `repeats` calls, in seconds, after one warm-up call."""
    fn()
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def ssd_inputs(batch: int, seqlen: int, heads: int, headdim: int, dstate: int, device, dtype) -> dict:
    """Mamba-2 scan inputs at initialisation scale: dt bias as mamba-ssm draws it, A in [-16, -1]."""
    g = dict(device=device, dtype=dtype)
    return dict(x=torch.randn(batch, seqlen, heads, headdim, **g), dt=torch.randn(batch, seqlen, heads, **g) * 0.1,
                A=-torch.empty(heads, device=device).uniform_(1, 16), B=torch.randn(batch, seqlen, 1, dstate, **g),
                C=torch.randn(batch, seqlen, 1, dstate, **g), D=torch.ones(heads, device=device),
                dt_bias=inverse_softplus_dt(heads).to(device))


def scan_inputs(batch: int, dim: int, seqlen: int, dstate: int, device, dtype) -> dict:
    """Mamba-1 scan inputs at initialisation scale: A[d, n] = -(n + 1), dt bias as mamba-ssm draws it."""
    g = dict(device=device, dtype=dtype)
    return dict(u=torch.randn(batch, dim, seqlen, **g), delta=torch.randn(batch, dim, seqlen, **g) * 0.1,
                A=-torch.arange(1, dstate + 1, device=device, dtype=torch.float32).repeat(dim, 1),
                B=torch.randn(batch, dstate, seqlen, **g), C=torch.randn(batch, dstate, seqlen, **g),
                D=torch.ones(dim, device=device), delta_bias=inverse_softplus_dt(dim).to(device))


def slicing_loop_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba-ssm's `selective_scan_ref` loop (mamba_ssm/ops/selective_scan_interface.py): x[:, :, i] slices,
    whose backward writes a full-size zero gradient per step. Only the baseline of the benchmark."""
    delta = delta.float() + delta_bias[:, None] if delta_bias is not None else delta.float()
    delta = F.softplus(delta) if delta_softplus else delta
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B.float(), u.float())
    x = u.new_zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float32)
    ys = []
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i].float()))
    y = torch.stack(ys, dim=2)
    return y if D is None else y + u * D[:, None]


def fwd_bwd(fn: Callable, inputs: dict, **kwargs) -> Callable[[], None]:
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}

    def run() -> None:
        for v in leaves.values():
            v.grad = None
        out = fn(**leaves, **kwargs)
        (out[0] if isinstance(out, tuple) else out).float().square().mean().backward()
    return run


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))


def bench_cpu_scans(lengths: list[int], repeats: int) -> None:
    cpu = torch.device("cpu")
    rows = []
    for L in lengths:
        loop_repeats = 1 if L > 512 else repeats
        t = ssd_inputs(2, L, 4, 64, 64, cpu, torch.float32)
        kw = dict(chunk_size=64, dt_softplus=True)
        chunked = timed(fwd_bwd(ssd_chunk_scan_ref, t, **kw), repeats, cpu)
        loop = timed(fwd_bwd(ssd_scan_stepwise_ref, t, **kw), loop_repeats, cpu)
        rows.append(["mamba2 SSD", L, f"{chunked * 1e3:.1f}", f"{loop * 1e3:.1f}", "-", f"{loop / chunked:.1f}x",
                     f"{chunked / L * 1e6:.0f}"])
    for L in lengths:
        loop_repeats = 1 if L > 512 else repeats
        t = scan_inputs(2, 256, L, 16, cpu, torch.float32)
        kw = dict(delta_softplus=True)
        chunked = timed(fwd_bwd(selective_scan_ref, t, **kw), repeats, cpu)
        loop = timed(fwd_bwd(selective_scan_stepwise_ref, t, **kw), loop_repeats, cpu)
        sliced = timed(fwd_bwd(slicing_loop_scan, t, **kw), 1, cpu) if L <= 1024 else math.nan
        rows.append(["mamba1 selective", L, f"{chunked * 1e3:.1f}", f"{loop * 1e3:.1f}", f"{sliced * 1e3:.1f}",
                     f"{loop / chunked:.1f}x / {sliced / chunked:.1f}x", f"{chunked / L * 1e6:.0f}"])
    print_table(f"CPU reference scans, forward+backward, B=2, fp32, {torch.get_num_threads()} threads "
                "(d_inner 256; SSD: 4 heads x 64, N 64, chunk 64; selective: N 16)",
                ["scan", "L", "chunked ms", "unbind loop ms", "slicing loop ms", "speed-up", "chunked us/token"],
                rows)


def preset_model(name: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, dict]:
    preset = PRESETS[name]
    config = ModelConfig(model_type=preset["model_type"], **preset["model"])
    torch.manual_seed(0)
    model = create_model(config.model_type, config).to(device=device, dtype=dtype)
    return model, preset


def training_tokens_per_second(model: torch.nn.Module, batch: int, seqlen: int, vocab: int, device: torch.device,
                               repeats: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(0, vocab, (batch, seqlen + 1), device=device)

    def step() -> None:
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return batch * seqlen / timed(step, repeats, device)


def bench_cpu_models(repeats: int) -> None:
    rows = []
    for name in ("tiny_mamba", "tiny", "tiny_hybrid"):
        try:
            model, preset = preset_model(name, torch.device("cpu"), torch.float32)
        except Exception as error:  # noqa: BLE001 - a family still being written must not stop the benchmark
            rows.append([name, "-", "-", f"not available: {type(error).__name__}: {error}"])
            continue
        batch, seqlen = preset["training"]["batch_size"], preset["model"]["max_seq_len"]
        tps = training_tokens_per_second(model.train(), batch, seqlen, preset["model"]["vocab_size"],
                                         torch.device("cpu"), repeats)
        rows.append([name, f"{model.num_parameters() / 1e6:.2f}M", f"{batch}x{seqlen}", f"{tps:,.0f}"])
    print_table(f"CPU training step (forward + backward + AdamW), fp32, {torch.get_num_threads()} threads",
                ["preset", "params", "batch", "tokens/s"], rows)


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()


def split_conv1d_scan_inputs(batch: int, seqlen: int, config: ModelConfig, device, dtype) -> tuple[dict, dict]:
    """Inputs of the whole Mamba-2 mixer op (after in_proj) for `config`, at initialisation scale."""
    heads, G, N, P = config.expand * config.d_model // config.headdim, config.ngroups, config.d_state, config.headdim
    d_inner = heads * P
    conv_dim = d_inner + 2 * G * N
    inputs = dict(zxbcdt=torch.randn(batch, seqlen, 2 * d_inner + 2 * G * N + heads, device=device, dtype=dtype),
                  conv1d_weight=torch.randn(conv_dim, config.d_conv, device=device, dtype=dtype) * 0.5,
                  conv1d_bias=torch.zeros(conv_dim, device=device, dtype=dtype),
                  dt_bias=inverse_softplus_dt(heads).to(device), A=-torch.empty(heads, device=device).uniform_(1, 16),
                  D=torch.ones(heads, device=device), rmsnorm_weight=torch.ones(d_inner, device=device, dtype=dtype),
                  outproj_weight=torch.randn(config.d_model, d_inner, device=device, dtype=dtype) * d_inner ** -0.5)
    kwargs = dict(chunk_size=config.chunk_size, activation="silu", rmsnorm_eps=config.norm_eps, headdim=P,
                  ngroups=G, norm_before_gate=False)
    return inputs, kwargs


def bench_cuda_scans(repeats: int) -> None:
    cuda = torch.device("cuda")
    rows = []
    preset = PRESETS["1b_mamba"]
    mixer_inputs, mixer_kwargs = split_conv1d_scan_inputs(4, 2048, ModelConfig(model_type="mamba", **preset["model"]),
                                                          cuda, torch.bfloat16)
    cases = [("mamba2 mixer op (1b_mamba layer)", mamba_split_conv1d_scan_combined_fused,
              mamba_split_conv1d_scan_combined_ref, mixer_inputs, mixer_kwargs),
             ("mamba2 SSD (1b_mamba layer)", ssd_chunk_scan_fused, ssd_chunk_scan_ref,
              ssd_inputs(4, 2048, 64, 64, 128, cuda, torch.bfloat16), dict(chunk_size=256, dt_softplus=True)),
             ("mamba1 selective (d 4096, N 16)", selective_scan_fused, selective_scan_ref,
              scan_inputs(4, 4096, 2048, 16, cuda, torch.bfloat16), dict(delta_softplus=True))]
    for name, fused, ref, inputs, kwargs in cases:
        try:
            with torch.no_grad():
                out_f, out_r = fused(**inputs, **kwargs), ref(**inputs, **kwargs)
            diff = max_rel_diff(out_f, out_r)
            t_fused = timed(fwd_bwd(fused, inputs, **kwargs), repeats, cuda)
            t_ref = timed(fwd_bwd(ref, inputs, **kwargs), repeats, cuda)
            rows.append([name, f"{diff:.2e}", f"{t_fused * 1e3:.2f}", f"{t_ref * 1e3:.2f}", f"{t_ref / t_fused:.1f}x"])
        except Exception as error:  # noqa: BLE001
            rows.append([name, "-", "-", "-", f"failed: {type(error).__name__}: {error}"])
    print_table("CUDA scans, bf16 inputs, forward+backward, B=4, L=2048",
                ["scan", "max rel diff", "fused ms", "reference ms", "speed-up"], rows)


def scan_flops_per_token(config: ModelConfig) -> float:
    """SSD forward FLOPs per token and layer (formula in the module docstring)."""
    heads = config.expand * config.d_model // config.headdim
    Q, G, N, P = config.chunk_size, config.ngroups, config.d_state, config.headdim
    return 2 * Q * (G * N + heads * P) + 4 * heads * P * N


def bench_cuda_mfu(batch: int, repeats: int, peak: float) -> None:
    cuda = torch.device("cuda")
    model, preset = preset_model("1b_mamba", cuda, torch.bfloat16)
    config = model.config
    seqlen = config.max_seq_len
    model.train()
    model.gradient_checkpointing = False
    rows = []
    for label, context in (("fused", None), ("reference", reference_ops)):
        try:
            if context is None:
                tps = training_tokens_per_second(model, batch, seqlen, config.vocab_size, cuda, repeats)
            else:
                with context():
                    tps = training_tokens_per_second(model, batch, seqlen, config.vocab_size, cuda, repeats)
        except Exception as error:  # noqa: BLE001 - e.g. the reference running out of memory
            rows.append([label, "-", "-", f"failed: {type(error).__name__}: {str(error)[:80]}"])
            continue
        matmul_params = model.num_parameters(exclude_embeddings=True) + config.vocab_size * config.d_model
        flops = 6 * matmul_params + 3 * config.n_layers * scan_flops_per_token(config)
        rows.append([label, f"{tps:,.0f}", f"{flops / 1e9:.2f}", f"{100 * flops * tps / peak:.1f}%"])
    print_table(f"1b_mamba training step on one {torch.cuda.get_device_name()} (bf16 weights, AdamW, "
                f"micro-batch {batch} x {seqlen}; peak {peak / 1e12:.0f} TFLOP/s)",
                ["ops", "tokens/s", "GFLOP/token", "MFU"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--skip_scans", action="store_true")
    parser.add_argument("--skip_models", action="store_true")
    parser.add_argument("--keep_denormals", action="store_true",
                        help="do not flush denormals on CPU (flushing is what CPU training should use)")
    parser.add_argument("--gpu_batch", type=int, default=4, help="1b_mamba micro-batch on the GPU")
    parser.add_argument("--peak_tflops", type=float, default=H100_BF16_PEAK / 1e12)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    available, reason = fused_ops_status()
    print(f"torch {torch.__version__}; fused kernels: {'yes' if available else 'no'} ({reason})")
    print(f"denormals {'kept' if args.keep_denormals else 'flushed to zero'} on CPU")
    with contextlib.nullcontext() if args.keep_denormals else flush_denormals():
        if not args.skip_scans:
            bench_cpu_scans(args.lengths, args.repeats)
        if not args.skip_models:
            bench_cpu_models(args.repeats)
    if torch.cuda.is_available():
        bench_cuda_scans(args.repeats)
        if not args.skip_models:
            bench_cuda_mfu(args.gpu_batch, args.repeats, args.peak_tflops * 1e12)


if __name__ == "__main__":
    main()

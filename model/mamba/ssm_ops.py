"""Ops shared by both Mamba mixers, and the lazy loading of the fused GPU kernels.

Every op is a pair with one signature, as in mamba-ssm (`selective_scan_fn` / `selective_scan_ref`):
`*_fused` calls the mamba-ssm / causal-conv1d kernel, `*_ref` is this project's PyTorch (what CPU runs and what
tests compare against), and the plain name dispatches: fused when the tensor is on CUDA and the kernel imported,
reference otherwise. The scans themselves live in model/mamba/ssd_scan.py (Mamba-2) and model/mamba/selective_scan.py
(Mamba-1).

The kernels are imported on first use, never at module import: on a CPU machine nothing in `mamba_ssm` imports
(its package `__init__` imports the compiled `selective_scan_cuda`), and Triton may fail in many ways, so any
Exception counts as "not available" and its message is kept for the env check (`fused_ops_status`).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

# Which kernel comes from where. The Mamba-2 scan, its decode step and the gated RMSNorm are Triton (compiled at
# first call, no build step); Mamba-1's selective scan and all of causal-conv1d are CUDA C++ (nvcc builds).
_KERNEL_SOURCES: dict[str, tuple[str, str]] = {
    "causal_conv1d_fn": ("causal_conv1d", "causal_conv1d_fn"),
    "causal_conv1d_update": ("causal_conv1d", "causal_conv1d_update"),
    "mamba_chunk_scan_combined": ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"),
    "mamba_split_conv1d_scan_combined": ("mamba_ssm.ops.triton.ssd_combined", "mamba_split_conv1d_scan_combined"),
    "selective_state_update": ("mamba_ssm.ops.triton.selective_state_update", "selective_state_update"),
    "rmsnorm_fn": ("mamba_ssm.ops.triton.layernorm_gated", "rmsnorm_fn"),
    "selective_scan_fn": ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn"),
    "mamba_inner_fn": ("mamba_ssm.ops.selective_scan_interface", "mamba_inner_fn"),
}

_kernels: dict[str, Callable[..., Any]] | None = None
_failures: dict[str, str] = {}
_force_reference = False


def _import_without_package_init(module_name: str) -> Any:
    """Import a submodule of a package whose `__init__` fails, registering the package without running it.

    mamba-ssm's `__init__` imports the nvcc-built `selective_scan_cuda` (absent from a MAMBA_SKIP_CUDA_BUILD
    install, which still has the Triton kernels Mamba-2 needs) and, through its generation utilities, names that
    transformers 5 removed (GreedySearchDecoderOnlyOutput). The kernel modules themselves need neither.
    """
    root = module_name.split(".")[0]
    if root not in sys.modules:
        spec = importlib.util.find_spec(root)
        if spec is None or spec.submodule_search_locations is None:
            raise ImportError(f"no package {root!r}")
        sys.modules[root] = importlib.util.module_from_spec(spec)  # __path__ set, __init__ not executed
    return importlib.import_module(module_name)


def _import_kernel(module_name: str, attr: str) -> Callable[..., Any]:
    try:
        module = importlib.import_module(module_name)
    except Exception:
        root = module_name.split(".")[0]
        if root == module_name or root in sys.modules:  # the package imported: the failure is the module's own
            raise
        module = _import_without_package_init(module_name)
    return getattr(module, attr)


def _load_kernels() -> dict[str, Callable[..., Any]]:
    global _kernels
    if _kernels is not None:
        return _kernels
    _kernels = {}
    if not torch.cuda.is_available():
        reason = "CUDA not available (CPU-only torch or no GPU): the reference PyTorch ops are used"
        _failures.update({name: reason for name in _KERNEL_SOURCES})
        return _kernels
    for name, (module_name, attr) in _KERNEL_SOURCES.items():
        try:
            _kernels[name] = _import_kernel(module_name, attr)
        except Exception as error:  # noqa: BLE001 - any failure (ImportError, OSError, Triton errors) = unavailable
            _failures[name] = f"{module_name}.{attr}: {type(error).__name__}: {error}"
    return _kernels


def fused_kernel(name: str) -> Callable[..., Any] | None:
    """The fused kernel `name` (a key of _KERNEL_SOURCES), or None when it did not import."""
    return _load_kernels().get(name)


# The kernels each mixer's training path needs (decoding also uses causal_conv1d_update and selective_state_update).
_KERNELS_FOR = {"mamba2": ("mamba_split_conv1d_scan_combined", "mamba_chunk_scan_combined", "rmsnorm_fn",
                           "causal_conv1d_fn"),
                "mamba1": ("mamba_inner_fn", "selective_scan_fn", "causal_conv1d_fn")}


def fused_ops_status(ssm_type: str | None = None) -> tuple[bool, str]:
    """(True when the fused kernels imported, a one-line reason) for the env check: all of them, or those the
    training path of `ssm_type` ('mamba2' or 'mamba1') needs."""
    kernels = _load_kernels()
    wanted = _KERNELS_FOR[ssm_type] if ssm_type else tuple(_KERNEL_SOURCES)
    missing = sorted(set(wanted) - set(kernels))
    if not missing:
        return True, "mamba-ssm and causal-conv1d kernels available"
    reasons = sorted({_failures[name] for name in missing})
    return False, f"fused kernels missing: {', '.join(missing)} ({'; '.join(reasons)})"


def fused_ops_report() -> dict[str, str]:
    """Per kernel: 'ok' or why it did not import."""
    kernels = _load_kernels()
    return {name: "ok" if name in kernels else _failures[name] for name in _KERNEL_SOURCES}


@contextlib.contextmanager
def reference_ops() -> Iterator[None]:
    """Run the reference ops even on CUDA (for parity tests and benchmarks)."""
    global _force_reference
    previous, _force_reference = _force_reference, True
    try:
        yield
    finally:
        _force_reference = previous


def use_fused(name: str, tensor: Tensor) -> bool:
    """Whether the dispatching op should call the fused kernel `name` for `tensor`."""
    return tensor.is_cuda and not _force_reference and fused_kernel(name) is not None


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Flush denormal floats to zero on CPU for the duration (restored after).

    SSM decays exp(dt * A) underflow into denormals, which x86 handles in microcode: measured ~7x faster CPU
    scans with flushing (docs/machine_notes.md). It changes results only below 1e-38, so the engine may enable
    it for CPU training; it is process-global, hence never set on import.
    """
    enabled = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if enabled:
            torch.set_flush_denormal(False)


def upcast(t: Tensor) -> Tensor:
    """t in fp32, or fp64 when it is fp64: the references compute in at least fp32 (as the kernels accumulate),
    and keep fp64 for gradcheck."""
    return t if t.dtype == torch.float64 else t.float()


# --------------------------------------------------------------------------------------------------------------
# Causal depthwise convolution (the short conv before the SSM; Gu & Dao 2023, section 3.4, Figure 3)
# --------------------------------------------------------------------------------------------------------------

def causal_conv1d_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None) -> Tensor:
    """Depthwise causal conv: x (B, D, L), weight (D, W), bias (D,) -> (B, D, L); activation None or 'silu'."""
    width = weight.size(-1)
    out = F.conv1d(F.pad(x, (width - 1, 0)), weight.unsqueeze(1), bias, groups=x.size(1))  # (B, D, L)
    return F.silu(out) if activation in ("silu", "swish") else out


def causal_conv1d_fused(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                        activation: str | None = None) -> Tensor:
    return fused_kernel("causal_conv1d_fn")(x, weight, bias, activation=activation)


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None) -> Tensor:
    fn = causal_conv1d_fused if use_fused("causal_conv1d_fn", x) else causal_conv1d_ref
    return fn(x, weight, bias, activation)


def causal_conv1d_update_ref(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None,
                             activation: str | None = None) -> Tensor:
    """One decode step: x (B, D), conv_state (B, D, W) holding the last W inputs, updated in place -> (B, D)."""
    conv_state.copy_(torch.cat([conv_state[:, :, 1:], x.unsqueeze(-1).to(conv_state.dtype)], dim=-1))
    out = (conv_state * weight).sum(-1)  # (B, D)
    if bias is not None:
        out = out + bias
    out = F.silu(out) if activation in ("silu", "swish") else out
    return out.to(x.dtype)


def causal_conv1d_update_fused(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None,
                               activation: str | None = None) -> Tensor:
    return fused_kernel("causal_conv1d_update")(x, conv_state, weight, bias, activation)


def causal_conv1d_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None,
                         activation: str | None = None) -> Tensor:
    fn = causal_conv1d_update_fused if use_fused("causal_conv1d_update", x) else causal_conv1d_update_ref
    return fn(x, conv_state, weight, bias, activation)


def conv_state_from_inputs(x: Tensor, width: int) -> Tensor:
    """The decode conv state (B, D, W) after a prefill of x (B, D, L): its last W inputs, zero-padded on the left."""
    return F.pad(x, (width - x.size(-1), 0)) if x.size(-1) < width else x[:, :, -width:].clone()


# --------------------------------------------------------------------------------------------------------------
# Gated RMSNorm of Mamba-2 (Dao & Gu 2024, section 7.4: a norm after the gate, for stability at scale)
# --------------------------------------------------------------------------------------------------------------

def rmsnorm_gated_ref(x: Tensor, weight: Tensor, z: Tensor | None = None, eps: float = 1e-5,
                      group_size: int | None = None, norm_before_gate: bool = False) -> Tensor:
    """RMSNorm over groups of group_size channels of x (..., D), gated by silu(z): norm(x * silu(z)) or, with
    norm_before_gate, norm(x) * silu(z). Computed in fp32, returned in x's dtype."""
    dtype = x.dtype
    h = upcast(x)
    if z is not None and not norm_before_gate:
        h = h * F.silu(upcast(z))
    group_size = group_size or h.size(-1)
    grouped = h.unflatten(-1, (h.size(-1) // group_size, group_size))  # (..., G, D/G)
    h = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2)  # (..., D)
    h = h * upcast(weight)
    if z is not None and norm_before_gate:
        h = h * F.silu(upcast(z))
    return h.to(dtype)


def rmsnorm_gated_fused(x: Tensor, weight: Tensor, z: Tensor | None = None, eps: float = 1e-5,
                        group_size: int | None = None, norm_before_gate: bool = False) -> Tensor:
    return fused_kernel("rmsnorm_fn")(x, weight, None, z=z, eps=eps, group_size=group_size,
                                      norm_before_gate=norm_before_gate)


def rmsnorm_gated(x: Tensor, weight: Tensor, z: Tensor | None = None, eps: float = 1e-5,
                  group_size: int | None = None, norm_before_gate: bool = False) -> Tensor:
    fn = rmsnorm_gated_fused if use_fused("rmsnorm_fn", x) else rmsnorm_gated_ref
    return fn(x, weight, z, eps, group_size, norm_before_gate)


# --------------------------------------------------------------------------------------------------------------
# One recurrent step of the SSM, both mixers (mamba-ssm's `selective_state_update`)
# --------------------------------------------------------------------------------------------------------------

def selective_state_update_ref(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                               D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
                               dt_softplus: bool = False) -> Tensor:
    """h <- exp(dt A) h + dt B x;  y = C h + D x (times silu(z)). `state` is updated in place.

    Mamba-1 layout: state (B, D, N), x/dt/z (B, D), A (D, N), B/C (B, N), D/dt_bias (D,).
    Mamba-2 layout: state (B, H, P, N), x/dt/z (B, H, P), A (H, P, N), B/C (B, G, N), D/dt_bias (H, P)
    (dt, A, D and dt_bias are constant over P and N in Mamba-2; expanded views cost nothing).
    Returns y like x.
    """
    has_heads = state.dim() == 4
    if not has_heads:  # give Mamba-1 one head so both layouts share the code below
        state, x, dt, A = state.unsqueeze(1), x.unsqueeze(1), dt.unsqueeze(1), A.unsqueeze(0)
        B, C = B.unsqueeze(1), C.unsqueeze(1)
        z = z.unsqueeze(1) if z is not None else None
        D = D.unsqueeze(0) if D is not None else None
        dt_bias = dt_bias.unsqueeze(0) if dt_bias is not None else None
    heads, groups = state.size(1), B.size(1)
    dt = upcast(dt)
    if dt_bias is not None:
        dt = dt + upcast(dt_bias)
    if dt_softplus:
        dt = F.softplus(dt)
    dA = torch.exp(dt.unsqueeze(-1) * upcast(A))  # (B, H, P, N)
    Bh = upcast(B).repeat_interleave(heads // groups, dim=1).unsqueeze(2)  # (B, H, 1, N)
    Ch = upcast(C).repeat_interleave(heads // groups, dim=1).unsqueeze(2)  # (B, H, 1, N)
    new_state = upcast(state) * dA + (dt * upcast(x)).unsqueeze(-1) * Bh  # (B, H, P, N)
    state.copy_(new_state.to(state.dtype))
    y = (new_state * Ch).sum(-1)  # (B, H, P)
    if D is not None:
        y = y + upcast(x) * upcast(D)
    if z is not None:
        y = y * F.silu(upcast(z))
    y = y.to(x.dtype)
    return y if has_heads else y.squeeze(1)


def selective_state_update_fused(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                                 D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
                                 dt_softplus: bool = False) -> Tensor:
    return fused_kernel("selective_state_update")(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                                                  dt_softplus=dt_softplus)


def selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
                           dt_softplus: bool = False) -> Tensor:
    fn = selective_state_update_fused if use_fused("selective_state_update", x) else selective_state_update_ref
    return fn(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)

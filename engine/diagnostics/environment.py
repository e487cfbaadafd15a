"""Facts about the machine a run needs, each as a Check with a status and the fix when it fails.

DeepSpeed's op facts come from its own API (the op builders `ds_report` prints, their `is_compatible`, and
`installed_ops` from its build), not from scraping `ds_report`'s text. Statuses: 'ok'; 'info' (a fact, nothing
wrong); 'warn' (training can start, something is slower or missing); 'fail' (training cannot start).
"""
from __future__ import annotations

import importlib.metadata
import io
import os
import platform
import shutil
import subprocess
import sys
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

MIN_PYTHON = (3, 10)
MIN_TORCH = (2, 5)
"""nn.RMSNorm needs torch 2.4 and SDPA's enable_gqa 2.5 (model/transformer/model.py)."""
REQUIRED_PACKAGES = ("sentencepiece", "datasets", "tensorboard", "safetensors", "pyyaml", "numpy",
                     "tqdm", "pydantic")
FAIL_FREE_BYTES, WARN_FREE_BYTES = 1 << 30, 10 << 30
"""Below 1 GiB even a small run's checkpoints cannot be written; below 10 GiB a 1B model's (~16 GB with optimizer
state per checkpoint) cannot."""


@dataclass(frozen=True, kw_only=True)
class Check:
    """One line of the environment table."""

    name: str
    """What was checked."""
    status: str
    """'ok', 'info', 'warn' or 'fail'."""
    detail: str
    """What was found."""
    fix: str = ""
    """What to do when the status is 'warn' or 'fail'."""


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_python() -> Check:
    version = platform.python_version()
    if sys.version_info[:2] < MIN_PYTHON:
        return Check(name="python", status="fail", detail=version, fix="install Python 3.10 or newer")
    return Check(name="python", status="ok", detail=f"{version} ({sys.executable})")


def check_torch() -> list[Check]:
    import torch

    checks = []
    if _version_tuple(torch.__version__) < MIN_TORCH:
        checks.append(Check(name="torch", status="fail", detail=torch.__version__,
                            fix="pip install torch==2.13.0 (2.5 or newer is needed)"))
    else:
        checks.append(Check(name="torch", status="ok", detail=torch.__version__))
    if not torch.cuda.is_available():
        build = f"torch built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only torch build"
        checks.append(Check(name="CUDA", status="info", detail=f"not available ({build}); training runs on the CPU"))
        return checks
    names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    checks.append(Check(name="CUDA", status="ok", detail=f"{torch.cuda.device_count()} GPU(s) ({', '.join(names)}), "
                        f"CUDA runtime {torch.version.cuda}, driver {nvidia_driver_version() or 'unknown'}"))
    return checks


def nvidia_driver_version() -> str | None:
    """The NVIDIA driver version from nvidia-smi, or None without it."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def deepspeed_op_facts() -> list[dict[str, object]]:
    """Per DeepSpeed op of the current accelerator: installed (prebuilt), compatible (JIT-buildable here) and
    built (already in the JIT cache), read from DeepSpeed's op builders as ds_report does."""
    from deepspeed.git_version_info import installed_ops
    from deepspeed.ops.op_builder.all_ops import ALL_OPS
    from torch.utils.cpp_extension import _get_build_directory

    facts = []
    for name, builder in ALL_OPS.items():
        sink = io.StringIO()
        try:
            with redirect_stdout(sink):  # builders print their reasons; the table gives the verdict
                compatible = bool(builder.is_compatible(verbose=False))
        except Exception:  # noqa: BLE001  (ds_report's probe_is_compatible treats a failing probe the same way)
            compatible = False
        try:
            built = any(Path(_get_build_directory(builder.name, verbose=False)).glob("*.so"))
        except Exception:  # noqa: BLE001
            built = False
        facts.append({"op": name, "installed": bool(installed_ops.get(name, False)), "compatible": compatible,
                      "built": built})
    return facts


def check_deepspeed() -> list[Check]:
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except Exception as err:  # noqa: BLE001  (an import can fail in many ways; all mean "not usable")
        return [Check(name="deepspeed", status="fail", detail=f"{type(err).__name__}: {err}",
                      fix="pip install deepspeed==0.19.8 (see requirements.txt)")]
    from torch.utils.cpp_extension import is_ninja_available

    checks = [Check(name="deepspeed", status="ok",
                    detail=f"{deepspeed.__version__}, accelerator {get_accelerator().device_name()}")]
    checks.append(Check(name="ninja (JIT ops)", status="ok" if is_ninja_available() else "warn",
                        detail="found" if is_ninja_available() else "missing",
                        fix="" if is_ninja_available() else "pip install ninja (needed to build cpu_adam for offload)"))
    facts = deepspeed_op_facts()
    usable = [f["op"] for f in facts if f["installed"] or f["compatible"]]
    built = [f["op"] for f in facts if f["installed"] or f["built"]]
    detail = f"compatible or installed: {', '.join(usable) or 'none'}; built: {', '.join(built) or 'none'}"
    # The ds_config uses torch's AdamW (launcher/ds_config.py: no FusedAdam build), so the one op a run may need
    # is DeepSpeedCPUAdam, for optimizer offload (ZeRO-Offload), on every accelerator.
    needed = "cpu_adam"
    ok = needed in usable
    checks.append(Check(name="deepspeed ops", status="ok" if ok else "warn", detail=detail,
                        fix="" if ok else "offload needs cpu_adam: install a C++ compiler (g++) and ninja"))
    return checks


def check_mamba_kernels(cuda: bool) -> Check:
    from model.mamba.ssm_ops import fused_ops_status

    available, reason = fused_ops_status()
    if available:
        return Check(name="mamba-ssm kernels", status="ok", detail=reason)
    if not cuda:
        return Check(name="mamba-ssm kernels", status="info",
                     detail="CPU: Mamba runs on the project's PyTorch scans (fused kernels are CUDA-only)")
    return Check(name="mamba-ssm kernels", status="warn", detail=reason,
                 fix="pip install -r requirements-gpu.txt (see docs/mamba.md); without them Mamba trains on the "
                     "slower PyTorch scans")


def check_flash_attention() -> Check:
    import torch

    if not torch.cuda.is_available():
        return Check(name="FlashAttention (SDPA)", status="info", detail="no CUDA: SDPA uses its CPU kernels")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 2, 16, 64, device="cuda", dtype=torch.bfloat16)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    except RuntimeError as err:
        return Check(name="FlashAttention (SDPA)", status="warn", detail=f"not usable: {str(err).splitlines()[0]}",
                     fix="needs an sm80+ GPU (Ampere or newer) and a CUDA build of torch; attention falls back to "
                         "the memory-efficient kernel")
    return Check(name="FlashAttention (SDPA)", status="ok", detail="flash kernel ran (bf16, causal)")


def check_packages() -> list[Check]:
    checks = []
    for name in REQUIRED_PACKAGES:
        try:
            checks.append(Check(name=name, status="ok", detail=importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            checks.append(Check(name=name, status="fail", detail="not installed",
                                fix="pip install -r requirements.txt"))
    return checks


def check_free_disk(label: str, folder: str | Path) -> Check:
    path = Path(folder).resolve()
    existing = next(p for p in (path, *path.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    detail = f"{free / 2**30:.1f} GiB free at {existing}"
    if free < FAIL_FREE_BYTES:
        return Check(name=f"disk: {label}", status="fail", detail=detail, fix=f"free space or move {label}")
    if free < WARN_FREE_BYTES:
        return Check(name=f"disk: {label}", status="warn", detail=detail,
                     fix=f"large models need tens of GB per checkpoint: free space or move {label}")
    return Check(name=f"disk: {label}", status="ok", detail=detail)


def environment_checks(*, cache_dir: str | Path, checkpoint_dir: str | Path) -> list[Check]:
    """Every check but the training run, in the order of the table."""
    import torch

    checks = [check_python(), *check_torch(), *check_deepspeed(),
              check_mamba_kernels(torch.cuda.is_available()), check_flash_attention(), *check_packages(),
              check_free_disk("data cache", cache_dir), check_free_disk("checkpoints", checkpoint_dir)]
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        checks.append(Check(name="JIT build cache", status="info", detail=os.environ["TORCH_EXTENSIONS_DIR"]))
    return checks


def render_table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'check':<{width}}  status  detail", f"{'-' * width}  ------  ------"]
    for c in checks:
        lines.append(f"{c.name:<{width}}  {c.status.upper():<6}  {c.detail}")
        if c.fix and c.status in ("warn", "fail"):
            lines.append(f"{'':<{width}}  {'':<6}  fix: {c.fix}")
    return "\n".join(lines)

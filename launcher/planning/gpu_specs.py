"""Peak dense tensor-core throughput of common GPUs, the denominator of MFU (model FLOPs utilisation).

Dense figures (NVIDIA datasheets print sparse ones, twice as large, for Hopper, Ada and Ampere), 16-bit inputs
with fp32 accumulation, the mode bf16/fp16 training uses:
- H200 SXM: 989 TFLOP/s bf16 (NVIDIA H200 Tensor Core GPU datasheet, 2024: 1,979 with sparsity).
- H100 SXM: 989; H100 NVL: 835; H100 PCIe: 756 (NVIDIA H100 datasheet, 2023: 1,979 / 1,671 / 1,513 sparse).
- A100 (SXM and PCIe): 312 (NVIDIA A100 datasheet, 2021: 624 with sparsity).
- L40S: 362 (NVIDIA L40S datasheet, 2023: 733 with sparsity).
- RTX 4090: 165.2 fp16/bf16 with fp32 accumulate (NVIDIA Ada Lovelace architecture whitepaper v1.0, appendix A).
- RTX 3090: 71 fp16/bf16 with fp32 accumulate (NVIDIA Ampere GA102 GPU architecture whitepaper, table 9).
Measured on the project's H200 (docs/machine_notes.md): a bf16 matmul reaches 770-800 TFLOP/s of the 989.
"""
from __future__ import annotations

PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
)
"""(substring of torch.cuda.get_device_name(), dense bf16 TFLOP/s), most specific name first."""


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Dense 16-bit tensor-core peak of the GPU called `device_name`, or None when it is not in the table or
    the precision is fp32 (MFU is quoted for 16-bit training)."""
    if precision not in ("bf16", "fp16"):
        return None
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None

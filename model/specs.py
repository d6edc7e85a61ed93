"""Datasheet peaks of the GPUs the model test judges, keyed by the name JAX reports for a device
(`device_kind`, the CUDA device name, which is also nvidia-smi's). Dense figures, never the
"with sparsity" ones; the matmul figure is for the dtype named (bf16 with FP32 accumulation,
which is what XLA's bf16 dot does; fp16 on GPUs without bf16 tensor cores). Host links are per
direction: PCIe 3.0 x16 15.75 GB/s, 4.0 x16 31.5 GB/s, 5.0 x16 63 GB/s. NVLink figures are per
GPU per direction (half the datasheet's bidirectional total).
"""

from __future__ import annotations

import dataclasses
import re

PCIE_GBPS = {3: 15.75, 4: 31.5, 5: 63.0}  # x16, per direction, after 128b/130b encoding


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    matmul_tflops: float | None  # dense, in `matmul_dtype`
    memory_gbps: float
    pcie_gen: int
    nvlink_gbps: float | None = None  # per direction; None: no NVLink (or an optional bridge)
    matmul_dtype: str = "bfloat16"


SPECS: list[tuple[str, Spec]] = [  # (regex on device_kind, spec); first match wins
    # NVIDIA B200 datasheet (HGX B200): BF16 4.5 PFLOPS sparse; HBM3e 8 TB/s; NVLink 5 1.8 TB/s
    (r"^NVIDIA B200\b", Spec("B200", 2250.0, 8000.0, 5, 900.0)),
    # NVIDIA H200 datasheet: SXM BF16 1,979 TFLOPS sparse, NVL 1,671; 4.8 TB/s; NVLink 900 GB/s
    (r"^NVIDIA H200 NVL\b", Spec("H200 NVL", 835.5, 4800.0, 5, 450.0)),
    (r"^NVIDIA H200\b", Spec("H200 SXM", 989.5, 4800.0, 5, 450.0)),
    # NVIDIA GH200 Grace Hopper datasheet: BF16 1,979 TFLOPS sparse; 96 GB HBM3 4 TB/s, 144 GB
    # HBM3e 4.9 TB/s; the host link is NVLink-C2C, 900 GB/s (450 per direction), not PCIe
    (r"^NVIDIA GH200.*HBM3e", Spec("GH200 144 GB", 989.5, 4900.0, 5, 450.0)),
    (r"^NVIDIA GH200\b", Spec("GH200 96 GB", 989.5, 4000.0, 5, 450.0)),
    # NVIDIA H100 datasheet: SXM 1,979 / NVL 1,671 / PCIe 1,513 TFLOPS BF16 sparse;
    # 3.35 / 3.9 / 2.0 TB/s; NVLink 900 GB/s (SXM), 600 GB/s bridge (NVL)
    (r"^NVIDIA H100 NVL\b", Spec("H100 NVL", 835.5, 3900.0, 5, 300.0)),
    (r"^NVIDIA H100 PCIe\b", Spec("H100 PCIe", 756.5, 2000.0, 5)),
    (r"^NVIDIA H100 80GB HBM3\b|^NVIDIA H100 SXM", Spec("H100 SXM", 989.5, 3350.0, 5, 450.0)),
    # NVIDIA A100 datasheet: BF16 312 TFLOPS dense; SXM4 80 GB 2,039 GB/s, 40 GB 1,555 GB/s,
    # PCIe 80 GB 1,935 GB/s, 40 GB 1,555 GB/s; NVLink 3 600 GB/s (SXM)
    (r"^NVIDIA A100-SXM4-80GB\b", Spec("A100 SXM4 80 GB", 312.0, 2039.0, 4, 300.0)),
    (r"^NVIDIA A100-SXM4-40GB\b", Spec("A100 SXM4 40 GB", 312.0, 1555.0, 4, 300.0)),
    (r"^NVIDIA A100 80GB PCIe\b", Spec("A100 PCIe 80 GB", 312.0, 1935.0, 4)),
    (r"^NVIDIA A100-PCIE-40GB\b", Spec("A100 PCIe 40 GB", 312.0, 1555.0, 4)),
    # NVIDIA A10 datasheet: BF16 125 TFLOPS dense, 600 GB/s. The A10G (AWS G5) has no NVIDIA
    # datasheet: its memory is the A10's (600 GB/s, AWS), its tensor rate is lower and
    # unpublished, so its matmul is judged against its siblings only
    (r"^NVIDIA A10G\b", Spec("A10G", None, 600.0, 4)),
    (r"^NVIDIA A10\b", Spec("A10", 125.0, 600.0, 4)),
    # NVIDIA L4 datasheet: BF16 242 TFLOPS sparse, 300 GB/s; L40S: BF16 733 sparse, 864 GB/s
    (r"^NVIDIA L4\b", Spec("L4", 121.0, 300.0, 4)),
    (r"^NVIDIA L40S\b", Spec("L40S", 366.5, 864.0, 4)),
    # NVIDIA T4 datasheet: mixed-precision (FP16/FP32) 65 TFLOPS, 320 GB/s; no bf16 tensor cores
    (r"^Tesla T4\b", Spec("T4", 65.0, 320.0, 3, matmul_dtype="float16")),
    # NVIDIA V100 datasheet: tensor 125 (SXM2) / 112 (PCIe) / 130 (V100S) TFLOPS FP16, 900 GB/s
    # (V100S 1,134 GB/s), NVLink 2 300 GB/s (SXM2); no bf16
    (r"^Tesla V100-SXM2", Spec("V100 SXM2", 125.0, 900.0, 3, 150.0, "float16")),
    (r"^Tesla V100S", Spec("V100S PCIe", 130.0, 1134.0, 3, matmul_dtype="float16")),
    (r"^Tesla V100", Spec("V100 PCIe", 112.0, 900.0, 3, matmul_dtype="float16")),
    # NVIDIA Tesla P100 datasheet (PCIe 16 GB): FP16 18.7 TFLOPS (no tensor cores), 732 GB/s
    (r"^Tesla P100-PCIE", Spec("P100 PCIe", 18.7, 732.0, 3, matmul_dtype="float16")),
    # GeForce: the spec pages' "AI TOPS" are FP8 with sparsity; bf16 with FP32 accumulation,
    # dense, is an eighth of them (Ada whitepaper: RTX 4090 165.2 TFLOPS = 1,321 / 8).
    # RTX 4090: 1,321 AI TOPS, 1,008 GB/s; RTX 4080 SUPER: 836 AI TOPS, 736 GB/s
    (r"^NVIDIA GeForce RTX 4090\b", Spec("RTX 4090", 165.2, 1008.0, 4)),
    (r"^NVIDIA GeForce RTX 4080 SUPER\b", Spec("RTX 4080 SUPER", 104.5, 736.0, 4)),
    # NVIDIA Ampere GA102 whitepaper: RTX 3090 FP16/BF16 tensor with FP32 accumulate 71 TFLOPS
    # dense, 936 GB/s
    (r"^NVIDIA GeForce RTX 3090\b", Spec("RTX 3090", 71.0, 936.0, 4)),
]
MIG_RE = re.compile(r"\bMIG\b")


def spec_for(kind: str) -> tuple[Spec | None, str | None]:
    """(the datasheet entry, None) for a known device kind, else (None, why it has none)."""
    if MIG_RE.search(kind):
        return None, (f"{kind} is a MIG slice: the datasheet gives no per-slice peaks, so it is "
                      "judged against its sibling slices only")
    for pattern, spec in SPECS:
        if re.search(pattern, kind):
            return spec, None
    return None, f"no datasheet entry for {kind!r}: judged against its siblings only"

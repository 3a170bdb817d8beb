"""What each GPU type and its node can do: the facts the cost model (step_time.py) runs on, each with its source.

Peaks and bandwidths are datasheet figures; what kernels and NCCL reach of them is measured by others and cited here,
never fitted per case. The network is counted per node: NCCL runs one ring channel per NIC and reaches their
aggregate (measured all-gather bus bandwidth 85-96 GB/s on 4 x HDR InfiniBand per 8 x A100, i.e. ~90% of the
node's 100 GB/s), so a ring that spans nodes moves at the node's NIC aggregate, not one NIC's speed.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.metrics import peak_flops
from pipeline.planning.memory import GIB

# Share of a node's NIC line rate NCCL's rings reach across nodes (nccl-tests all-gather bus bandwidth 85-96 GB/s on
# 4 x 200 Gb/s HDR per 8 x A100, against 100 GB/s of line rate).
NIC_EFFICIENCY = 0.9
# Share of datasheet HBM bandwidth that elementwise and reduction kernels reach (STREAM-like copies, e.g. BabelStream
# on A100 and H100: 80-90%); the low end, since norms and losses are not pure copies.
HBM_EFFICIENCY = 0.8


@dataclass(frozen=True)
class Gpu:
    """One GPU type and the node it typically comes in."""

    name: str
    peak_flops: float            # dense bf16 tensor-core peak: pipeline/metrics.py's, the one table of them
    memory: float                # bytes
    matmul_flops: float          # bf16 matmul FLOP/s a best-shaped GEMM sustains on a busy node (see GPUS)
    attention_efficiency: float  # share of peak that FlashAttention-2's forward + backward reaches
    hbm_bytes_per_s: float       # datasheet
    nvlink_bus_bytes_per_s: float  # NCCL all-gather bus bandwidth inside one node, measured
    nics_per_node: int           # the compute fabric of the typical 8-GPU node
    nic_gbps: float              # Gb/s per NIC


# Sources:
# - peaks: pipeline/metrics.py (datasheets), read by name; memory, HBM: NVIDIA's A100 (2039 GB/s 80 GB SXM, 1555 GB/s
#   40 GB), H100 SXM (3.35 TB/s) and H200 (4.8 TB/s, 141 GB) datasheets.
# - matmul_flops: stas00/ml-engineering, compute/accelerator (Maximum Achievable Matmul FLOPS, mamf-finder): A100 SXM
#   267.9 TFLOP/s (no throttling at 400 W: the burst figure is the sustained one); Hopper's 700 W board throttles
#   under sustained GEMMs: H200 MSMF with all 8 GPUs busy 698.6 TFLOP/s (the burst MAMF, 792-828, is not what a
#   training step sees); H100 SXM is the same die, clocks and power limit.
# - attention_efficiency: FlashAttention-2 (Dao 2023) reaches 50-73% of A100 peak forward + backward; on H100 it
#   reaches ~35% (FlashAttention-3 paper, Shah et al. 2024), the kernel the GPU machine here runs (PyTorch's flash).
# - nvlink_bus_bytes_per_s: NCCL's own tuning model caps an A100's bus bandwidth at 235 GB/s (src/graph/tuning.cc,
#   compute capability 8.0), ~80% of NVLink 3's 300 GB/s per direction, as nccl-tests measure on DGX A100;
#   H100/H200 NVLink 4 (450 GB/s per direction) at the same 80%: 360 GB/s.
# - NICs: DGX A100 8 x 200 Gb/s HDR (also MosaicML's 1600 Gb/s per A100 node); DGX H100/H200 8 x 400 Gb/s NDR.
A100_NCCL_BUS = 235e9
NVLINK_REACH = A100_NCCL_BUS / 300e9  # ~0.8: what NCCL reaches of NVLink's per-direction bandwidth


def peak_of(name: str) -> float:
    """The bf16 peak pipeline/metrics.py holds for a GPU of this name."""
    peak = peak_flops(name)
    if peak is None:
        raise ValueError(f"{name}: no bf16 peak in pipeline/metrics.py")
    return peak


GPUS = {
    "a100-40g": Gpu("A100 40GB", peak_of("A100 40GB"), 40 * GIB, 267.9e12, 0.6, 1555e9, A100_NCCL_BUS, 8, 200.0),
    "a100-80g": Gpu("A100 80GB", peak_of("A100 80GB"), 80 * GIB, 267.9e12, 0.6, 2039e9, A100_NCCL_BUS, 8, 200.0),
    "h100": Gpu("H100 SXM 80GB", peak_of("H100 SXM 80GB"), 80 * GIB, 698.6e12, 0.35, 3350e9, NVLINK_REACH * 450e9, 8,
                400.0),
    "h200": Gpu("H200 141GB", peak_of("H200 141GB"), 141e9, 698.6e12, 0.35, 4800e9, NVLINK_REACH * 450e9, 8, 400.0),
}


@dataclass(frozen=True)
class Network:
    """A node's links: NVLink bus bandwidth inside it, its NICs to the others."""

    nvlink_bus_bytes_per_s: float
    nics_per_node: int
    nic_gbps: float

    @property
    def node_bytes_per_s(self) -> float:
        """What a ring across nodes reaches: the node's NIC aggregate at NCCL's efficiency, at most NVLink's."""
        return min(self.nics_per_node * self.nic_gbps * 1e9 / 8 * NIC_EFFICIENCY, self.nvlink_bus_bytes_per_s)


def gpu_named(name: str) -> Gpu:
    if name not in GPUS:
        raise ValueError(f"--gpu {name}: choose from {', '.join(GPUS)}")
    return GPUS[name]


def network_for(gpu: Gpu, nics_per_node: int | None = None, nic_gbps: float | None = None,
                nvlink_bus_gbps: float | None = None) -> Network:
    """The GPU type's typical node, with any figure given replacing its default (bandwidths in Gb/s)."""
    nvlink = gpu.nvlink_bus_bytes_per_s if nvlink_bus_gbps is None else nvlink_bus_gbps * 1e9 / 8
    return Network(nvlink, gpu.nics_per_node if nics_per_node is None else nics_per_node,
                   gpu.nic_gbps if nic_gbps is None else nic_gbps)


# torch.cuda.get_device_name() substrings, the more specific first: what a measured step ran on.
DEVICE_NAMES = (("H200", "h200"), ("H100", "h100"), ("A100-SXM4-80GB", "a100-80g"), ("A100 80GB", "a100-80g"),
                ("A100", "a100-40g"))


def gpu_for_device(device_name: str) -> str:
    """The GPUS key of a CUDA device name."""
    key = next((k for name, k in DEVICE_NAMES if name in device_name), None)
    if key is None:
        raise ValueError(f"device {device_name!r}: not one of the GPU types planned for ({', '.join(GPUS)})")
    return key

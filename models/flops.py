"""Model FLOPs per training sample and the peak they are measured against (for MFU).

The formula, for every workload: model FLOPs per sample = the FLOPs of the matrix
multiplications, convolutions and attention products (2 per multiply-add) of one forward
and one backward pass of a training step, divided by the micro-batch size. They are
counted by torch.utils.flop_counter.FlopCounterMode on a copy of the model built on the
meta device (no weights, no compute), once per run, from the first real batch:
- frozen parts (a frozen text encoder) count their forward only, trained parts forward
  and backward (about 3x the forward: PaLM appendix B, Kaplan et al. 2020);
- activation recomputation is not counted (MFU, not hardware FLOPs utilization);
- elementwise work (norms, activations, the optimizer) is not counted.
For the transformer LM this is 6 N + 12 L d T per token (PaLM's formula; `lm_flops_per_token`
checks it in tests).

MFU = model FLOPs per sample x samples/s / (ranks x peak FLOP/s of one rank's device).
The peak: `trainer.peak_tflops` when set, else the dense tensor-core peak of a known GPU
(below), else on a CPU a matmul probe measured once per machine and thread count.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate.utils import send_to_device
from torch.utils.flop_counter import FlopCounterMode

# dense peak TFLOP/s per device (no sparsity), from the vendors' data sheets
GPU_PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


def train_flops_per_sample(workload, batch: Any, batch_size: int) -> float:
    """Model FLOPs of one training step per sample (see the module doc); raises if the
    workload's loss cannot run on the meta device (e.g. it needs values on the host)."""
    with torch.device("meta"):
        model = workload.build_model()
    model.eval()  # no dropout; our blocks recompute activations only in training mode
    for m in model.modules():  # diffusers/transformers recompute whenever grads are on
        if getattr(m, "gradient_checkpointing", False) is True:
            m.gradient_checkpointing = False
    counter = FlopCounterMode(display=False)
    with counter:
        loss = workload.flops_loss(model, send_to_device(batch, "meta"))
        if loss.requires_grad:
            loss.backward()
    return counter.get_total_flops() / batch_size


def lm_flops_per_token(n_params_nonembedding: int, layers: int, dim: int, seq_len: int) -> float:
    """PaLM's training FLOPs per token: 6 N + 12 L d T (attention scores and values, not
    halved for causal masks)."""
    return 6 * n_params_nonembedding + 12 * layers * dim * seq_len


def gpu_peak_tflops(name: str, precision: str) -> Optional[float]:
    for key, table in GPU_PEAK_TFLOPS.items():  # "H100 PCIe" before "H100"
        if key in name:
            return table[precision]
    return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_peak_tflops(cache: Optional[Path] = None, probe_s: float = 0.5) -> float:
    """fp32 matmul TFLOP/s of this process's threads, probed once per machine, thread count
    and ranks per node (ranks probe together, so they share the cores as in training)."""
    cache = cache or Path(os.environ.get("TRIBUTARY_CACHE", Path.home() / ".cache" / "tributary")) / "cpu_peak.json"
    key = f"{_cpu_name()} | threads={torch.get_num_threads()} | local ranks={os.environ.get('LOCAL_WORLD_SIZE', '1')}"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    n = 2048  # the matmul of docs/platform-notes.md (~141-316 GFLOP/s on 2 build-machine cores)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    best = 0.0  # the best of 5 short bursts: a burst that shared the cores reads low
    for _ in range(5):
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < probe_s / 5:
            torch.mm(a, b)
            done += 1
        best = max(best, 2 * n**3 * done / (time.perf_counter() - t0) / 1e12)
    tflops = best
    known[key] = round(tflops, 4)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(cache)
    except OSError:
        pass  # a read-only home: probe again next time
    return known[key]


def peak_tflops(device: torch.device, mixed_precision: str, configured: float = 0.0) -> tuple[Optional[float], str]:
    """(peak TFLOP/s of one rank's device, where the number came from)."""
    if configured > 0:
        return configured, "trainer.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        precision = mixed_precision if mixed_precision in ("bf16", "fp16") else (
            "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
        peak = gpu_peak_tflops(name, precision)
        return peak, f"{name} {precision} data sheet" if peak else f"unknown GPU '{name}': set trainer.peak_tflops"
    if device.type == "cpu":
        return cpu_peak_tflops(), f"fp32 matmul probe, {torch.get_num_threads()} thread(s)"
    return None, f"no peak known for {device.type}: set trainer.peak_tflops"

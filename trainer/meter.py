"""How fast training goes: samples/s, the data-wait share, TFLOP/s per rank and MFU over a
log window, and the peak FLOP/s MFU is measured against.

MFU = model FLOPs per sample (models/flops.py) x samples/s / (ranks x peak FLOP/s of one
rank's device). The peak: `trainer.peak_tflops` when set, else the dense tensor-core peak of
a known GPU (below), else on a CPU a matmul probe measured once per machine and thread count.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

# dense peak TFLOP/s per device (no sparsity), from the vendors' data sheets
GPU_PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


def gpu_peak_tflops(name: str, precision: str) -> float | None:
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


def cpu_peak_tflops(cache: Path | None = None, probe_s: float = 0.5) -> float:
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


def peak_tflops(device: torch.device, mixed_precision: str, configured: float = 0.0) -> tuple[float | None, str]:
    """(peak TFLOP/s of one rank's device, where the number came from)."""
    if configured > 0:
        return configured, "trainer.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        precision = (
            mixed_precision
            if mixed_precision in ("bf16", "fp16")
            else ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
        )
        peak = gpu_peak_tflops(name, precision)
        return peak, f"{name} {precision} data sheet" if peak else f"unknown GPU '{name}': set trainer.peak_tflops"
    if device.type == "cpu":
        return cpu_peak_tflops(), f"fp32 matmul probe, {torch.get_num_threads()} thread(s)"
    return None, f"no peak known for {device.type}: set trainer.peak_tflops"


class ThroughputMeter:
    """Training time of one log window: the hangers-on (eval, samples, saves) run `paused()`,
    and the one-off FLOP count is not training time either."""

    def __init__(
        self,
        workload,
        *,
        samples_per_step: int,
        world_size: int,
        peak: float | None,
        count_flops: bool,
        say: Callable[[str], None] = print,
    ):
        self.workload, self.samples_per_step, self.world_size, self.peak = workload, samples_per_step, world_size, peak
        self.say = say
        self.flops_per_sample: float | None = None if count_flops else 0.0  # counted on one rank
        self.start_window()

    def start_window(self, now: float | None = None) -> None:
        self.start = time.perf_counter() if now is None else now
        self.steps, self.data_wait = 0, 0.0

    @contextlib.contextmanager
    def waiting_for_data(self):
        t0 = time.perf_counter()
        yield
        self.data_wait += time.perf_counter() - t0

    @contextlib.contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - t0

    def count_flops_once(self, batch, batch_size: int) -> None:
        """Model FLOPs per sample from the first batch; a model it cannot count still trains."""
        if self.flops_per_sample is not None:
            return
        with self.paused():
            try:
                self.flops_per_sample = float(self.workload.flops_per_sample(batch, batch_size))
                if not self.flops_per_sample:
                    self.say(
                        "perf/mfu is not logged: the model has no matrix multiplications, convolutions "
                        "or attention products to count (0 model FLOPs per sample, models/flops.py)"
                    )
            except Exception as exc:  # noqa: BLE001 - MFU is a gauge
                self.flops_per_sample = 0.0
                self.say(
                    f"perf/mfu is not logged: the model's FLOPs could not be counted on the "
                    f"meta device ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                )

    def measure(self, now: float) -> dict[str, float]:
        """This window's rates (this rank's data wait), in the log's names."""
        elapsed = now - self.start
        samples_per_s = self.steps * self.samples_per_step / elapsed
        out = {"train/samples_per_s": samples_per_s, "train/data_wait_frac": self.data_wait / elapsed}
        unit = self.workload.throughput_unit
        if unit != "samples":
            out[f"perf/{unit}_per_s"] = samples_per_s * self.workload.units_per_sample()
        if self.flops_per_sample:
            tflops = self.flops_per_sample * samples_per_s / self.world_size / 1e12
            out["perf/tflops_per_rank"] = tflops
            if self.peak:
                out["perf/mfu"] = tflops / self.peak
        return out

"""Per-rank memory of DDP against DeepSpeed ZeRO-1/2/3 on 2 CPU ranks (gloo), and step time.

    .venv/bin/python -m benchmarks.zero_memory [--configs ddp,zero1,zero2,zero3]
                                               [--layers 12] [--width 2048] [--batch 8]
                                               [--steps 6] [--timeout 300] [--retries 2]

Every configuration runs as its own 2-process job (`torchrun --standalone --nproc_per_node 2`
on this module with `--worker CONFIG`), so peak RSS is that configuration's alone. The
model is an MLP stack (Linear(width, width) + GELU, `layers` times; 12 x 2048 = 50.4M
fp32 parameters) on random data; the optimizer is a plain torch AdamW (no fused/CPUAdam
compile). DDP is torch DistributedDataParallel (defaults: bucket 25 MB, separate bucket
buffers); ZeRO is `deepspeed.initialize(model=..., optimizer=AdamW, config=...)` after
`deepspeed.init_distributed(dist_backend="gloo")`.

Tensor accounting (bytes a rank holds; each storage counted once, by
`untyped_storage().data_ptr()`, in the first category that claims it):

* param_bytes: the model's weights this rank holds. DDP and ZeRO-1/2: the module's
  parameter storages (ZeRO-1/2 turn them into views of one flat buffer, `bit16_groups_flat`).
  ZeRO-3: every parameter's partition `p.ds_tensor`, plus whatever `p.data` still holds
  (persistent small params; empty for released ones).
* master_bytes: the optimizer's own fp32 copy of this rank's partition
  (`single_partition_of_fp32_groups` in stage 1/2, `fp32_partitioned_groups_flat` in stage
  3). DeepSpeed clones it even when the model is already fp32. 0 for DDP.
* grad_bytes: gradients held right after backward, before the optimizer step (their
  peak). DDP: `p.grad` of every parameter. ZeRO-1/2: module `p.grad`, the averaged
  gradient partitions (`averaged_gradients`, `grads_in_partition`, `all_grad_tensors`), the
  fp32 partition's `.grad`. ZeRO-3: `grad_partitions_flat_buffer` (the per-rank gradient
  partitions), `averaged_gradients`, module `p.grad`.
* optim_bytes: the torch AdamW state the rank holds (exp_avg, exp_avg_sq, step), read
  after a step.
* comm_buffer_bytes: reduction buffers that are neither of the above: DDP's bucket
  tensors (recorded through a pass-through allreduce comm hook), ZeRO's IPG bucket buffers.
* census: every tensor reachable from the ZeRO optimizer object (or the DDP module and
  optimizer), unique storages grouped by attribute path: what the categories missed.

Process memory: peak RSS (`ru_maxrss`), RSS at phases (before the model is built =
baseline, after the model is built, after wrapping, after backward, after step, end) and
`rss_delta_bytes` = peak - baseline. Step time: median of `steps` forward+backward+step
after two warm-up steps; the fraction of the machine's CPU that other processes used in
that window is reported, and a configuration whose window was busier than 10% is rerun
(`--retries`). Numbers are rank 0's; rank 1's peak RSS is given too. Expected values
(ZeRO paper, N ranks): optimizer state / N from stage 1, gradients / N from stage 2,
parameters / N at stage 3.

Earlier lines are per-configuration JSON; the last line is one JSON object keyed by
configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

CONFIGS = ("ddp", "zero1", "zero2", "zero3")
STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}
WORLD = 2
BUSY_OTHER_FRAC = 0.10


# ----------------------------------------------------------------- worker side
def rss() -> int:
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def resident_bytes(ptr: int, nbytes: int) -> int:
    """Bytes of [ptr, ptr + nbytes) that are in RAM now (present bits of /proc/self/pagemap):
    a tensor from torch.empty that was never written takes address space, not memory."""
    import numpy as np

    page = os.sysconf("SC_PAGE_SIZE")
    first, last = ptr // page, (ptr + nbytes - 1) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = np.frombuffer(f.read((last - first + 1) * 8), dtype=np.uint64)
    return int(((entries >> np.uint64(63)) & np.uint64(1)).sum()) * page


class RssSampler:
    """Largest RSS seen in each named phase (a thread sampling every 10 ms)."""

    def __init__(self):
        import threading

        self.phase, self.peaks = "start", {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            value = me.memory_info().rss
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), value)
            self._stop.wait(0.01)

    def set(self, phase: str) -> None:
        value = rss()
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), value)
        self.phase = phase

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return self.peaks


class Ledger:
    """Unique storages, each in the first category that claims it."""

    def __init__(self):
        self.owner: dict[int, str] = {}
        self.size: dict[int, int] = {}

    def add(self, category: str, tensors) -> None:
        import torch

        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            s = t.untyped_storage()
            if s.nbytes() == 0:
                continue
            key = s.data_ptr()
            if key not in self.owner:
                self.owner[key], self.size[key] = category, s.nbytes()

    def bytes(self, category: str) -> int:
        return sum(self.size[k] for k, c in self.owner.items() if c == category)

    def resident(self, category: str | None = None) -> int:
        return sum(resident_bytes(k, self.size[k]) for k, c in self.owner.items() if category is None or c == category)

    def total(self) -> int:
        return sum(self.size.values())

    def summary(self) -> dict:
        cats = sorted(set(self.owner.values()))
        return {
            "bytes": {c: self.bytes(c) for c in cats},
            "resident_bytes": {c: self.resident(c) for c in cats},
            "total_bytes": self.total(),
            "total_resident_bytes": self.resident(),
        }


def flat_tensors(obj, depth: int = 0):
    """Tensors in nested lists/tuples/dicts (values)."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 6 and isinstance(obj, (list, tuple, set)):
        for x in obj:
            yield from flat_tensors(x, depth + 1)
    elif depth < 6 and isinstance(obj, dict):
        for x in obj.values():
            yield from flat_tensors(x, depth + 1)


def census(roots: dict, max_depth: int = 5) -> dict:
    """Unique storages reachable from each root object, grouped by attribute path; each
    storage is named once (the first path that reaches it, breadth first)."""
    import torch
    from torch import nn

    seen_obj: set[int] = set()
    seen_storage: set[int] = set()
    out: dict[str, int] = {}
    queue = [(name, obj, 0) for name, obj in roots.items()]
    while queue:
        path, obj, depth = queue.pop(0)
        if isinstance(obj, torch.Tensor):
            s = obj.untyped_storage()
            if obj.device.type != "meta" and s.nbytes() and s.data_ptr() not in seen_storage:
                seen_storage.add(s.data_ptr())
                key = path.split("[")[0]
                size, res = out.get(key, (0, 0))
                out[key] = (size + s.nbytes(), res + resident_bytes(s.data_ptr(), s.nbytes()))
            if hasattr(obj, "ds_tensor") and obj.ds_tensor is not None:
                queue.append((path + ".ds_tensor", obj.ds_tensor, depth + 1))
            if obj.grad is not None:
                queue.append((path + ".grad", obj.grad, depth + 1))
            continue
        if id(obj) in seen_obj or depth > max_depth:
            continue
        seen_obj.add(id(obj))
        if isinstance(obj, (str, bytes, int, float, bool, type(None))):
            continue
        if isinstance(obj, dict):
            for k, v in list(obj.items()):
                queue.append((f"{path}[{k!r}]" if not isinstance(k, torch.Tensor) else f"{path}[t]", v, depth + 1))
        elif isinstance(obj, (list, tuple, set, frozenset)):
            for i, v in enumerate(list(obj)):
                queue.append((f"{path}[{i}]", v, depth + 1))
        elif isinstance(obj, nn.Module):
            for p in obj.parameters(recurse=True):
                queue.append((f"{path}.param", p, depth + 1))
            for b in obj.buffers(recurse=True):
                queue.append((f"{path}.buffer", b, depth + 1))
        elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("deepspeed", "torch"):
            for k, v in list(vars(obj).items()):
                queue.append((f"{path}.{k}", v, depth + 1))
    return {k: {"bytes": v[0], "resident_bytes": v[1]} for k, v in sorted(out.items(), key=lambda kv: -kv[1][0])}


def build_model(layers: int, width: int):
    from torch import nn

    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*blocks)


def worker(config: str, args) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # 2 ranks on 2 cores
    rank_env = int(os.environ["RANK"])
    if config == "ddp":
        dist.init_process_group("gloo")
    else:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    assert rank == rank_env and world == WORLD, (rank, world)

    phases = {"baseline": rss()}
    sampler = RssSampler()
    sampler.set("build")
    torch.manual_seed(0)
    model = build_model(args.layers, args.width)
    num_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    phases["model_built"] = rss()
    sampler.set("wrap")

    bucket_tensors: dict[int, torch.Tensor] = {}
    if config == "ddp":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        from torch.nn.parallel import DistributedDataParallel as DDP

        engine = DDP(model)

        def recording_allreduce(state, bucket):  # DDP's own allreduce; notes the bucket tensor
            buf = bucket.buffer()
            bucket_tensors[buf.untyped_storage().data_ptr()] = buf
            return allreduce_hook(state, bucket)

        engine.register_comm_hook(None, recording_allreduce)
        zero_opt = None
    else:
        import deepspeed

        ds_config = {
            "train_micro_batch_size_per_gpu": args.batch,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": STAGES[config]},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        engine, zero_opt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    phases["wrapped"] = rss()
    module = engine.module
    inner_opt = optimizer if zero_opt is None else zero_opt.optimizer

    gen = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(args.batch, args.width, generator=gen)
    y = torch.randn(args.batch, args.width, generator=gen)

    def forward_backward():
        bucket_tensors.clear()  # DDP rebuilds its buckets after the first step: keep only live ones
        loss = torch.nn.functional.mse_loss(engine(x), y)
        if zero_opt is None:
            loss.backward()
        else:
            engine.backward(loss)
        return loss

    def optimizer_step():
        if zero_opt is None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            engine.step()

    def account() -> Ledger:
        """Every tensor the rank holds now, by category (order = precedence)."""
        led = Ledger()
        params = list(module.parameters())
        if config == "zero3":
            led.add("param", [p.ds_tensor for p in params])
            led.add("param", [p.data for p in params])  # persistent (small) params; empty otherwise
            led.add("master", zero_opt.fp32_partitioned_groups_flat)
            led.add("grad", [zero_opt.grad_partitions_flat_buffer])
        else:
            led.add("param", params)
            if zero_opt is not None:
                led.add("master", zero_opt.single_partition_of_fp32_groups)
        led.add("grad", [p.grad for p in params if p.grad is not None])
        if zero_opt is not None:
            led.add("grad", flat_tensors(zero_opt.averaged_gradients))
            led.add("grad", flat_tensors(getattr(zero_opt, "grads_in_partition", None)))
            led.add("grad", flat_tensors(getattr(zero_opt, "all_grad_tensors", {})))
            masters = (
                zero_opt.fp32_partitioned_groups_flat if config == "zero3" else zero_opt.single_partition_of_fp32_groups
            )
            led.add("grad", [m.grad for m in masters if m.grad is not None])
        led.add("optim", [t for st in inner_opt.state.values() for t in st.values()])
        if zero_opt is not None:
            led.add("comm", flat_tensors([b.buffer for b in getattr(zero_opt, "ipg_buckets", {}).values()]))
        led.add("comm", bucket_tensors.values())
        return led

    def take_census() -> dict:
        if rank != 0:
            return {}
        return census({"optimizer": zero_opt if zero_opt is not None else optimizer, "module": module})

    sampler.set("step1_fwd_bwd")
    forward_backward()
    sampler.set("step1_opt")
    optimizer_step()

    # step 2, measured: gradients at their peak (after backward), optimizer state after the step
    sampler.set("step2_fwd_bwd")
    forward_backward()
    phases["after_backward"] = rss()
    sampler.set("measure")
    after_backward, census_after_backward = account(), take_census()
    sampler.set("step2_opt")
    optimizer_step()
    phases["after_step"] = rss()
    sampler.set("measure")
    after_step, census_after_step = account(), take_census()

    # timed steps
    times, other_fracs = [], []
    dist.barrier()
    sampler.set("timed")
    me = psutil.Process()
    for _ in range(args.steps):
        sys0, own0, t0 = psutil.cpu_times(), me.cpu_times(), time.perf_counter()
        forward_backward()
        optimizer_step()
        t1, sys1, own1 = time.perf_counter(), psutil.cpu_times(), me.cpu_times()
        times.append(t1 - t0)
        own = (own1.user - own0.user) + (own1.system - own0.system)
        owns = [None] * world
        dist.all_gather_object(owns, own)
        busy = sum(getattr(sys1, f) - getattr(sys0, f) for f in ("user", "nice", "system", "irq", "softirq", "steal"))
        other_fracs.append(max(0.0, busy - sum(owns)) / ((t1 - t0) * psutil.cpu_count()))
    phases["end"] = rss()
    phase_peaks = sampler.stop()

    ab, st = after_backward.summary(), after_step.summary()
    result = {
        "config": config,
        "rank": rank,
        "world_size": world,
        "num_params": num_params,
        "param_bytes": after_step.bytes("param"),
        "master_bytes": after_step.bytes("master"),
        "grad_bytes": after_backward.bytes("grad"),
        "optim_bytes": after_step.bytes("optim"),
        "comm_buffer_bytes": max(after_backward.bytes("comm"), after_step.bytes("comm")),
        "comm_buffer_resident_bytes": max(after_backward.resident("comm"), after_step.resident("comm")),
        "tensor_bytes_after_backward": ab["total_bytes"],
        "tensor_resident_bytes_after_backward": ab["total_resident_bytes"],
        "tensor_bytes_after_step": st["total_bytes"],
        "tensor_resident_bytes_after_step": st["total_resident_bytes"],
        "ledger_after_backward": ab,
        "ledger_after_step": st,
        "peak_rss_bytes": peak_rss(),
        "baseline_rss_bytes": phases["baseline"],
        "rss_delta_bytes": peak_rss() - phases["baseline"],
        "rss_phases_bytes": phases,
        "rss_phase_peaks_bytes": phase_peaks,
        "step_s": statistics.median(times),
        "step_times_s": [round(t, 4) for t in times],
        "other_processes_cpu_frac": round(statistics.median(other_fracs), 3),
        "census_after_backward": census_after_backward,
        "census_after_step": census_after_step,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------- parent side
def kill_tree(proc: subprocess.Popen) -> None:
    """torchrun's elastic agent puts the ranks in their own sessions: walk the tree."""
    try:
        parent = psutil.Process(proc.pid)
        procs = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def heavy_others(own_pids: set[int], threshold: float = 20.0) -> list[str]:
    """Other processes using more than `threshold`% of a core over 0.5 s (what `ps` shows)."""
    procs = [p for p in psutil.process_iter(["pid", "name", "cmdline"]) if p.pid not in own_pids]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(0.5)
    busy = []
    for p in procs:
        try:
            pct = p.cpu_percent(None)
            if pct > threshold:
                busy.append(f"{p.pid} {pct:.0f}% {' '.join(p.info['cmdline'] or [p.info['name']])[:120]}")
        except psutil.Error:
            pass
    return busy


def expected(config: str, num_params: int) -> dict:
    p = 4 * num_params  # fp32
    stage = STAGES.get(config, 0)
    return {
        "param_bytes": p // WORLD if stage >= 3 else p,
        "grad_bytes": p // WORLD if stage >= 2 else p,
        "optim_bytes": 2 * p // WORLD if stage >= 1 else 2 * p,
    }


def run_config(config: str, args) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"zero_memory_{config}_") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(WORLD),
            "-m",
            "benchmarks.zero_memory",
            "--worker",
            config,
            "--out",
            tmp,
            "--layers",
            str(args.layers),
            "--width",
            str(args.width),
            "--batch",
            str(args.batch),
            "--steps",
            str(args.steps),
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        log = Path(tmp) / "log.txt"
        t0 = time.monotonic()
        with open(log, "w") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=Path(__file__).resolve().parent.parent,
            )
            try:
                rc = proc.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                kill_tree(proc)
                rc = None
        wall = time.monotonic() - t0
        results = {}
        for r in range(WORLD):
            f = Path(tmp) / f"rank{r}.json"
            if f.exists():
                results[r] = json.loads(f.read_text())
        if rc != 0 or 0 not in results:
            tail = log.read_text()[-4000:]
            why = "timed out" if rc is None else f"exit code {rc}"
            raise RuntimeError(f"{config}: {why} after {wall:.0f} s\n{tail}")
    res = results[0]
    res["rank1_peak_rss_bytes"] = results.get(1, {}).get("peak_rss_bytes")
    res["job_wall_s"] = round(wall, 1)
    res["expected"] = expected(config, res["num_params"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", choices=CONFIGS)
    ap.add_argument("--out")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per 2-process job")
    ap.add_argument("--retries", type=int, default=2, help="reruns of a job timed under load")
    ap.add_argument(
        "--wait-idle",
        type=float,
        default=180.0,
        help="seconds to wait for other heavy processes to end before each job",
    )
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args)
        return

    summary = {}
    for config in args.configs.split(","):
        for attempt in range(args.retries + 1):
            deadline = time.monotonic() + args.wait_idle
            while (busy_before := heavy_others({os.getpid()})) and time.monotonic() < deadline:
                time.sleep(5)  # another heavy process (a build, a test run): wait for it a while
            res = run_config(config, args)
            res["busy_processes_before"] = busy_before
            res["attempts"] = attempt + 1
            if res["other_processes_cpu_frac"] <= BUSY_OTHER_FRAC:
                break
            print(
                json.dumps(
                    {
                        "config": config,
                        "rerun": "timed under load",
                        "other_processes_cpu_frac": res["other_processes_cpu_frac"],
                        "busy_processes_before": busy_before,
                    }
                ),
                flush=True,
            )
        res["timed_under_load"] = res["other_processes_cpu_frac"] > BUSY_OTHER_FRAC
        print(json.dumps(res), flush=True)
        summary[config] = {
            k: res[k]
            for k in (
                "param_bytes",
                "grad_bytes",
                "optim_bytes",
                "peak_rss_bytes",
                "step_s",
                "master_bytes",
                "comm_buffer_bytes",
                "comm_buffer_resident_bytes",
                "tensor_bytes_after_backward",
                "tensor_resident_bytes_after_backward",
                "tensor_bytes_after_step",
                "rss_delta_bytes",
                "baseline_rss_bytes",
                "rank1_peak_rss_bytes",
                "num_params",
                "other_processes_cpu_frac",
                "timed_under_load",
                "expected",
            )
        }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()

"""Checkpoint cost as the model and the rank count grow: the earlier full-gather path against
the sharded one (DCP), in the same processes.

    python -m benchmarks.checkpoint_scale                      # 50M, 200M, 400M byte-level LMs
    python -m benchmarks.checkpoint_scale --sizes 50M --dir /tmp/ckpt-bench   # on the local disk

Each configuration is a real `torchrun` launch (2 CPU ranks over gloo, or 1) of the byte-level
LM of configs/lm/causal_1k.yaml at a given width and depth, under Accelerate FSDP2, DDP or
DeepSpeed ZeRO-3. It trains one step (so AdamW's moments exist), then saves and loads by
  old:   the code this repository had before DCP: the whole model and optimizer state gathered
         onto rank 0 (FSDP2: full_state_dict with cpu_offload; ZeRO-3: plus the 16-bit gather),
         written and sha256-hashed by rank 0; loaded by rank 0 and broadcast (FSDP2), the
         digests re-checked by rank 0 alone;
  new:   trainer.checkpoint.Checkpointer as the trainer uses it (DCP shards, every rank writes,
         hashes with xxh3 and verifies its share);
  async: the same with trainer.checkpoint_async (the loop is blocked only while the state is
         copied to host memory); two saves, the second measured: the first also allocates
         the host copy (one per rank, kept for the run), whose first-touch page faults cost
         more than the copy itself on this VM (~0.6 vs ~14 GB/s).
Every rank samples its own RSS every millisecond; "extra" is the phase's peak over that rank's
RSS between training steps (weights and optimizer state resident). Allocations of 1 MiB and up
are mmapped (MALLOC_MMAP_THRESHOLD_), so memory freed by one phase is not reused by the next.

The default folder is /dev/shm: storage that keeps up with every writer, as a parallel file
system does for many nodes, so the numbers show the software's cost and how it divides among
ranks. On one local disk every path is bound by the disk's own write rate (printed first).
One JSON object per measurement, then a last line with the headline ratios for the largest FSDP2
model: rank0_extra_rss_frac_save/load, async_blocked_frac, save_time_2v1, load_time_2v1, rows.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

if not __package__:  # `python benchmarks/this.py`: the repo root on sys.path, as with -m
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"10M": (320, 8), "50M": (640, 10), "200M": (1024, 16), "400M": (1280, 20)}  # (dim, depth): ~12 dim^2 a block
PAGE = os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """This process's peak resident memory between start() and stop(), sampled every ms."""

    def __init__(self):
        self._stop = threading.Event()
        self.peak = 0

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.001)

    def __enter__(self):
        self.peak = self.now()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


# ---------------------------------------------------------------- the earlier path (baseline)
def old_save(b, model, optimizer, scheduler, path: Path) -> dict:
    """What Checkpointer.save did before DCP for the model and optimizer, marker included."""
    import torch
    from safetensors.torch import save_file

    from trainer.checkpoint import file_digest

    net = b.unwrap(model)
    if b.checkpoint_layout == "deepspeed":  # ZeRO-3: its partitions, then a 16-bit gather on rank 0
        b.engine.save_checkpoint(
            str(path), tag="deepspeed", save_latest=False, client_state={"universal_checkpoint_info": {}}
        )
        weights = b.engine._zero3_consolidated_16bit_state_dict()
        optim = None
    elif b.fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(net, options=full)
        optim = get_optimizer_state_dict(net, optimizer.optimizer, options=full)
    else:
        weights = net.state_dict() if b.is_main else None
        optim = optimizer.state_dict() if b.is_main else None
    if b.is_main:
        save_file(
            {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}, str(path / "model.safetensors")
        )
        if optim is not None:
            torch.save(optim, path / "optimizer.pt")
        torch.save(scheduler.state_dict(), path / "scheduler.pt")
        files = {
            p.relative_to(path).as_posix(): file_digest(p, "sha256") for p in sorted(path.rglob("*")) if p.is_file()
        }
        (path / "COMPLETE.json").write_text(json.dumps({"step": 1, "world_size": b.world_size, "files": files}))
    del weights, optim
    b.barrier()
    return _bytes_by_writer(path)


def _bytes_by_writer(path: Path) -> dict:
    """Bytes under `path` by the rank that wrote them: DeepSpeed's zero_pp_rank_<R>_ files by R,
    everything else by rank 0."""
    import re

    out: dict[int, int] = {}
    for p in path.rglob("*"):
        if p.is_file():
            m = re.search(r"zero_pp_rank_(\d+)_", p.name)
            r = int(m.group(1)) if m else 0
            out[r] = out.get(r, 0) + p.stat().st_size
    return out


# ---------------------------------------------------------------- one launch
def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from launch.recipes import load_recipe
    from models.registry import build_workload
    from trainer.backends import make_backend
    from trainer.checkpoint import Checkpointer, verify
    from trainer.loop import build_optimizer, lr_factor

    dim, depth = SIZES[args.size]
    strategy = {
        "fsdp": ["trainer.accelerate.strategy=fsdp"],
        "ddp": [],
        "zero3": ["trainer.backend=deepspeed", "trainer.deepspeed.zero_stage=3"],
    }[args.strategy]
    cfg = load_recipe(
        ROOT / "configs/lm/causal_1k.yaml",
        [
            f"run.dir={args.dir}",
            f"model.dim={dim}",
            f"model.depth={depth}",
            f"model.heads={dim // 64}",
            "model.seq_len=64",
            "data.batch_size=1",
            "trainer.dist_timeout_s=3600",
            *strategy,
        ],
    )
    b = make_backend(cfg)
    workload = build_workload(cfg.model)
    torch.manual_seed(0)
    model = workload.build_model()
    params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup=10, total=100, schedule="cosine", min_ratio=0.1)
    )
    model, optimizer = b.prepare(model, optimizer)
    batch = {"tokens": torch.randint(0, 256, (1, 65), device=b.device), "seed": torch.zeros(1, dtype=torch.long)}
    with PeakRSS() as train_peak:
        b.backward(workload.training_loss(model, batch))
        b.step(model, optimizer, 1.0)
        scheduler.step()
    gc.collect()
    steady = PeakRSS.now()
    root = Path(args.dir) / f"{args.size}-{args.strategy}-{b.world_size}"
    group = Checkpointer(root, b, keep_last_k=1).group

    def gather(value):
        out = [None] * b.world_size
        dist.all_gather_object(out, value, group=group) if group is not None else out.__setitem__(0, value)
        return out

    def timed(fn):
        """(wall seconds between barriers, this rank's peak RSS over steady, fn's result)."""
        b.barrier()
        with PeakRSS() as peak:
            t0 = time.perf_counter()
            result = fn()
            b.barrier()
            wall = time.perf_counter() - t0
        return wall, peak.peak - steady, result

    rows = []
    for path in args.paths.split(","):
        if path == "async" and b.checkpoint_layout == "deepspeed":
            continue
        if b.is_main:
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
        b.barrier()
        row = {
            "size": args.size,
            "params": params,
            "strategy": args.strategy,
            "ranks": b.world_size,
            "path": path,
            "steady_rss_gb": [round(x / 1e9, 3) for x in gather(steady)],
            "train_step_peak_rss_gb": [round(x / 1e9, 3) for x in gather(train_peak.peak)],
        }
        if path == "old":
            ckpt = root / "step-1"
            if b.is_main:
                ckpt.mkdir()
            b.barrier()
            save_s, save_extra, written = timed(lambda ckpt=ckpt: old_save(b, model, optimizer, scheduler, ckpt))
            verify_s, _, problem = timed(lambda ckpt=ckpt: verify(ckpt) if b.is_main else None)  # rank 0 alone
            if b.checkpoint_layout == "deepspeed":  # loads as the new path does
                load_s, load_extra = None, 0
            else:
                load_s, load_extra, _ = timed(lambda ckpt=ckpt: b._load_full_files(ckpt, model, optimizer))
            blocked_s = save_s
        else:
            ck = Checkpointer(root, b, keep_last_k=1, background=path == "async", timeout_s=3600)
            ck.group = group
            # async: the first save also allocates the host copy that later saves reuse; the
            # ones after it are what every later save costs. Each measurement is repeated and
            # the median kept (this VM's speed drifts 20-30% within seconds)
            saves, blocks, verifies, loads, save_extra, load_extra = [], [], [], [], 0, 0
            first = 1 if path == "async" else 0
            for step in range(1, args.repeats + first + 1):
                b.barrier()
                t0 = time.perf_counter()
                with PeakRSS() as peak:
                    ck.save(
                        step,
                        model=model,
                        optimizer=optimizer,
                        scheduler=scheduler,
                        trainer_state={"step": step},
                        data_state={"rank": b.rank},
                    )
                    blocked_s = time.perf_counter() - t0
                    ck.wait()
                    b.barrier()
                    save_s = time.perf_counter() - t0
                if step == 1:
                    row["first_save_blocked_s"] = round(max(gather(blocked_s)), 3)
                if step > first:
                    saves.append(save_s)
                    blocks.append(max(gather(blocked_s)))
                    save_extra = max(save_extra, peak.peak - steady)
                ckpt = root / f"step-{step}"
                if step > first:
                    verify_s, _, problem = timed(lambda ck=ck, ckpt=ckpt: ck.verify_shared(ckpt))
                    assert problem is None, problem
                    load_s, extra, _ = timed(
                        lambda ck=ck, ckpt=ckpt: ck.load(ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
                    )
                    verifies.append(verify_s)
                    loads.append(load_s)
                    load_extra = max(load_extra, extra)
            meta = json.loads((ckpt / "COMPLETE.json").read_text())
            written = {}
            for entry in meta["files"].values():
                written[entry["rank"]] = written.get(entry["rank"], 0) + entry["bytes"]
            row["repeats"] = {
                "save_s": [round(x, 3) for x in saves],
                "blocked_s": [round(x, 3) for x in blocks],
                "verify_s": [round(x, 3) for x in verifies],
                "load_s": [round(x, 3) for x in loads],
            }
            save_s, verify_s, load_s = statistics.median(saves), statistics.median(verifies), statistics.median(loads)
            blocked_s = statistics.median(blocks)
        assert problem is None, problem
        blocked = gather(blocked_s)
        row.update(
            {
                "save_s": round(save_s, 3),
                "blocked_s": round(max(blocked), 3),
                "verify_s": round(verify_s, 3),
                "load_s": None if load_s is None else round(load_s, 3),
                "extra_rss_save_gb": [round(x / 1e9, 3) for x in gather(save_extra)],
                "extra_rss_load_gb": [round(x / 1e9, 3) for x in gather(load_extra)],
                "bytes_written_gb": [round(written.get(r, 0) / 1e9, 3) for r in range(b.world_size)],
            }
        )
        row["extra_rss_frac_save"] = [round(e / s, 3) for e, s in zip(row["extra_rss_save_gb"], row["steady_rss_gb"])]
        row["extra_rss_frac_load"] = [round(e / s, 3) for e, s in zip(row["extra_rss_load_gb"], row["steady_rss_gb"])]
        rows.append(row)
        gc.collect()
    b.barrier()
    if b.is_main:
        shutil.rmtree(root, ignore_errors=True)
        for row in rows:
            print("ROW " + json.dumps(row), flush=True)
    b.end()


# ---------------------------------------------------------------- the driver
def launch(
    size: str, strategy: str, nproc: int, paths: str, folder: Path, threads: int, repeats: int = 3, cpu: bool = True
) -> list[dict]:
    """One torchrun launch's rows; cpu=False leaves the GPUs visible (one per rank, NCCL)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MALLOC_MMAP_THRESHOLD_=str(1 << 20), PYTHONUNBUFFERED="1")
    if cpu:
        env.update(ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "benchmarks.checkpoint_scale",
        "--worker",
        "--size",
        size,
        "--strategy",
        strategy,
        "--paths",
        paths,
        "--dir",
        str(folder),
        "--repeats",
        str(repeats),
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"{size} {strategy} x{nproc}: exit {out.returncode}\n{out.stderr[-4000:]}")
    rows = [json.loads(line[4:]) for line in out.stdout.splitlines() if line.startswith("ROW ")]
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def hash_rates(mb: int = 512) -> dict:
    """GB/s of each digest over the same bytes in memory, one core."""
    data = os.urandom(mb << 20)
    out = {}
    import xxhash

    algos = {
        "sha256": lambda: hashlib.sha256(data).digest(),
        "xxh3_128": lambda: xxhash.xxh3_128(data).digest(),
        "xxh64": lambda: xxhash.xxh64(data).digest(),
    }
    try:
        import google_crc32c

        algos["crc32c"] = lambda: google_crc32c.value(data)
    except ImportError:
        pass
    for name, fn in algos.items():
        t0 = time.perf_counter()
        fn()
        out[name] = round(len(data) / (time.perf_counter() - t0) / 1e9, 2)
    return out


def disk_rate(folder: Path, mb: int = 1024) -> float:
    """GB/s of one fsynced sequential write into `folder` (what a checkpoint's bytes meet)."""
    folder.mkdir(parents=True, exist_ok=True)
    f = folder / "disk-rate.tmp"
    block = os.urandom(16 << 20)
    t0 = time.perf_counter()
    with open(f, "wb") as out:
        for _ in range(mb // 16):
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    rate = mb * (1 << 20) / (time.perf_counter() - t0) / 1e9
    f.unlink()
    return round(rate, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", default="50M")
    ap.add_argument("--strategy", default="fsdp")
    ap.add_argument("--paths", default="old,new,async")
    ap.add_argument("--sizes", default="50M,200M,400M")
    ap.add_argument("--dir", default="/dev/shm/tributary-checkpoint-scale")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--repeats", type=int, default=3, help="saves and loads per measurement (median)")
    ap.add_argument("--rounds", type=int, default=2, help="1-rank / 2-rank launches, alternated")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    folder = Path(args.dir)
    sizes = args.sizes.split(",")
    largest = sizes[-1]
    print(
        json.dumps(
            {"hash_gb_per_s": hash_rates(), "storage": str(folder), "storage_fsync_write_gb_per_s": disk_rate(folder)}
        ),
        flush=True,
    )
    rows = []
    for size in sizes:
        rows += launch(size, "fsdp", 2, "old,new,async", folder, args.threads)
        # DDP keeps a whole replica per rank; its async staging copy of it too does not fit
        # beside two 400M replicas in 24 GiB
        rows += launch(size, "ddp", 2, "old,new" if size == "400M" else "old,new,async", folder, args.threads)
    rows += launch(largest, "zero3", 2, "old,new", folder, args.threads)
    # the same model on 1 rank and on 2, launched in turn round after round (A/B/A/B), so
    # that the machine's drift falls on both sides of the ratio
    scaling = []
    for _ in range(args.rounds):
        one = launch(largest, "fsdp", 1, "new", folder, args.threads, args.repeats)[0]
        two = launch(largest, "fsdp", 2, "new", folder, args.threads, args.repeats)[0]
        scaling.append({k: round(two[k] / one[k], 3) for k in ("save_s", "load_s", "verify_s")})
        rows += [dict(one, path="new (scaling round)"), dict(two, path="new (scaling round)")]
    shutil.rmtree(folder, ignore_errors=True)

    def pick(strategy, ranks, path):
        return next(
            r for r in rows if (r["size"], r["strategy"], r["ranks"], r["path"]) == (largest, strategy, ranks, path)
        )

    new2, async2 = pick("fsdp", 2, "new"), pick("fsdp", 2, "async")
    print(
        json.dumps(
            {
                "model": f"{largest} byte-level LM, FSDP2, 2 ranks",
                "rank0_extra_rss_frac_save": new2["extra_rss_frac_save"][0],
                "rank0_extra_rss_frac_load": new2["extra_rss_frac_load"][0],
                "async_blocked_frac": round(async2["blocked_s"] / new2["save_s"], 3),
                "save_time_2v1": statistics.median(r["save_s"] for r in scaling),
                "load_time_2v1": statistics.median(r["load_s"] for r in scaling),
                "verify_time_2v1": statistics.median(r["verify_s"] for r in scaling),
                "scaling_rounds": scaling,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()

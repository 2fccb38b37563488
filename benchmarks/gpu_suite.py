"""The numbers to take from a borrowed GPU machine, in one command of at most 8 minutes:

    python -m benchmarks.gpu_suite            # on the GPU machine (all its GPUs)
    python -m benchmarks.gpu_suite --smoke    # the same code paths on a CPU at tiny sizes (< 60 s)

Measurements, in the order they run (each with its own time budget; one that no longer fits
in what is left of --budget-s is skipped, and the JSON says why):
  lm_{125m,1b}_{softmax,flash}_{2k,8k}  bf16 MFU and tokens/s of the LM recipes
      (configs/lm/gpt2_125m*.yaml, llama_1b*.yaml; softmax = torch SDPA's flash kernels,
      flash = FLASH's gated attention units), each a real `launch.train` run (FSDP2 under
      torchrun over every GPU when there are several, else one process) read back as
      benchmarks/mfu.py reads one. Data: token windows of a stand-in tokenizer with the
      recipe's vocabulary (nothing is downloaded), made once per (vocabulary, context).
      The run is stopped once its log windows are written (no final checkpoint or eval).
  unet_{tiny,sd15}_{eager,compile}  images/s of a UNet2DConditionModel training step (bf16
      autocast, AdamW): the tiny recipe's UNet (configs/sd/tiny.yaml) and diffusers' default
      config, which is Stable Diffusion 1.5's UNet (cross-attention width 768, 64x64 latents),
      random weights; with and without torch.compile (compile time reported apart).
  overhead   benchmarks/overhead.py's Trainer-vs-bare-loop step ratio (small byte LM, Accelerate).
  checkpoint benchmarks/checkpoint_scale.py's sharded save / async save / load of a byte LM
      under FSDP2 on every GPU.
Every measurement runs in its own process group with a timeout; a failure is recorded with
its error text and the suite goes on. --smoke runs one softmax and one FLASH LM run (64
tokens, width 64), the UNets narrowed and eager (inductor did not compile the tiny UNet in
280 s on 2 CPU cores; --smoke-compile runs it anyway), and the rest in the suite's process.
Output: one JSON line per measurement, then a summary object as the last line: the
environment, every measurement (a number in "value", or "skipped"/"error" with the reason),
and the targets (LM MFU >= 0.50 on H100/H200-class GPUs, overhead ratio <= 1.03), reported as
met or not met, never failed on. The exit code is 0 whatever was measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if not __package__:  # `python benchmarks/this.py`: the repo root on sys.path, as with -m
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"lm_mfu_min": 0.50, "overhead_ratio_max": 1.03}
MFU_TARGET_GPUS = ("H100", "H200")  # the MFU target is for this class of GPU
# size -> (softmax recipe, FLASH twin, vocabulary of the tokenizer it is made for)
LM_SIZES = {"125m": ("gpt2_125m", "gpt2_125m_flash_8k", 50257), "1b": ("llama_1b", "llama_1b_flash_8k", 32000)}


@dataclass(kw_only=True)
class Scale:
    """What a measurement does at this scale: GPU sizes, or --smoke's tiny CPU ones."""

    budget_s: float
    lm_context: dict[str, int]  # "2k"/"8k" -> tokens
    lm_batch: dict[tuple[str, str], int]  # (size, context) -> sequences per rank
    lm_steps: dict[str, tuple[int, int]]  # size -> (steps, log_every)
    lm_budget_s: dict[str, float]
    lm_overrides: list[str] = field(default_factory=list)
    vocab: int = 0  # 0 = each recipe's own
    corpus_docs: int = 1000
    loader_workers: int = 1  # data.num_workers of the LM runs
    in_process: tuple[str, ...] = ()  # measurements run without a worker process of their own
    lm_runs: tuple[str, ...] = ()  # the LM measurements run (default: all)
    unet_batch: dict[str, int] = field(default_factory=dict)
    unet_steps: int = 20
    unet_budget_s: dict[str, float] = field(default_factory=dict)
    overhead_overrides: list[str] = field(default_factory=list)
    overhead_context: int = 1024
    overhead_budget_s: float = 60
    checkpoint: dict = field(default_factory=dict)
    checkpoint_budget_s: float = 60


GPU = Scale(
    budget_s=480,
    lm_context={"2k": 2048, "8k": 8192},
    lm_batch={("125m", "2k"): 16, ("125m", "8k"): 4, ("1b", "2k"): 8, ("1b", "8k"): 2},
    lm_steps={"125m": (30, 5), "1b": (20, 4)},
    lm_budget_s={"125m": 45, "1b": 60},
    unet_batch={"tiny": 64, "sd15": 8},
    unet_budget_s={"tiny_eager": 20, "sd15_eager": 30, "tiny_compile": 60, "sd15_compile": 120},
    overhead_overrides=["model.dim=512", "model.depth=8", "model.heads=8", "data.batch_size=8"],
    checkpoint={"size": "200M", "paths": "new,async", "repeats": 2, "threads": 4},
)
SMOKE = Scale(
    budget_s=75,  # ~35 s of CPU time; on 2 cores shared with other jobs the slack goes
    lm_context={"2k": 64, "8k": 128},
    lm_batch={("125m", "2k"): 2, ("125m", "8k"): 2, ("1b", "2k"): 2, ("1b", "8k"): 2},
    lm_steps={"125m": (6, 2), "1b": (6, 2)},
    lm_budget_s={"125m": 30, "1b": 30},
    lm_overrides=[
        "model.dim=64",
        "model.depth=2",
        "model.heads=2",
        "model.chunk_size=16",
        "model.qk_dim=16",
        "trainer.mixed_precision=no",
    ],
    vocab=512,
    corpus_docs=60,
    loader_workers=0,
    # a worker's start (torch + diffusers imports) costs ~10 s on 2 shared cores: here the
    # parent runs them (tests/test_gpu_suite.py checks run_group, the workers' harness)
    in_process=(
        "unet_tiny_eager",
        "unet_sd15_eager",
        "overhead",
        "checkpoint",
        "unet_tiny_compile",
        "unet_sd15_compile",
    ),
    lm_runs=("lm_125m_softmax_2k", "lm_125m_flash_2k"),  # each attention's recipe and overrides
    unet_batch={"tiny": 4, "sd15": 2},
    unet_steps=3,
    unet_budget_s={"tiny_eager": 20, "sd15_eager": 15, "tiny_compile": 60, "sd15_compile": 60},
    overhead_overrides=["model.dim=32", "model.depth=1", "model.heads=2", "data.batch_size=2", "data.num_workers=0"],
    overhead_context=64,
    overhead_budget_s=30,
    checkpoint={"size": "10M", "paths": "new", "repeats": 1, "threads": 1},
    checkpoint_budget_s=25,
)


# ---------------------------------------------------------------- processes
def run_group(cmd: list[str], timeout_s: float, env: dict | None = None, done=None) -> tuple[int | None, str, str]:
    """Run `cmd` in its own process group (torchrun's ranks included) until it exits, `done()`
    turns true or `timeout_s` passes; then the whole group is killed. Returns (exit code, or
    None when it was stopped; stdout; stderr)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=dict(env or os.environ, PYTHONUNBUFFERED="1"),
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            code = proc.poll()
            if code is not None:
                break
            if (done is not None and done()) or time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                if done is None or not done():
                    err.write(f"\n[gpu_suite] stopped after the {timeout_s:.0f} s budget")
                code = None
                break
            time.sleep(0.25)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # ranks left behind by a launcher that exited
        out.seek(0)
        err.seek(0)
        return code, out.read(), err.read()


def tail(text: str, chars: int = 1500) -> str:
    return text.strip()[-chars:]


# ---------------------------------------------------------------- data for the LM runs
def stand_in_tokenizer(path: Path, vocab_size: int) -> Path:
    """A word-level tokenizer.json with `vocab_size` ids (w0, w1, ..., <|endoftext|>): the
    recipe's vocabulary without a download (the ids' meaning does not change the step)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(vocab_size - 1)} | {"<|endoftext|>": vocab_size - 1}
    tok = Tokenizer(models.WordLevel(words, "w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


def corpus(work: Path, docs: int) -> Path:
    """Documents of the stand-in tokenizer's words (w0 ... w29999)."""
    folder = work / f"corpus-{docs}"
    if not folder.exists():
        tmp = work / f"corpus-{docs}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        for d in range(docs):
            (tmp / f"doc{d:04d}.txt").write_text(" ".join(f"w{(d * 7919 + i) % 30000}" for i in range(2000)))
        tmp.rename(folder)
    return folder


def token_shards(work: Path, s: Scale, vocab: int, seq_len: int, min_shards: int) -> tuple[Path, Path]:
    """(tokenizer.json, shard folder) of `vocab` ids at `seq_len`, made once per work folder."""
    tok = work / f"tokenizer-{vocab}.json"
    if not tok.exists():
        stand_in_tokenizer(tok, vocab)
    out = work / f"tokens-{vocab}-{seq_len}"
    argv = ["--tokenizer", str(tok), "--min-shards", str(min_shards), "--workers", "1"]
    make_text_shards(corpus(work, s.corpus_docs), out, seq_len, argv)
    return tok, out


def byte_shards(work: Path, s: Scale, seq_len: int) -> Path:
    out = work / f"bytes-{seq_len}"
    make_text_shards(corpus(work, s.corpus_docs), out, seq_len, ["--min-shards", "2"])
    return out


def make_text_shards(source: Path, out: Path, seq_len: int, argv: list[str]) -> None:
    """`launch.make_shards text` in this process (a process start costs more than the shards)."""
    import io

    from launch import make_shards

    if (out / "train").exists():
        return
    log = io.StringIO()
    argv = ["text", str(source), "--seq-len", str(seq_len), "--out", str(out), *argv]
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code = make_shards.main(argv + ["--val-fraction", "0.05", "--test-fraction", "0.05"])
    if code:
        shutil.rmtree(out, ignore_errors=True)
        raise RuntimeError(f"make_shards {' '.join(argv)}: exit {code}: {tail(log.getvalue(), 800)}")


# ---------------------------------------------------------------- measurements
def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def measure_lm(ctx: dict, size: str, attention: str, context: str, budget_s: float) -> dict:
    from benchmarks import mfu

    s: Scale = ctx["scale"]
    t0 = time.monotonic()
    softmax, flash, vocab = LM_SIZES[size]
    vocab = s.vocab or vocab
    recipe = f"configs/lm/{softmax if attention == 'softmax' else flash}.yaml"
    seq_len, ranks = s.lm_context[context], max(1, ctx["gpus"])
    tok, shards = token_shards(ctx["work"], s, vocab, seq_len, max(2, ranks * s.loader_workers))
    steps, log_every = s.lm_steps[size]
    run_dir = Path(tempfile.mkdtemp(prefix=f"tributary-gpu-suite-{size}-", dir=ctx["work"]))
    extra = [
        f"model.tokenizer={tok}",
        f"model.seq_len={seq_len}",
        *[f"data.{split}.urls={shards}/{split}" for split in ("train", "val", "test")],
        f"data.batch_size={s.lm_batch[size, context]}",
        "data.global_batch_size=0",  # one micro-batch per optimizer step
        f"data.num_workers={s.loader_workers}",
        "data.shuffle_buffer=16",
        f"trainer.accelerate.strategy={'fsdp' if ranks > 1 else 'ddp'}",  # ddp on 1 rank: no wrapper
        *s.lm_overrides,
    ]
    if size == "1b" and attention == "softmax" and s.lm_overrides:
        extra.append("model.mlp_hidden=128")  # the smoke width's SwiGLU
    args = mfu.train_args(recipe, run_dir, steps, log_every, extra)
    launcher = [sys.executable, "-m", "launch.train"]
    if ranks > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        launcher += ["-m", "launch.train"]
    jsonl = run_dir / "metrics.jsonl"

    def logged_all_windows() -> bool:  # stop before the final checkpoint, eval and samples
        try:
            return sum('"train/samples_per_s"' in line for line in jsonl.read_text().splitlines()) >= steps // log_every
        except OSError:
            return False

    try:
        code, out, err = run_group(launcher + args, budget_s - (time.monotonic() - t0), done=logged_all_windows)
        if code not in (None, 0) or not jsonl.exists():
            raise RuntimeError(f"launch.train exit {code}: {tail(err)}")
        row = mfu.read_run(run_dir, out)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    if "perf/mfu" not in row:
        raise RuntimeError(
            f"no perf/mfu in {row['windows']} log window(s) after the first: {row.get('note') or tail(err)}"
        )
    return {
        "value": row["perf/mfu"],
        "unit": "mfu",
        "tokens_per_s": row.get("perf/tokens_per_s"),
        "tflops_per_rank": row.get("perf/tflops_per_rank"),
        "peak_tflops": row["peak_tflops"],
        "peak_from": row["peak_from"],
        "data_wait_frac": row.get("train/data_wait_frac"),
        "ranks": ranks,
        "recipe": recipe,
        "seq_len": seq_len,
        "batch_per_rank": s.lm_batch[size, context],
        "steps": steps,
        "windows": row["windows"],
    }


def build_unet(which: str, smoke: bool):
    """The tiny recipe's UNet (the arguments models/sd/workload.py builds it with, read from
    configs/sd/tiny.yaml and its VAE's) or diffusers' default UNet2DConditionModel, which is
    SD 1.5's (at --smoke narrowed to 32/64 channels, one layer per block). Returns (unet,
    latent (C, H, W), text states (tokens, width))."""
    from diffusers import UNet2DConditionModel

    from launch.recipes import load_recipe
    from models.sd.workload import scratch_unet

    if which == "tiny":
        c = load_recipe(str(ROOT / "configs/sd/tiny.yaml")).model
        v = load_recipe(str(ROOT / "configs/sd/tiny_vae.yaml")).model
        channels, scale = v.latent_channels, 2 ** (len(v.block_out_channels) - 1)
        unet = scratch_unet(c, channels, scale)  # as the workload builds it
        return unet, (channels, c.image_size // scale, c.image_size // scale), (c.max_length, c.text_hidden)
    if smoke:
        narrow = {"block_out_channels": (32, 32, 64, 64), "layers_per_block": 1, "attention_head_dim": 2}
        return UNet2DConditionModel(sample_size=16, cross_attention_dim=32, **narrow), (4, 16, 16), (8, 32)
    return UNet2DConditionModel(cross_attention_dim=768), (4, 64, 64), (77, 768)


def measure_unet(ctx: dict, which: str, compiled: bool, budget_s: float) -> dict:
    """One worker process: build, warm up (compiling, when asked), time steps until the
    step count or 80% of the budget is reached."""
    import torch

    s: Scale = ctx["scale"]
    t_start = time.monotonic()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    unet, latent, text = build_unet(which, ctx["smoke"])
    unet = unet.to(device).train()
    params = sum(p.numel() for p in unet.parameters())
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=device.type == "cuda")
    forward = torch.compile(unet) if compiled else unet
    b = s.unet_batch[which]
    x = torch.randn(b, *latent, device=device)
    states = torch.randn(b, *text, device=device)
    t = torch.randint(0, 1000, (b,), device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step() -> float:
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = (forward(x, t, states).sample.float() - x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    first_s = step()
    step()
    times: list[float] = []
    while not times or (len(times) < s.unet_steps and time.monotonic() - t_start < 0.8 * budget_s):
        times.append(step())
    median = statistics.median(times)
    return {
        "value": b / median,
        "unit": "images/s",
        "step_ms": 1000 * median,
        "first_step_s": first_s,  # holds the compile when compiled
        "batch": b,
        "latent": list(latent),
        "params_M": params / 1e6,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "compiled": compiled,
        "timed_steps": len(times),
    }


def measure_overhead(ctx: dict, budget_s: float) -> dict:
    from benchmarks import overhead

    s: Scale = ctx["scale"]
    shards = byte_shards(ctx["work"], s, s.overhead_context)
    overrides = [f"data.train.urls={shards}/train", f"model.seq_len={s.overhead_context}", *s.overhead_overrides]
    row = overhead.run_one("lm", "accelerate", 1, 1, True, "memory", overrides=overrides)
    return {"value": row.pop("ratio"), "unit": "ours/bare step time", **row, "overrides": overrides}


def measure_checkpoint(ctx: dict, budget_s: float) -> dict:
    import io

    from benchmarks import checkpoint_scale

    c, ranks = ctx["scale"].checkpoint, max(1, ctx["gpus"])
    dim, depth = checkpoint_scale.SIZES[c["size"]]
    need = 3 * 12 * (12 * dim**2 * depth)  # bytes: two fp32 weights + AdamW checkpoints, and slack
    shm = Path("/dev/shm")  # a container's is often 64 MB: then the work folder's disk
    storage = shm if shm.is_dir() and shutil.disk_usage(shm).free > need else ctx["work"]
    folder = storage / f"tributary-gpu-suite-ckpt-{os.getpid()}"
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its rows; ours is one line
            rows = checkpoint_scale.launch(
                c["size"],
                "fsdp",
                ranks,
                c["paths"],
                folder,
                threads=c["threads"],
                repeats=c["repeats"],
                cpu=ctx["gpus"] == 0,
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    by_path = {r["path"]: r for r in rows}
    new = by_path["new"]
    out = {
        "value": new["save_s"],
        "unit": "s per save",
        "params": new["params"],
        "ranks": new["ranks"],
        "load_s": new["load_s"],
        "verify_s": new["verify_s"],
        "bytes_written_gb": sum(new["bytes_written_gb"]),
        "storage": str(folder.parent),
    }
    if "async" in by_path:
        out["async_blocked_s"] = by_path["async"]["blocked_s"]
        out["async_save_s"] = by_path["async"]["save_s"]
    return out


def plan(s: Scale) -> list[tuple[str, float]]:
    """(measurement, budget) in the order they run: what matters most first."""
    lm = [
        (f"lm_{size}_{attn}_{c}", s.lm_budget_s[size])
        for c in ("2k", "8k")
        for size in LM_SIZES
        for attn in ("softmax", "flash")
    ]
    first, later = lm[:4], lm[4:]  # the 2k runs, then the 8k ones
    return [
        *first,
        ("unet_tiny_eager", s.unet_budget_s["tiny_eager"]),
        ("unet_sd15_eager", s.unet_budget_s["sd15_eager"]),
        ("overhead", s.overhead_budget_s),
        ("checkpoint", s.checkpoint_budget_s),
        *later,
        ("unet_tiny_compile", s.unet_budget_s["tiny_compile"]),
        ("unet_sd15_compile", s.unet_budget_s["sd15_compile"]),
    ]


def run_in_worker(key: str, budget_s: float, smoke: bool, work: Path) -> dict:
    """A measurement in a process of its own: a hung compile or a crash costs only its budget."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.gpu_suite",
        "--worker",
        key,
        "--budget-s",
        str(budget_s),
        "--work",
        str(work),
    ]
    code, out, err = run_group(cmd + (["--smoke"] if smoke else []), budget_s)
    result = next((line[7:] for line in reversed(out.splitlines()) if line.startswith("RESULT ")), None)
    if code != 0 or result is None:
        raise RuntimeError(f"worker exit {code}: {tail(err)}")
    return json.loads(result)


def measure(key: str, ctx: dict, budget_s: float) -> dict:
    if key.startswith("lm_"):
        _, size, attention, context = key.split("_")
        return measure_lm(ctx, size, attention, context, budget_s)
    if ctx.get("in_worker") or key in ctx["scale"].in_process:
        if key.startswith("unet_"):
            _, which, mode = key.split("_")
            return measure_unet(ctx, which, mode == "compile", budget_s)
        return {"overhead": measure_overhead, "checkpoint": measure_checkpoint}[key](ctx, budget_s)
    return run_in_worker(key, budget_s, ctx["smoke"], ctx["work"])


def skip_reason(key: str, ctx: dict, budget_s: float, left_s: float) -> str | None:
    lm_runs = ctx["scale"].lm_runs
    if key.startswith("lm_") and lm_runs and key not in lm_runs:
        return f"smoke: {' and '.join(lm_runs)} cover the LM code paths (the others differ in sizes only)"
    if ctx["smoke"] and ctx["gpus"] == 0 and key.endswith("_compile") and not ctx["compile_on_cpu"]:
        return "smoke on CPU: inductor compiles a UNet in longer than the smoke's budget (--smoke-compile runs it)"
    if budget_s > left_s:
        total = ctx["scale"].budget_s
        return f"its budget of {budget_s:.0f} s exceeds the {left_s:.0f} s left of the suite's {total:.0f} s"
    return None


# ---------------------------------------------------------------- the driver
def environment() -> dict:
    import torch

    from trainer.meter import gpu_peak_tflops

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu_count": gpu_count(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
    }
    if env["gpu_count"]:
        name = torch.cuda.get_device_name(0)
        free, total = torch.cuda.mem_get_info(0)
        env.update(
            device=name,
            gpu_memory_gb=round(total / 2**30, 1),
            bf16_peak_tflops=gpu_peak_tflops(name, "bf16"),
            nccl=".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None,
        )
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return env


def targets(results: dict, env: dict) -> dict:
    mfus = [r["value"] for k, r in results.items() if k.startswith("lm_") and isinstance(r.get("value"), float)]
    gpu_class = any(g in env.get("device", "") for g in MFU_TARGET_GPUS)
    best = max(mfus) if mfus else None
    lm = {"target": f">= {TARGETS['lm_mfu_min']}", "best": best}
    lm["met"] = None if best is None else best >= TARGETS["lm_mfu_min"]
    if not gpu_class:
        lm["note"] = f"the target is for {'/'.join(MFU_TARGET_GPUS)}-class GPUs; this is {env.get('device')}"
    ratio = results.get("overhead", {}).get("value")
    over = {"target": f"<= {TARGETS['overhead_ratio_max']}", "value": ratio}
    over["met"] = None if ratio is None else ratio <= TARGETS["overhead_ratio_max"]
    return {"lm_mfu": lm, "overhead_ratio": over}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device there is (CPU: < 60 s)")
    p.add_argument("--budget-s", type=float, default=0, help="the whole suite's wall time (default 480; smoke 75)")
    p.add_argument("--only", default="", help="comma-separated measurement names (default: all)")
    p.add_argument("--smoke-compile", action="store_true", help="with --smoke on CPU: run the torch.compile ones too")
    p.add_argument("--work", default="", help="scratch folder for shards (default: a temporary one)")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:  # one thread per process: two OpenMP threads on 2 shared cores ran 15x slower
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    s = SMOKE if args.smoke else GPU
    work = Path(args.work or tempfile.mkdtemp(prefix="tributary-gpu-suite-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = {"scale": s, "smoke": args.smoke, "work": work, "gpus": gpu_count(), "compile_on_cpu": args.smoke_compile}
    if args.worker:
        ctx["in_worker"] = True
        print("RESULT " + json.dumps(measure(args.worker, ctx, args.budget_s)), flush=True)
        return 0
    start = time.monotonic()
    total = args.budget_s or s.budget_s
    s.budget_s = total
    env = environment()
    print(json.dumps({"environment": env}), flush=True)
    results: dict[str, dict] = {}
    wanted = set(args.only.split(",")) - {""}
    try:
        for key, budget in plan(s):
            if wanted and key not in wanted:
                continue
            t0 = time.monotonic()
            reason = skip_reason(key, ctx, budget, total - (t0 - start))
            if reason:
                row = {"skipped": reason}
            else:
                try:
                    row = {**measure(key, ctx, budget)}
                except Exception as exc:  # noqa: BLE001 - one failure must not lose the others' numbers
                    row = {"error": f"{type(exc).__name__}: {exc}"[-2000:]}
                row["wall_s"] = round(time.monotonic() - t0, 1)
                row["budget_s"] = budget
            results[key] = row
            print(json.dumps({"measurement": key, **row}), flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    summary = {
        "suite": "gpu_suite",
        "smoke": args.smoke,
        "environment": env,
        "budget_s": total,
        "wall_s": round(time.monotonic() - start, 1),
        "targets": targets(results, env),
        "measurements": results,
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

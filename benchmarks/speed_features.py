"""Speed switches against their baselines, on our own LM and tiny SD UNet, in one process.

    .venv/bin/python -m benchmarks.speed_features [--quick] [--only compile,adamw,channels_last,sdpa,checkpointing]
        [--threads 2] [--reps 7]

Every comparison builds each variant from the same seed and then times whole training steps
(forward + backward + AdamW step + zero_grad; for SD also the EMA update, as the trainer
runs it; no gradient clipping) interleaved: after the warm-up steps, each round times one step of every variant,
the order rotating per round, so that drift on the machine hits all variants alike. Times
are medians in ms; a speed-up (> 1: faster than the baseline) is the median over rounds of
the ratio of the two steps timed in the same round.

- compile: the LM compiled as `trainer.compile=true` does it (`module.compile()` before
  wrapping) vs eager, and the SD UNet alone with `unet.compile()`. The first step's time, which holds the
  compilation, is reported apart; inductor's cache is a fresh temp dir, so it is a cold start.
- adamw: torch.optim.AdamW with foreach=False (the for-loop: what the trainer's default
  resolves to on CPU), foreach=True, fused=True, for the LM and for SD (UNet + text encoder);
  the optimizer step alone on fixed gradients and the whole training step.
- channels_last: `model.channels_last` on vs off, tiny SD UNet.
- sdpa: `model.sdpa_backend` auto / math / flash (efficient and cudnn are tried and reported
  when they do not run), LM forward + backward (no optimizer) at 1k and at 4k context (the 1k
  recipe with seq_len=4096, batch 1; 1 warm-up and 3 timed passes at 4k).
- checkpointing: `model.activation_checkpointing` (LM), `model.gradient_checkpointing` (SD):
  step time, and peak memory of one step: the most bytes held in tensors by torch's CPU
  allocator during the step above the level at its start (torch.profiler's memory events).

Models: configs/lm/causal_1k.yaml (dim 128, depth 4, 4 heads, softmax, seq 1024, batch 8)
on byte windows of the Python standard library's source; configs/sd/tiny.yaml (UNet [32, 64],
text encoder trained, batch 16) on precomputed latents from data/shapes-latents/train when
present (else random latents), with an untrained VAE built from configs/sd/tiny_vae.yaml
(only its shape matters) and the tokenizer data/shapes/tokenizer (else one trained here on
the shapes captions). --quick shrinks the LM to seq 256 and the reps and skips compiling the
UNet, for a smoke run (~1.5 min); the full run takes about 7 min, half of it compiling.
--threads 2 uses the whole 2-core machine in one process (a 2-rank run gives each rank 1).
One JSON object per comparison, then a summary line {"summary": {...}}.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

if not __package__:  # `python benchmarks/this.py`: the repo root on sys.path, as with -m
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

ROOT = Path(__file__).resolve().parent.parent
LM_RECIPE = ROOT / "configs/lm/causal_1k.yaml"
SD_RECIPE, VAE_RECIPE = ROOT / "configs/sd/tiny.yaml", ROOT / "configs/sd/tiny_vae.yaml"
SECTIONS = ("compile", "adamw", "channels_last", "sdpa", "checkpointing")


def interleaved(variants: dict, baseline: str, warmup: int, reps: int) -> tuple[dict, dict]:
    """Median ms per call of each variant, and its speed-up over `baseline` (> 1: faster): the
    median over rounds of the ratio of the two calls timed in the same round. Each round times
    one call of every variant, in an order that rotates from round to round."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            variants[n]()
            times[n].append(time.perf_counter() - t)
    ms = {n: round(1000 * statistics.median(v), 2) for n, v in times.items()}
    speedup = {
        n: round(statistics.median(b / x for b, x in zip(times[baseline], v)), 3)
        for n, v in times.items()
        if n != baseline
    }
    return ms, speedup


def peak_step_bytes(step) -> int:
    """Most bytes allocated by torch on the CPU during one call of `step`, above the start."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        events = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return int(max(totals) - totals[0]) if totals else -1


def make_adamw(model, o, **impl) -> torch.optim.AdamW:
    """The trainer's AdamW (trainer.loop.build_optimizer's groups) with a chosen implementation."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, **impl)


class Bench:
    def __init__(self, args):
        self.args = args
        self.rows: list[dict] = []
        self.tmp = tempfile.TemporaryDirectory()
        self.lm_overrides = ["model.seq_len=256"] if args.quick else []
        self._sd_parts = None
        self._text = None

    def emit(self, row: dict) -> dict:
        print(json.dumps(row), flush=True)
        self.rows.append(row)
        return row

    # ---------------------------------------------------------------- models and batches
    def lm(self, overrides=(), seq_len: int = 0):
        from launch.recipes import load_recipe
        from models.registry import build_workload

        extra = [f"model.seq_len={seq_len}"] if seq_len else []
        cfg = load_recipe(LM_RECIPE, [*self.lm_overrides, *extra, *overrides])
        w = build_workload(cfg.model)
        torch.manual_seed(0)
        return cfg, w, w.build_model().train()

    def lm_batch(self, cfg, batch: int = 0) -> dict:
        """`batch` windows of seq_len + 1 bytes of the standard library's source."""
        n, want = cfg.model.seq_len + 1, batch or cfg.data.batch_size
        if self._text is None:
            files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
            chunks, size = [], 0
            for f in files:
                chunks.append(Path(f).read_bytes())
                size += len(chunks[-1])
                if size > 64 * 4097:
                    break
            self._text = b"".join(chunks)
        windows = [list(self._text[i * n : (i + 1) * n]) for i in range(want)]
        return {"tokens": torch.tensor(windows)}

    def sd(self, overrides=()):
        from launch.recipes import load_recipe
        from models.registry import build_workload

        vae_dir, tok_dir = self.sd_parts()
        cfg = load_recipe(
            SD_RECIPE,
            [
                f"model.vae={vae_dir}",
                f"model.tokenizer={tok_dir}",
                "model.sample_prompts=",
                "model.color_match_samples=0",
                *overrides,
            ],
        )
        w = build_workload(cfg.model)
        torch.manual_seed(0)
        return cfg, w, w.build_model().train()

    def sd_parts(self):
        if self._sd_parts is None:
            from data_pipelines.sources.shapes import prompts
            from data_pipelines.tokenizer import train_clip_bpe
            from launch.recipes import load_recipe
            from models.registry import build_workload

            torch.manual_seed(0)
            vae = build_workload(load_recipe(VAE_RECIPE).model).build_model().vae
            vae.register_to_config(scaling_factor=0.6)
            vae_dir = Path(self.tmp.name) / "vae"
            vae.save_pretrained(vae_dir)
            tok_dir = ROOT / "data/shapes/tokenizer"
            if not (tok_dir / "vocab.json").is_file():
                tok_dir = train_clip_bpe(prompts(300), Path(self.tmp.name) / "tokenizer")
            self._sd_parts = (vae_dir, tok_dir)
        return self._sd_parts

    def sd_batch(self, cfg, w) -> dict:
        shards = sorted(glob.glob(str(ROOT / "data/shapes-latents/train/*.tar")))
        n = cfg.data.batch_size
        if shards:
            import webdataset as wds

            samples = []
            for s in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
                samples.append(w.decode(s))
                if len(samples) == n:
                    return w.collate(samples)
        from data_pipelines.sources.shapes import prompts

        side = cfg.model.image_size // 4
        return {"latents": torch.randn(n, 4, side, side), "input_ids": w.tokenize(prompts(n))}

    @staticmethod
    def train_step(w, model, opt, batch):
        def step():
            w.training_loss(model, batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            w.on_step_end(model, 100)

        return step

    def warm_reps(self, heavy: bool = False) -> tuple[int, int]:
        """(warm-up, timed) steps per variant; heavy: seconds per step."""
        return (1, 3) if self.args.quick or heavy else (2, self.args.reps)

    @staticmethod
    def shape(model: str, cfg, batch: int = 0) -> str:
        m, batch = cfg.model, batch or cfg.data.batch_size
        if model == "lm":
            return f"dim {m.dim}, depth {m.depth}, {m.heads} heads, seq {m.seq_len}, batch {batch}"
        return f"UNet {m.unet_channels}, latents {m.image_size // 4}x{m.image_size // 4}, batch {batch}"

    # ---------------------------------------------------------------- sections
    def compile(self):
        warmup, reps = self.warm_reps()
        cfg, w, eager = self.lm()
        _, _, compiled = self.lm()
        compiled.compile()  # what trainer.compile=true does before wrapping
        batch = self.lm_batch(cfg)
        variants = {
            "eager": self.train_step(w, eager, make_adamw(eager, cfg.optim), batch),
            "compiled": self.train_step(w, compiled, make_adamw(compiled, cfg.optim), batch),
        }
        self._compare_compile("lm", self.shape("lm", cfg), variants, warmup, reps)

        if self.args.quick:  # a cold UNet compile takes minutes on 2 cores
            return
        cfg, w, eager = self.sd()
        _, _, compiled = self.sd()
        compiled.unet.compile()
        batch = self.sd_batch(cfg, w)
        variants = {
            "eager": self.train_step(w, eager, make_adamw(eager, cfg.optim), batch),
            "compiled": self.train_step(w, compiled, make_adamw(compiled, cfg.optim), batch),
        }
        self._compare_compile("sd_unet", self.shape("sd_unet", cfg), variants, warmup, reps)

    def _compare_compile(self, model: str, shape: str, variants: dict, warmup: int, reps: int):
        first = {}
        for name, fn in variants.items():  # the first steps: compilation (and a recompile, if any)
            times = []
            for _ in range(2):
                t = time.perf_counter()
                fn()
                times.append(round(time.perf_counter() - t, 2))
            first[name] = times
        ms, speedup = interleaved(variants, "eager", max(0, warmup - 2), reps)
        self.emit(
            {
                "feature": "compile",
                "model": model,
                "shape": shape,
                "step_ms": ms,
                "speedup": speedup,
                "first_two_steps_s": first,
                "compile_s": round(first["compiled"][0] - ms["eager"] / 1000, 1),
            }
        )

    def adamw(self):
        warmup, reps = self.warm_reps()
        impls = {"for_loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
        for name in ("lm", "sd_unet"):
            cfg, w, model = self.lm() if name == "lm" else self.sd()
            batch = self.lm_batch(cfg) if name == "lm" else self.sd_batch(cfg, w)
            opts = {n: make_adamw(model, cfg.optim, **impl) for n, impl in impls.items()}
            w.training_loss(model, batch).backward()  # fixed gradients for the step-alone timing
            step_ms, step_speedup = interleaved({n: o.step for n, o in opts.items()}, "for_loop", warmup + 1, 3 * reps)
            for o in opts.values():
                o.zero_grad(set_to_none=True)
            steps = {n: self.train_step(w, model, o, batch) for n, o in opts.items()}
            whole_ms, whole_speedup = interleaved(steps, "for_loop", warmup, reps)
            trained = [p for p in model.parameters() if p.requires_grad]
            self.emit(
                {
                    "feature": "adamw",
                    "model": name,
                    "shape": self.shape(name, cfg),
                    "trained_params": sum(p.numel() for p in trained),
                    "trained_tensors": len(trained),
                    "optimizer_step_ms": step_ms,
                    "optimizer_speedup": step_speedup,
                    "train_step_ms": whole_ms,
                    "train_step_speedup": whole_speedup,
                }
            )

    def channels_last(self):
        warmup, reps = self.warm_reps()
        cfg, w, plain = self.sd()
        _, _, nhwc = self.sd(["model.channels_last=true"])
        batch = self.sd_batch(cfg, w)
        ms, speedup = interleaved(
            {
                "contiguous": self.train_step(w, plain, make_adamw(plain, cfg.optim), batch),
                "channels_last": self.train_step(w, nhwc, make_adamw(nhwc, cfg.optim), batch),
            },
            "contiguous",
            warmup,
            2 * reps,
        )
        self.emit(
            {
                "feature": "channels_last",
                "model": "sd_unet",
                "shape": self.shape("sd_unet", cfg),
                "step_ms": ms,
                "speedup": speedup,
            }
        )

    def sdpa(self):
        from models.lm.layers import SDPA_BACKENDS

        for seq_len in (256, 1024) if self.args.quick else (1024, 4096):
            warmup, reps = self.warm_reps(heavy=seq_len > 1024)
            variants, runnable, shape = {}, {}, ""
            for name in SDPA_BACKENDS:
                cfg, w, model = self.lm([f"model.sdpa_backend={name}"], seq_len=seq_len)
                batch_size = cfg.data.batch_size if seq_len <= 1024 else 1
                batch = self.lm_batch(cfg, batch_size)
                shape = self.shape("lm", cfg, batch_size)

                def fwd_bwd(w=w, model=model, batch=batch):
                    w.training_loss(model, batch).backward()
                    model.zero_grad(set_to_none=True)

                try:
                    fwd_bwd()
                    variants[name] = fwd_bwd
                    runnable[name] = "ok"
                except RuntimeError as exc:
                    runnable[name] = str(exc).split(";")[0]
            ms, speedup = interleaved(variants, "math", warmup, reps)
            self.emit(
                {
                    "feature": "sdpa_backend",
                    "model": "lm",
                    "shape": shape,
                    "fwd_bwd_ms": ms,
                    "speedup": speedup,
                    "runs_here": runnable,
                }
            )

    def checkpointing(self):
        warmup, reps = self.warm_reps()
        for model_name, build, key in (
            ("lm", self.lm, "model.activation_checkpointing"),
            ("sd_unet", self.sd, "model.gradient_checkpointing"),
        ):
            variants, peak, shape = {}, {}, ""
            for name, on in (("off", "false"), ("on", "true")):
                cfg, w, model = build([f"{key}={on}"])
                batch = self.lm_batch(cfg) if model_name == "lm" else self.sd_batch(cfg, w)
                step = self.train_step(w, model, make_adamw(model, cfg.optim), batch)
                step()  # the optimizer state exists before the measured step
                peak[name] = round(peak_step_bytes(step) / 2**20, 1)
                variants[name] = step
                shape = self.shape(model_name, cfg)
            ms, speedup = interleaved(variants, "off", warmup, reps)
            self.emit(
                {
                    "feature": "checkpointing",
                    "model": model_name,
                    "key": key,
                    "shape": shape,
                    "step_ms": ms,
                    "speedup": speedup,
                    "peak_step_MiB": peak,
                    "memory_ratio": round(peak["on"] / peak["off"], 3),
                }
            )

    # ---------------------------------------------------------------- summary
    def summary(self, wall: float) -> dict:
        out: dict = {}
        for r in self.rows:
            f, m = r["feature"], r["model"]
            if f == "compile":
                out[f"compile_{m}_speedup"] = r["speedup"]["compiled"]
                out[f"compile_{m}_compile_s"] = r["compile_s"]
            elif f == "adamw":
                for n in ("foreach", "fused"):
                    out[f"adamw_{n}_{m}_optimizer_speedup"] = r["optimizer_speedup"][n]
                    out[f"adamw_{n}_{m}_train_step_speedup"] = r["train_step_speedup"][n]
            elif f == "channels_last":
                out["channels_last_sd_unet_speedup"] = r["speedup"]["channels_last"]
            elif f == "sdpa_backend":
                seq = r["shape"].split("seq ")[1].split(",")[0]
                for n, v in r["speedup"].items():
                    out[f"sdpa_{n}_vs_math_seq{seq}"] = v
            elif f == "checkpointing":
                out[f"checkpointing_{m}_speedup"] = r["speedup"]["on"]
                out[f"checkpointing_{m}_memory_ratio"] = r["memory_ratio"]
        return {
            "summary": out,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "quick": self.args.quick,
            "wall_s": round(wall, 1),
        }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="LM at seq 256, fewer reps: a smoke run")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=7, help="timed steps per variant")
    args = p.parse_args(argv)
    sections = [s for s in args.only.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"--only: unknown {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    torch.set_num_threads(args.threads)
    bench = Bench(args)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(bench.tmp.name) / "inductor")  # a cold compile
    start = time.perf_counter()
    for s in SECTIONS:
        if s in sections:
            getattr(bench, s)()
    print(json.dumps(bench.summary(time.perf_counter() - start)), flush=True)
    bench.tmp.cleanup()


if __name__ == "__main__":
    main()

"""Where numbers go: TensorBoard, `metrics.jsonl`, the progress. Rank 0 only.

The progress is a bar on a terminal; where stderr is a file or a pipe (a SLURM log, `make
train | tee`), a bar's carriage-return redraws would pile up, so the same figures come as one
plain line every `progress_every_s` seconds.

`metrics.jsonl` holds one JSON object per logged step ({"step": N, "train/loss": ...}) and
one per evaluation; scripts and CI read it. On resume from step N, records after N (made
by the run that died) are dropped, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from tensorboard.compat.proto.summary_pb2 import Summary


def image_grid(images: torch.Tensor, nrow: int = 8, pad: int = 1) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> one (C, H', W') grid image (torchvision is not available)."""
    n, c, h, w = images.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = torch.full((c, nrows * (h + pad) + pad, ncol * (w + pad) + pad), 0.5)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = (
            images[i].float().cpu()
        )
    return grid


def upscaled(images: torch.Tensor, at_least: int = 64) -> torch.Tensor:
    """Tiny images (8x8 digits) made visible: each pixel repeated (nearest neighbour) until the
    image is at least `at_least` pixels on its longer side."""
    k = max(1, math.ceil(at_least / max(images.shape[-2:])))
    return images if k == 1 else images.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


PRIVATE_FILE_WRITER = "_get_file_writer"  # SummaryWriter's, in torch 2.x


class MetricsLogger:
    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        resume_step: int,
        total_steps: int,
        progress_bar: bool,
        progress_every_s: float = 30.0,
        terminal: bool | None = None,
        max_time: float = 0.0,
        trained_s: float = 0.0,
    ):
        self.enabled = enabled
        # trainer.max_time, and the training seconds spent before this launch: the line's
        # share and eta then count the time too (whichever ends the run first)
        self.max_time, self.trained_s = max_time, trained_s
        self.jsonl = run_dir / "metrics.jsonl"
        self.tb = None
        self.bar = None
        self.lines_every = None  # seconds between plain progress lines, off a terminal
        self.name, self.total, self.figures = run_dir.name, total_steps, {}
        if not enabled:
            return
        self._truncate_after(resume_step)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events that an earlier run wrote past the resume point
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
        terminal = sys.stderr.isatty() if terminal is None else terminal
        if progress_bar and terminal:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=resume_step, dynamic_ncols=True, desc=run_dir.name)
        elif progress_bar:
            self.lines_every = progress_every_s
            self._started = self._last_line = time.monotonic()
            self._first_step = resume_step

    def _truncate_after(self, step: int) -> None:
        if not self.jsonl.exists():
            return
        kept = []
        for line in self.jsonl.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError):  # a line cut short by the kill that ended the last run
                continue
        tmp = self.jsonl.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.jsonl)

    def log(self, step: int, values: dict[str, float], *, bar_keys: tuple[str, ...] = ()) -> None:
        if not self.enabled:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        self._scalars(step, values)
        if bar_keys and (self.bar is not None or self.lines_every is not None):
            self.figures = {k.split("/")[-1]: f"{values[k]:.4g}" for k in bar_keys if k in values}
            if self.bar is not None:
                self.bar.set_postfix(self.figures, refresh=False)

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        """One event holding every scalar: SummaryWriter.add_scalar costs ~0.15 ms per value (a
        10-value log every 10 steps was 10% of a 1.5 ms step); readers see the same. The event
        goes through the writer's private file writer; a torch without it gets add_scalar."""
        file_writer = getattr(self.tb, PRIVATE_FILE_WRITER, None)
        if file_writer is None:
            for k, v in values.items():
                self.tb.add_scalar(k, float(v), step)
            return
        summary = Summary(value=[Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])
        file_writer().add_summary(summary, step, time.time())

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
        elif self.lines_every is not None:
            now = time.monotonic()
            if now - self._last_line >= self.lines_every or step == self.total:
                self._last_line = now
                print(self.progress_line(step, now), file=sys.stderr, flush=True)

    def progress_line(self, step: int, now: float) -> str:
        """`made: step 1200/3000 (40%) loss=0.91 lr=0.001 samples_per_s=5321 elapsed 2m03s eta 3m05s`"""
        elapsed = now - self._started
        done = step - self._first_step
        eta = elapsed / done * (self.total - step) if done > 0 else None
        share = f"{100 * step // max(1, self.total)}%"
        if self.max_time > 0:
            spent = self.trained_s + elapsed
            left = max(0.0, self.max_time - spent)
            if eta is None or left < eta:
                eta, share = left, f"{int(100 * min(1.0, spent / self.max_time))}% of trainer.max_time"
        figures = " ".join(f"{k}={v}" for k, v in self.figures.items())
        return f"{self.name}: step {step}/{self.total} ({share}) {figures} elapsed {_duration(elapsed)}" + (
            f" eta {_duration(eta)}" if eta is not None else ""
        )

    def image(self, tag: str, images: torch.Tensor, step: int) -> None:
        if self.enabled:
            self.tb.add_image(tag, image_grid(upscaled(images)), step)

    def samples_text(self, tag: str, texts: list[str], step: int) -> None:
        """Generated text to TensorBoard's Text tab, one code block each (bytes, not markdown)."""
        fence = "`" * 3
        self.tb_text(tag, "\n\n".join(f"{fence}\n{t.replace(fence, '~~~')}\n{fence}" for t in texts), step)

    def tb_text(self, tag: str, markdown: str, step: int) -> None:
        if self.enabled:
            self.tb.add_text(tag, markdown, step)

    def text(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def summarize_line(prefix: str, metrics: dict[str, float]) -> str:
    return prefix + " " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

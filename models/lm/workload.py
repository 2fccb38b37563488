"""The byte-level LM workload: one model whose `model.attention` picks softmax, linear,
FLASH or FLASH-Quad blocks; `model.objective` picks causal LM or masked (span) prediction.

Tokens are bytes (0-255) plus one MASK id; there is no tokenizer, so bits per byte are
comparable across attention kinds, sequence lengths and corpora.
Samples are shards of contiguous byte windows of `seq_len + 1` bytes (`python -m
launch.make_shards text ...`), field `bin`.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.base import Workload
from models.lm.layers import ATTENTION_KINDS, SDPA_BACKENDS, attention_flops_per_token, make_block
from models.registry import register

MASK = 256
VOCAB = 257
OBJECTIVES = ("causal", "masked")


@dataclass(kw_only=True)
class LMConfig:
    name: str = "lm"
    objective: str = "causal"  # causal | masked
    attention: str = "softmax"  # softmax | linear | flash | flash_quad
    seq_len: int = 1024  # bytes the model sees; the shards hold seq_len + 1 per sample
    dim: int = 128
    depth: int = 4  # blocks; a FLASH block replaces attention + MLP, so use ~2x for FLASH
    heads: int = 4  # softmax and linear attention
    mlp_ratio: int = 4
    chunk_size: int = 256  # linear attention and FLASH's mixed chunk attention
    expansion: int = 2  # FLASH: width of u, v = expansion * dim
    qk_dim: int = 128  # FLASH: shared query/key width
    dropout: float = 0.0
    mask_fraction: float = 0.15  # masked objective: share of bytes hidden
    mask_span: float = 3.0  # masked objective: mean span length (geometric)
    activation_checkpointing: bool = False  # recompute each block in backward
    sdpa_backend: str = "auto"  # softmax attention's kernel: auto (torch chooses) | math | flash | efficient | cudnn
    sample_prompt: str = "def "  # causal text samples continue this prompt
    sample_bytes: int = 200


class ByteLM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(VOCAB, cfg.dim)
        # FLASH-Quad's relu^2 kernel is scaled by 1/chunk_size: the paper's 1/N with N the
        # context, fixed so that a prefix's outputs do not change as tokens are appended
        chunk = cfg.seq_len if cfg.attention == "flash_quad" else cfg.chunk_size
        self.blocks = nn.ModuleList(
            [
                make_block(
                    cfg.attention,
                    dim=cfg.dim,
                    heads=cfg.heads,
                    causal=cfg.objective == "causal",
                    chunk_size=chunk,
                    expansion=cfg.expansion,
                    qk_dim=cfg.qk_dim,
                    mlp_ratio=cfg.mlp_ratio,
                    dropout=cfg.dropout,
                    sdpa_backend=cfg.sdpa_backend,
                )
                for _ in range(cfg.depth)
            ]
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, VOCAB, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N) byte ids -> (B, N, VOCAB) logits."""
        x = self.embed(tokens)
        for block in self.blocks:
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(self.norm(x))


def span_mask(
    shape: tuple[int, int], fraction: float, mean_span: float, generator: torch.Generator | None, device
) -> torch.Tensor:
    """Boolean (B, N) mask of spans covering ~`fraction` of each row: span starts with
    probability fraction / mean_span, lengths geometric with mean `mean_span`. At least one
    position per row is hidden, so every row has a loss."""
    b, n = shape
    starts = torch.rand(shape, generator=generator, device=device) < fraction / mean_span
    lengths = torch.empty(shape, device=device).geometric_(1 / mean_span, generator=generator).long()
    lengths = torch.where(starts, lengths, torch.zeros_like(lengths))
    # position i is hidden if some start s <= i has s + length > i: a running max of ends
    ends = torch.where(starts, torch.arange(n, device=device) + lengths, torch.zeros_like(lengths))
    mask = torch.cummax(ends, dim=1).values > torch.arange(n, device=device)
    empty = ~mask.any(dim=1)
    if empty.any():
        mask[empty, torch.randint(n, (int(empty.sum()),), generator=generator, device=device)] = True
    return mask


@register("lm")
class LMWorkload(Workload):
    Config = LMConfig
    best_metric = "bits_per_byte"

    def __init__(self, cfg: LMConfig):
        if cfg.attention not in ATTENTION_KINDS:
            raise ValueError(f"model.attention '{cfg.attention}' is not one of {ATTENTION_KINDS}")
        if cfg.objective not in OBJECTIVES:
            raise ValueError(f"model.objective '{cfg.objective}' is not one of {OBJECTIVES}")
        if cfg.sdpa_backend not in SDPA_BACKENDS:
            raise ValueError(f"model.sdpa_backend '{cfg.sdpa_backend}' is not one of {tuple(SDPA_BACKENDS)}")
        super().__init__(cfg)

    def build_model(self) -> nn.Module:
        return ByteLM(self.cfg)

    def flops_per_token(self) -> float:
        """Forward+backward matmul FLOPs per trained token (3x forward), for MFU."""
        c = self.cfg
        per_block = attention_flops_per_token(
            c.attention,
            dim=c.dim,
            heads=c.heads,
            tokens=c.seq_len,
            chunk_size=c.chunk_size,
            expansion=c.expansion,
            qk_dim=c.qk_dim,
            mlp_ratio=c.mlp_ratio,
            causal=c.objective == "causal",
        )
        return 3 * (c.depth * per_block + 2 * c.dim * VOCAB)

    # ------------------------------------------------------------------ data
    def decode(self, sample: dict) -> dict:
        if "bin" not in sample:
            raise KeyError(
                f"no 'bin' field (a window of seq_len + 1 bytes); the sample has "
                f"{sorted(k for k in sample if not k.startswith('__'))}"
            )
        data = sample["bin"]
        want = self.cfg.seq_len + 1
        if len(data) < want:
            raise ValueError(
                f"sample holds {len(data)} bytes, model.seq_len={self.cfg.seq_len} "
                f"needs {want}: build shards with --seq-len {self.cfg.seq_len}"
            )
        tokens = torch.frombuffer(bytearray(data[:want]), dtype=torch.uint8).long()
        # a per-sample seed: eval masks are the same in every run and at any world size
        return {"tokens": tokens, "seed": torch.tensor(zlib.crc32(sample["__key__"].encode()))}

    # ------------------------------------------------------------------ objectives
    def _logits(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        try:
            return model(inputs)
        except RuntimeError as exc:  # eager or from torch.compile's tracing: the same words
            if self.cfg.sdpa_backend == "auto" or "No viable backend" not in str(exc):
                raise
            raise RuntimeError(
                f"model.sdpa_backend={self.cfg.sdpa_backend}: torch {torch.__version__} has no "
                f"{self.cfg.sdpa_backend} attention kernel for this model on {inputs.device.type} "
                f"(device, dtype and head size decide); use auto or math"
            ) from exc

    def _masked_inputs(self, tokens: torch.Tensor, seeds: torch.Tensor | None):
        x = tokens[:, :-1]
        c = self.cfg
        if seeds is None:  # training: fresh masks each time (the trainer's RNG, checkpointed)
            mask = span_mask(tuple(x.shape), c.mask_fraction, c.mask_span, None, x.device)
        else:
            rows = []
            for s in seeds.tolist():
                g = torch.Generator(device=x.device).manual_seed(int(s))
                rows.append(span_mask((1, x.shape[1]), c.mask_fraction, c.mask_span, g, x.device))
            mask = torch.cat(rows)
        return x.masked_fill(mask, MASK), x, mask

    def _nll(self, model: nn.Module, batch: dict, fixed_masks: bool) -> tuple[torch.Tensor, Any]:
        """Summed NLL (nats) over predicted bytes, and how many bytes were predicted."""
        tokens = batch["tokens"]
        if self.cfg.objective == "causal":
            logits = self._logits(model, tokens[:, :-1])
            nll = F.cross_entropy(logits.float().reshape(-1, VOCAB), tokens[:, 1:].reshape(-1), reduction="sum")
            return nll, tokens[:, 1:].numel()  # a host number: no device tensor per step
        inputs, targets, mask = self._masked_inputs(tokens, batch["seed"] if fixed_masks else None)
        logits = self._logits(model, inputs)
        nll = F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum")  # hidden bytes only
        return nll, mask.sum().float()

    throughput_unit = "tokens"

    def units_per_sample(self) -> int:
        return self.cfg.seq_len

    def flops_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        # the masked objective picks hidden bytes by value (host-side on the meta device);
        # the loss itself is elementwise, so the forward over the window is what counts
        tokens = batch["tokens"]
        return model(tokens[:, :-1] if self.cfg.objective == "causal" else tokens).float().sum()

    def training_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        nll, count = self._nll(model, batch, fixed_masks=False)
        return nll / count / math.log(2)  # bits per predicted byte

    def eval_sums(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        nll, count = self._nll(model, batch, fixed_masks=True)
        return {"nll_sum": nll, "count": torch.as_tensor(count, dtype=nll.dtype, device=nll.device)}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        nll = sums["nll_sum"] / sums["count"]
        return {"bits_per_byte": nll / math.log(2), "nll": nll, "count": sums["count"]}

    # ------------------------------------------------------------------ samples
    @torch.no_grad()
    def sample_text(
        self, model: nn.Module, n: int, generator: torch.Generator, context: torch.Tensor | None = None
    ) -> list[str]:
        """Causal: `n` continuations of `sample_prompt`. Masked: `context` windows (default:
        the source of `textwrap`) with spans hidden and filled by the model, shown as [fill]."""
        c, device = self.cfg, next(model.parameters()).device
        n = min(n, 4)
        if c.objective == "causal":
            prompt = list(c.sample_prompt.encode()) or [10]
            seq = torch.tensor([prompt] * n, device=device)
            for _ in range(c.sample_bytes):
                logits = model(seq[:, -c.seq_len :])[:, -1, :256].float()
                probs = torch.softmax(logits, dim=-1).cpu()
                nxt = torch.multinomial(probs, 1, generator=generator).to(device)
                seq = torch.cat([seq, nxt], dim=1)
            return [bytes(row).decode("utf-8", "replace") for row in seq.tolist()]
        if context is None:  # a fixed, readable window: the source of the stdlib's textwrap
            import inspect
            import textwrap

            text = inspect.getsource(textwrap).encode()
            text = (text * (c.seq_len // len(text) + 1))[: c.seq_len]
            context = torch.tensor([list(text)] * n, device=device)
        x = context[:n, : c.seq_len].to(device)
        g = torch.Generator(device=device).manual_seed(int(generator.initial_seed()))
        mask = span_mask(tuple(x.shape), c.mask_fraction, c.mask_span, g, device)
        pred = model(x.masked_fill(mask, MASK))[..., :256].argmax(-1)
        out = []
        for row, m, p in zip(x.tolist(), mask.tolist(), pred.tolist()):
            parts, i = [], 0
            while i < min(len(row), c.sample_bytes):
                if m[i]:
                    j = i
                    while j < len(row) and m[j]:
                        j += 1
                    parts.append("[" + bytes(p[i:j]).decode("utf-8", "replace") + "]")
                    i = j
                else:
                    parts.append(bytes([row[i]]).decode("utf-8", "replace"))
                    i += 1
            out.append("".join(parts))
        return out

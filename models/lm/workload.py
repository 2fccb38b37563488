"""The LM workload: one model whose `model.attention` picks softmax, linear, FLASH or
FLASH-Quad blocks, `model.block` their style (classic or Llama), and `model.objective` causal
LM or masked (span) prediction.

Tokens are bytes (0-255, plus one MASK id) by default: no tokenizer, so bits per byte compare
across attention kinds, sequence lengths and corpora. With `model.tokenizer` they are the
subword ids of that tokenizer.json, and bits per byte still compare: each window records how
many bytes of text its targets cover. Samples are shards of contiguous windows of
`seq_len + 1` tokens (`python -m launch.make_shards text ...`): field `bin` (bytes), or
`ids.npy` (token ids) with `json` = {"bytes": ...}.
"""

from __future__ import annotations

import io
import json
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.base import Workload
from models.lm.layers import (
    ATTENTION_KINDS,
    BLOCK_KINDS,
    SDPA_BACKENDS,
    attention_flops_per_token,
    make_block,
    make_norm,
)
from models.registry import register

MASK = 256  # bytes: the masked objective's hidden-byte id
VOCAB = 257  # bytes: embedding rows, MASK included
OBJECTIVES = ("causal", "masked")
TOKENIZER_RECORD = "tokenizer.json"  # the run's tokenizer, in every checkpoint and in best/


@dataclass(kw_only=True)
class LMConfig:
    name: str = "lm"
    objective: str = "causal"  # causal | masked
    attention: str = "softmax"  # softmax | linear | flash | flash_quad
    block: str = "classic"  # classic (LayerNorm, GELU MLP, biases) | llama (RMSNorm, SwiGLU, no biases)
    tokenizer: str = ""  # a tokenizer.json or a folder holding one; "" = bytes
    vocab_size: int = 0  # 0 = the tokenizer's (bytes: 256); anything else must equal it
    seq_len: int = 1024  # tokens the model sees; the shards hold seq_len + 1 per sample
    dim: int = 128
    depth: int = 4  # blocks; a FLASH block replaces attention + MLP, so use ~2x for FLASH
    heads: int = 4  # softmax and linear attention
    mlp_ratio: int = 4  # classic MLP width = mlp_ratio * dim
    mlp_hidden: int = 0  # llama's SwiGLU width; 0 = 2/3 * mlp_ratio * dim rounded up to 64 (256 from dim 1024)
    norm_eps: float = 1e-5  # LayerNorm and RMSNorm epsilon
    rope_base: float = 10000.0  # RoPE's frequency base
    tie_embeddings: bool = False  # the head's weight is the embedding's
    chunk_size: int = 256  # linear attention and FLASH's mixed chunk attention
    expansion: int = 2  # FLASH: width of u, v = expansion * dim
    qk_dim: int = 128  # FLASH: shared query/key width
    dropout: float = 0.0
    mask_fraction: float = 0.15  # masked objective: share of tokens hidden
    mask_span: float = 3.0  # masked objective: mean span length (geometric)
    activation_checkpointing: bool = False  # recompute each block in backward
    sdpa_backend: str = "auto"  # softmax attention's kernel: auto (torch chooses) | math | flash | efficient | cudnn
    sample_prompt: str = "def "  # causal text samples continue this prompt
    sample_bytes: int = 200  # text samples: new tokens (bytes, or subword tokens with a tokenizer)


class LanguageModel(nn.Module):
    """embed -> blocks -> norm -> head. `rows` embedding/head rows (bytes: 257, MASK included;
    tokens: the vocabulary, plus MASK for the masked objective); `vocab_size` of them are
    tokens that text is made of (what generation samples from)."""

    def __init__(self, cfg: LMConfig, *, rows: int = VOCAB, vocab_size: int = 256):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.embed = nn.Embedding(rows, cfg.dim)
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
                    block=cfg.block,
                    mlp_hidden=cfg.mlp_hidden,
                    norm_eps=cfg.norm_eps,
                    rope_base=cfg.rope_base,
                )
                for _ in range(cfg.depth)
            ]
        )
        self.norm = make_norm(cfg.block, cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, rows, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    @property
    def has_state(self) -> bool:
        """Whether every block continues a sequence from a state (softmax's key/value cache,
        linear attention's recurrence); FLASH's do not."""
        return all(hasattr(b, "init_state") for b in self.blocks)

    def init_states(self, batch: int, device=None, dtype: torch.dtype = torch.float32) -> list[dict]:
        return [b.init_state(batch, device=device, dtype=dtype) for b in self.blocks]

    def forward(self, tokens: torch.Tensor, states: list[dict] | None = None, *, last_only: bool = False):
        """(B, N) ids -> (B, N, rows) logits (`last_only`: (B, 1, rows), the last position's).
        With `states` (from init_states) the ids continue the sequence the states have seen,
        and (logits, new states) come back."""
        x = self.embed(tokens)
        new_states = []
        for i, block in enumerate(self.blocks):
            if states is not None:
                x, state = block(x, states[i])
                new_states.append(state)
            elif self.cfg.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        if last_only:
            x = x[:, -1:]
        logits = self.head(self.norm(x))
        return (logits, new_states) if states is not None else logits


ByteLM = LanguageModel  # its name while tokens were bytes only


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
        for key, value, allowed in (
            ("attention", cfg.attention, ATTENTION_KINDS),
            ("objective", cfg.objective, OBJECTIVES),
            ("block", cfg.block, BLOCK_KINDS),
            ("sdpa_backend", cfg.sdpa_backend, tuple(SDPA_BACKENDS)),
        ):
            if value not in allowed:
                raise ValueError(f"model.{key} '{value}' is not one of {allowed}")
        if cfg.mlp_hidden and (cfg.block != "llama" or cfg.attention not in ("softmax", "linear")):
            raise ValueError(
                f"model.mlp_hidden={cfg.mlp_hidden} is the SwiGLU width of model.block=llama with softmax or linear "
                f"attention; this model has model.block={cfg.block}, model.attention={cfg.attention} (classic MLPs "
                "are model.mlp_ratio x dim wide, FLASH has none)"
            )
        super().__init__(cfg)
        self.tokenizer, self.tokenizer_info, self._tokenizer_text = None, None, None
        if cfg.tokenizer:
            from data_pipelines.text_tokenizer import load_tokenizer, tokenizer_file

            try:
                file = tokenizer_file(cfg.tokenizer)
            except FileNotFoundError as exc:
                raise FileNotFoundError(f"model.tokenizer: {exc}") from None
            self.tokenizer, self.tokenizer_info = load_tokenizer(file)
            self._tokenizer_text = file.read_bytes().decode()
            self.vocab_size = self.tokenizer_info.vocab_size
            self.mask_id = self.vocab_size  # one more row, used by the masked objective only
            self.rows = self.vocab_size + (cfg.objective == "masked")
        else:
            if cfg.vocab_size not in (0, 256):
                raise ValueError(
                    f"model.vocab_size={cfg.vocab_size} needs model.tokenizer (without one, tokens are the "
                    "256 byte values): set model.tokenizer to the tokenizer.json the shards were made with"
                )
            self.vocab_size, self.mask_id, self.rows = 256, MASK, VOCAB

    def build_model(self) -> nn.Module:
        if self.cfg.vocab_size not in (0, self.vocab_size):  # check_data says it with the shards' side too
            raise ValueError(self._vocabulary_mismatch())
        return LanguageModel(self.cfg, rows=self.rows, vocab_size=self.vocab_size)

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
            block=c.block,
            mlp_hidden=c.mlp_hidden,
        )
        return 3 * (c.depth * per_block + 2 * c.dim * self.rows)

    # ------------------------------------------------------------------ vocabulary
    def _vocabulary_mismatch(self, split: str = "", where: str = "", shards: dict | None = None) -> str:
        """The three sides of a vocabulary, each with its values."""
        c, info = self.cfg, self.tokenizer_info
        recipe = f"model.vocab_size={c.vocab_size}" + (" (the tokenizer's)" if not c.vocab_size else "")
        tokenizer = (
            f"model.tokenizer={c.tokenizer} ({info.path}): {info.vocab_size} tokens, sha256 {info.sha256}"
            if info is not None
            else "model.tokenizer='' (bytes: 256 tokens)"
        )
        if shards is None:
            data = "shards: none with a manifest to compare"
        else:
            data = (
                f"shards {split} ({where}): {shards.get('vocab_size')} tokens, sha256 {shards.get('sha256')}, "
                f"tokenizer file {shards.get('file')}"
            )
        return (
            f"vocabulary mismatch between recipe, tokenizer and shards: recipe {recipe}; tokenizer {tokenizer}; "
            f"{data}. Use the tokenizer the shards were made with (and model.vocab_size=0), or rebuild the "
            "shards with it"
        )

    def check_data(self, manifests: Mapping[str, tuple[str, dict]]) -> None:
        """Recipe, tokenizer and every split's shards must agree on the vocabulary: a split's
        manifest records the tokenizer its ids came from (none: byte windows)."""
        info = self.tokenizer_info
        for split, (where, manifest) in manifests.items():
            theirs = manifest.get("tokenizer")
            if info is None and theirs:
                raise ValueError(
                    f"{split} ({where}) holds token ids of tokenizer {theirs.get('file')} ({theirs.get('vocab_size')} "
                    f"tokens, sha256 {theirs.get('sha256')}), but the recipe has no model.tokenizer (bytes): set "
                    "model.tokenizer to that tokenizer.json"
                )
            if info is not None and not theirs:
                raise ValueError(
                    f"{split} ({where}) holds byte windows (its manifest names no tokenizer), but "
                    f"model.tokenizer={self.cfg.tokenizer}: set model.tokenizer='' for bytes, or build token "
                    f"shards with `launch.make_shards text ... --tokenizer {self.cfg.tokenizer}`"
                )
            if info is not None and (
                theirs.get("vocab_size") != info.vocab_size
                or theirs.get("sha256") != info.sha256
                or self.cfg.vocab_size not in (0, info.vocab_size)
            ):
                raise ValueError(self._vocabulary_mismatch(split, where, theirs))
        if info is not None and self.cfg.vocab_size not in (0, info.vocab_size):  # no manifest to name
            raise ValueError(self._vocabulary_mismatch())

    def records(self) -> dict[str, str]:
        """The tokenizer travels with the run: a copy in every checkpoint and in best/."""
        return {TOKENIZER_RECORD: self._tokenizer_text} if self._tokenizer_text is not None else {}

    def encode_text(self, text: str) -> list[int]:
        """A prompt's ids: the start of a document, as the shards begin one (a template's leading
        tokens such as BOS kept, those it would append after the text dropped)."""
        if self.tokenizer is None:
            return list(text.encode())
        enc = self.tokenizer.encode(text)
        ids, special = enc.ids, enc.special_tokens_mask
        text_ends = [i for i, s in enumerate(special) if not s]
        return ids[: text_ends[-1] + 1] if text_ends else ids[:1]

    def decode_text(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return bytes(i for i in ids if i < 256).decode("utf-8", "replace")
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    # ------------------------------------------------------------------ data
    def decode(self, sample: dict) -> dict:
        """A window of seq_len + 1 tokens, the bytes of text its targets cover, a mask seed."""
        want = self.cfg.seq_len + 1
        if "ids.npy" in sample:
            if self.tokenizer is None:
                raise ValueError(
                    f"sample {sample.get('__key__')} holds token ids (ids.npy) but the recipe has no "
                    "model.tokenizer: set it to the tokenizer.json the shards were made with"
                )
            ids = np.load(io.BytesIO(sample["ids.npy"]), allow_pickle=False)
            if ids.ndim != 1 or ids.dtype.kind not in "ui" or len(ids) != want:
                raise ValueError(
                    f"sample {sample.get('__key__')}: ids.npy is {ids.dtype} of shape {ids.shape}; "
                    f"model.seq_len={self.cfg.seq_len} needs {want} ids: build shards with --seq-len {self.cfg.seq_len}"
                )
            if len(ids) and (int(ids.max()) >= self.vocab_size or int(ids.min()) < 0):
                raise ValueError(
                    f"sample {sample.get('__key__')}: token id {int(ids.max())} is outside the vocabulary of "
                    f"model.tokenizer={self.cfg.tokenizer} ({self.vocab_size} tokens)"
                )
            if "json" not in sample:
                raise KeyError(f"sample {sample.get('__key__')}: ids.npy without its json (the bytes it covers)")
            covered = int(json.loads(sample["json"])["bytes"])
            tokens = torch.from_numpy(ids.astype(np.int64))
        elif "bin" in sample:
            if self.tokenizer is not None:
                raise ValueError(
                    f"sample {sample.get('__key__')} is a byte window (bin) but model.tokenizer="
                    f"{self.cfg.tokenizer}: set model.tokenizer='' for bytes, or build token shards"
                )
            data = sample["bin"]
            if len(data) < want:
                raise ValueError(
                    f"sample holds {len(data)} bytes, model.seq_len={self.cfg.seq_len} "
                    f"needs {want}: build shards with --seq-len {self.cfg.seq_len}"
                )
            tokens = torch.frombuffer(bytearray(data[:want]), dtype=torch.uint8).long()
            covered = self.cfg.seq_len
        else:
            raise KeyError(
                f"no 'bin' field (a window of seq_len + 1 bytes) and no 'ids.npy' (token ids); the sample has "
                f"{sorted(k for k in sample if not k.startswith('__'))}"
            )
        # a per-sample seed: eval masks are the same in every run and at any world size
        seed = torch.tensor(zlib.crc32(sample["__key__"].encode()))
        return {"tokens": tokens, "seed": seed, "bytes": torch.tensor(covered)}

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
        return x.masked_fill(mask, self.mask_id), x, mask

    def _nll(self, model: nn.Module, batch: dict, fixed_masks: bool) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
        """Summed NLL (nats) over predicted tokens, how many were predicted, and the mask of
        hidden tokens (None: causal, every target is predicted)."""
        tokens = batch["tokens"]
        if self.cfg.objective == "causal":
            logits = self._logits(model, tokens[:, :-1])
            nll = F.cross_entropy(logits.float().reshape(-1, self.rows), tokens[:, 1:].reshape(-1), reduction="sum")
            return nll, tokens[:, 1:].numel(), None  # a host number: no device tensor per step
        inputs, targets, mask = self._masked_inputs(tokens, batch["seed"] if fixed_masks else None)
        logits = self._logits(model, inputs)
        nll = F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum")  # hidden tokens only
        return nll, mask.sum().float(), mask

    def _covered_bytes(self, batch: dict, mask: torch.Tensor | None) -> torch.Tensor:
        """Bytes of text the predicted tokens cover: each window's recorded bytes (masked: its
        bytes per token times its hidden tokens, an estimate where tokens differ in length)."""
        tokens = batch["tokens"]
        if "bytes" in batch:
            covered = batch["bytes"].double()
        elif self.tokenizer is None:  # a byte window covers its targets
            covered = torch.full((tokens.shape[0],), tokens.shape[1] - 1.0, dtype=torch.float64, device=tokens.device)
        else:
            raise KeyError("a batch of token ids without 'bytes' (the text its windows cover): see LMWorkload.decode")
        if mask is None:
            return covered.sum()
        return (mask.sum(1).double() * covered / mask.shape[1]).sum()

    throughput_unit = "tokens"

    def units_per_sample(self) -> int:
        return self.cfg.seq_len

    def flops_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        # the masked objective picks hidden tokens by value (host-side on the meta device);
        # the loss itself is elementwise, so the forward over the window is what counts
        tokens = batch["tokens"]
        return model(tokens[:, :-1] if self.cfg.objective == "causal" else tokens).float().sum()

    def training_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        nll, count, _ = self._nll(model, batch, fixed_masks=False)
        return nll / count / math.log(2)  # bits per predicted token (bytes: per byte)

    def eval_sums(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        nll, count, mask = self._nll(model, batch, fixed_masks=True)
        like = {"dtype": nll.dtype, "device": nll.device}
        covered = self._covered_bytes(batch, mask).to(**like)
        return {"nll_sum": nll, "count": torch.as_tensor(count, **like), "bytes": covered}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        nll = sums["nll_sum"] / sums["count"]
        return {
            "bits_per_byte": sums["nll_sum"] / sums["bytes"] / math.log(2),
            "bits_per_token": nll / math.log(2),
            "nll": nll,
            "count": sums["count"],
            "bytes": sums["bytes"],
        }

    # ------------------------------------------------------------------ samples
    @torch.no_grad()
    def sample_text(
        self, model: nn.Module, n: int, generator: torch.Generator, context: torch.Tensor | None = None
    ) -> list[str]:
        """Causal: `n` continuations of `sample_prompt` (models/lm/generate.py, with its cache).
        Masked: `context` windows (default: the source of `textwrap`) with spans hidden and
        filled by the model, shown as [fill]."""
        c, device = self.cfg, next(model.parameters()).device
        n = min(n, 4)
        if c.objective == "causal":
            from models.lm.generate import generate

            prompt = self.encode_text(c.sample_prompt) or [self.separator_id()]
            seq = generate(
                model, torch.tensor([prompt] * n, device=device), c.sample_bytes, temperature=1.0, generator=generator
            )
            return [self.decode_text(row) for row in seq.tolist()]
        if context is None:  # a fixed, readable window: the source of the stdlib's textwrap
            import inspect
            import textwrap

            ids = self.encode_text(inspect.getsource(textwrap))
            ids = (ids * (c.seq_len // len(ids) + 1))[: c.seq_len]
            context = torch.tensor([ids] * n, device=device)
        x = context[:n, : c.seq_len].to(device)
        g = torch.Generator(device=device).manual_seed(int(generator.initial_seed()))
        mask = span_mask(tuple(x.shape), c.mask_fraction, c.mask_span, g, device)
        pred = model(x.masked_fill(mask, self.mask_id))[..., : self.vocab_size].argmax(-1)
        out = []
        for row, m, p in zip(x.tolist(), mask.tolist(), pred.tolist()):
            parts, i, shown = [], 0, min(len(row), c.sample_bytes)
            while i < shown:
                j = i  # a run of hidden tokens (shown whole) or of visible ones (up to `shown`)
                while j < (len(row) if m[i] else shown) and m[j] == m[i]:
                    j += 1
                parts.append("[" + self.decode_text(p[i:j]) + "]" if m[i] else self.decode_text(row[i:j]))
                i = j
            out.append("".join(parts))
        return out

    def separator_id(self) -> int:
        """What an empty prompt starts from: a newline (bytes), else the tokenizer's separator."""
        if self.tokenizer is None:
            return 10
        if self.tokenizer_info.eos_id is None:
            raise ValueError(
                f"an empty prompt needs a document separator, and model.tokenizer={self.cfg.tokenizer} has none"
            )
        return self.tokenizer_info.eos_id

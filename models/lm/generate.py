"""Sampling text from a causal LM, one token at a time.

Softmax attention keeps a key/value cache and linear attention its recurrent state, so each
new token costs one token's forward pass; FLASH has neither and runs the whole window again
for every token. `cache=False` runs the window again for every kind: the reference that the
cached path must match.

The model sees at most `model.seq_len` tokens, with positions counted from the window's first
token, as in training. With a cache, a context that outgrows the window drops its oldest half
and the remaining half is read again (one forward pass) to rebuild the cache at positions from
0: a cached key would otherwise carry a position and a context that the window no longer has.
Between slides every token sees the tokens since the last slide, half a window to a whole one.
`cache=False` slides the same way for softmax and linear attention, so both paths give the same
tokens; FLASH, which recomputes anyway, always sees the last `seq_len` tokens.
"""

from __future__ import annotations

import torch
from torch import nn


def next_token(
    logits: torch.Tensor, *, temperature: float, top_k: int, generator: torch.Generator | None
) -> torch.Tensor:
    """(B, V) logits -> (B, 1) ids: greedy at temperature 0, else sampled from softmax(logits / T)
    over the top_k most likely ids (0: all). The draw runs on the CPU with `generator` (a CPU
    generator), so a seed gives the same tokens on every device."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=generator).to(logits.device)


class Window:
    """The next-token logits of a growing sequence, under the sliding-window rule above."""

    def __init__(self, model: nn.Module, cache: bool):
        self.model, self.size = model, model.cfg.seq_len
        self.slides = model.has_state  # softmax, linear: the half-window rule; FLASH: the last seq_len
        self.cache = cache and self.slides
        self.start, self.states, self.fed = None, None, 0

    def _window_start(self, length: int) -> int:
        if not self.slides:
            return max(0, length - self.size)
        if self.start is None:  # a prompt longer than the window: its last seq_len tokens
            return max(0, length - self.size)
        if length - self.start > self.size:
            return length - max(1, self.size // 2)
        return self.start

    def logits(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, vocab_size) logits of token L + 1."""
        start = self._window_start(seq.shape[1])
        if start != self.start:
            self.start, self.states, self.fed = start, None, start
        if not self.cache:
            out = self.model(seq[:, start:], last_only=True)
        else:
            if self.states is None:
                dtype = self.model.embed.weight.dtype
                self.states = self.model.init_states(seq.shape[0], device=seq.device, dtype=dtype)
            out, self.states = self.model(seq[:, self.fed :], self.states, last_only=True)
            self.fed = seq.shape[1]
        return out[:, -1, : self.model.vocab_size]


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    cache: bool = True,
) -> torch.Tensor:
    """(B, P) prompt ids (P >= 1) -> (B, P + max_new_tokens) ids, on the model's device. `model`
    is a causal LanguageModel (models/lm/workload.py), unwrapped, in eval mode."""
    if model.cfg.objective != "causal":
        raise ValueError(f"generation needs a causal model; this one has model.objective={model.cfg.objective}")
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"the prompt must be (batch, tokens) with at least one token, got shape {tuple(prompt.shape)}")
    window = Window(model, cache)
    seq = prompt
    for _ in range(max_new_tokens):
        nxt = next_token(window.logits(seq), temperature=temperature, top_k=top_k, generator=generator)
        seq = torch.cat([seq, nxt], dim=1)
    return seq

"""Residual blocks for the LM family; `attention:` picks one of four kinds, `block:` the style.

Every block maps x (B, N, D) -> (B, N, D), normalises its own input (pre-norm) and adds
its own residual, so a model is embedding -> blocks -> final norm -> head.

- softmax: multi-head softmax attention (SDPA, flash kernels on GPU) + an MLP; a key/value
  cache (`SoftmaxBlock.extend`) for generation.
- linear: Katharopoulos et al. 2020, phi(x) = elu(x) + 1, chunk-wise causal form and an
  RNN form (`LinearBlock.step`, `LinearBlock.extend`) for generation.
- flash / flash_quad: Hua et al. 2022's gated attention unit (GAU), which replaces
  attention + MLP, with mixed chunk attention (FLASH) or full relu^2 attention (FLASH-Quad).

Block styles: `classic` (LayerNorm with biases, GELU MLP of mlp_ratio x dim) and `llama`
(Touvron et al. 2023: RMSNorm, no biases, SwiGLU MLP), whose softmax model has the module
names and shapes of a Llama decoder.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

ATTENTION_KINDS = ("softmax", "linear", "flash", "flash_quad")
BLOCK_KINDS = ("classic", "llama")
# softmax attention's SDPA kernel (`model.sdpa_backend`); auto lets torch choose per call
SDPA_BACKENDS = {
    "auto": None,
    "math": SDPBackend.MATH,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Running sums over the sequence are kept in at least float32 (bf16 sums drift)."""
    return torch.promote_types(dtype, torch.float32)


def _exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of everything strictly before each index along dim, in the accumulation dtype."""
    total = x.cumsum(dim, dtype=_acc_dtype(x.dtype))
    return torch.cat([torch.zeros_like(total.narrow(dim, 0, 1)), total.narrow(dim, 0, total.size(dim) - 1)], dim)


def _causal_mask(n: int, device: torch.device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def _chunk(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Zero-pad dim to a multiple of size and split it into (chunks, size)."""
    n = x.size(dim)
    chunks = -(-n // size)
    dim = dim % x.dim()
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, chunks * size - n]
    x = F.pad(x, pad)
    return x.unflatten(dim, (chunks, size))


class Rotary(nn.Module):
    """RoPE (Su et al. 2021) on the last dim; cos/sin are cached per device and dtype and grown
    on demand, outside the state_dict, so checkpoints do not depend on sequence length."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary dim must be even, got {dim}")
        self.dim, self.base = dim, base
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _cos_sin(self, length: int, device: torch.device, dtype: torch.dtype):
        """Half-width tables: both halves of a rotated pair share one angle."""
        key = (device, dtype)
        cached = self._cache.get(key)
        if cached is None or cached[0].shape[0] < length:
            length = max(length, 2 * cached[0].shape[0] if cached is not None else 0)
            exact = _acc_dtype(dtype)
            inv_freq = self.base ** -(torch.arange(0, self.dim, 2, device=device, dtype=exact) / self.dim)
            angles = torch.outer(torch.arange(length, device=device, dtype=exact), inv_freq)
            cached = (angles.cos().to(dtype), angles.sin().to(dtype))
            if torch.compiler.is_compiling():  # a cache filled inside a traced call fails its guard: a recompile
                return cached
            self._cache[key] = cached
        return cached

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        n = x.shape[-2]
        cos, sin = self._cos_sin(offset + n, x.device, x.dtype)
        cos, sin = cos[offset : offset + n], sin[offset : offset + n]
        # x * [cos, cos] + [-x2, x1] * [sin, sin], written on the halves: the same numbers with
        # a quarter fewer elementwise passes (measured 25% off RoPE's forward and backward on CPU)
        x1, x2 = x.chunk(2, -1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


# ---------------------------------------------------------------- norms and MLPs


class RMSNorm(nn.Module):
    """Zhang & Sennrich 2019: weight * x / rms(x), computed in float32 for half-precision x."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        exact = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        normed = exact * torch.rsqrt(exact.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class SwiGLU(nn.Module):
    """Shazeer 2020's gated MLP: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def swiglu_hidden(dim: int, mlp_ratio: int, mlp_hidden: int = 0) -> int:
    """The SwiGLU width: `mlp_hidden`, else 2/3 of the classic mlp_ratio x dim (the same parameter
    count with three matrices instead of two) rounded up to a multiple of 256 (64 below dim 1024)."""
    if mlp_hidden:
        return mlp_hidden
    multiple = 256 if dim >= 1024 else 64
    raw = math.ceil(2 * mlp_ratio * dim / 3)
    return -(-raw // multiple) * multiple


def make_norm(block: str, dim: int, eps: float = 1e-5) -> nn.Module:
    """The block style's normalisation: LayerNorm (classic) or RMSNorm (llama)."""
    return RMSNorm(dim, eps) if block == "llama" else nn.LayerNorm(dim, eps=eps)


# ---------------------------------------------------------------- linear attention


def _phi(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


def naive_causal_linear_attention(q, k, v, eps: float = 1e-6) -> torch.Tensor:
    """Reference: the (N, N) matrix phi(q) phi(k)^T, masked to j <= i and row-normalised."""
    scores = (_phi(q) @ _phi(k).transpose(-1, -2)).masked_fill(~_causal_mask(q.shape[-2], q.device), 0)
    return scores @ v / (scores.sum(-1, keepdim=True) + eps)


def linear_attention(q, k, v, causal: bool, chunk_size: int = 256, eps: float = 1e-6) -> torch.Tensor:
    """out_i = phi(q_i) S_i / (phi(q_i) . z_i), S_i = sum_j phi(k_j) v_j^T, z_i = sum_j phi(k_j).

    q, k, v: (B, H, N, d). Causal sums run over j <= i chunk by chunk: a masked (C, C) term inside
    each chunk plus the state (S, z) of all earlier chunks, so memory grows linearly in N.
    """
    q, k = _phi(q), _phi(k)
    acc = _acc_dtype(v.dtype)
    if not causal:
        state = (k.transpose(-1, -2) @ v).to(q.dtype)
        z = k.sum(-2, dtype=acc)
        num = q @ state
        den = (q.to(acc) * z.unsqueeze(-2)).sum(-1)
        return (num.to(acc) / (den.unsqueeze(-1) + eps)).to(v.dtype)

    n = q.shape[-2]
    size = min(chunk_size, n)
    # Zero padding after phi: padded keys carry no weight and padded rows are cut off below.
    qc, kc, vc = (_chunk(t, -2, size) for t in (q, k, v))  # (B, H, G, C, d)
    scores = (qc @ kc.transpose(-1, -2)).masked_fill(~_causal_mask(size, q.device), 0)
    state = _exclusive_cumsum(kc.transpose(-1, -2) @ vc, 2)  # (B, H, G, d, d_v)
    z = _exclusive_cumsum(kc.sum(-2, dtype=acc), 2)  # (B, H, G, d)
    num = scores @ vc + qc @ state.to(qc.dtype)
    den = scores.sum(-1, dtype=acc) + (qc.to(acc) * z.unsqueeze(-2)).sum(-1)
    out = (num.to(acc) / (den.unsqueeze(-1) + eps)).to(v.dtype)
    return out.flatten(2, 3)[..., :n, :]


# ---------------------------------------------------------------- multi-head blocks


class _MultiHeadBlock(nn.Module):
    """norm -> q, k, v (RoPE on q, k) -> mix -> out proj -> residual; then norm -> MLP -> residual.
    classic: LayerNorm and a GELU MLP with biases; llama: RMSNorm and a SwiGLU MLP, no biases.
    Dropout is on the residual branches only, the same for every kind.

    `forward(x)` is the whole sequence; `forward(x, state)` continues a causal sequence from
    `state` (from `init_state`) and returns (y, new state), for generation: x then holds only
    the new tokens. Both go through forward, so wrappers' hooks (FSDP) run for either."""

    def __init__(
        self,
        dim: int,
        heads: int,
        causal: bool,
        mlp_ratio: int,
        dropout: float,
        *,
        block: str = "classic",
        mlp_hidden: int = 0,
        norm_eps: float = 1e-5,
        rope_base: float = 10000.0,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        if block not in BLOCK_KINDS:
            raise ValueError(f"unknown block style {block!r}; choose one of {', '.join(BLOCK_KINDS)}")
        self.heads, self.head_dim, self.causal = heads, dim // heads, causal
        self.attn_norm = make_norm(block, dim, norm_eps)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.rotary = Rotary(self.head_dim, base=rope_base)
        self.mlp_norm = make_norm(block, dim, norm_eps)
        if block == "llama":
            self.mlp = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio, mlp_hidden))
        else:
            self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.drop = nn.Dropout(dropout)

    def _qkv(self, x: torch.Tensor, offset: int = 0):
        q, k, v = self.qkv(self.attn_norm(x)).unflatten(-1, (3, self.heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        return self.rotary(q, offset), self.rotary(k, offset), v

    def _finish(self, x: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.out(mixed.transpose(1, 2).flatten(2)))
        return x + self.drop(self.mlp(self.mlp_norm(x)))

    def mix(self, q, k, v) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, state: dict | None = None):
        if state is not None:
            if not self.causal:
                raise RuntimeError("a state continues a causal sequence; this block is bidirectional")
            return self.extend(x, state)
        return self._finish(x, self.mix(*self._qkv(x)))


class SoftmaxBlock(_MultiHeadBlock):
    def __init__(
        self,
        dim: int,
        heads: int,
        causal: bool,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        sdpa_backend: str = "auto",
        **style,
    ):
        super().__init__(dim, heads, causal, mlp_ratio, dropout, **style)
        self.sdpa_backend = SDPA_BACKENDS[sdpa_backend]

    def _attend(self, q, k, v, *, is_causal: bool, mask: torch.Tensor | None = None):
        if self.sdpa_backend is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        with sdpa_kernel(self.sdpa_backend):  # here: activation checkpointing recomputes with the same kernel
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)

    def mix(self, q, k, v):
        return self._attend(q, k, v, is_causal=self.causal)

    def init_state(self, batch: int, device=None, dtype: torch.dtype = torch.float32) -> dict:
        """An empty key/value cache: k, v (B, H, 0, d) after RoPE, pos (tokens seen)."""
        empty = torch.zeros(batch, self.heads, 0, self.head_dim, device=device, dtype=dtype)
        return {"k": empty, "v": empty, "pos": 0}

    def extend(self, x: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """The new tokens x (B, n, D) attend to the cache and to each other causally."""
        pos, n = state["pos"], x.shape[1]
        q, k, v = self._qkv(x, offset=pos)
        if pos:  # (an empty cache is not joined: under autocast its dtype may not be the new keys')
            k, v = torch.cat([state["k"], k], 2), torch.cat([state["v"], v], 2)
        if pos == 0 or n == 1:  # the whole prefix, or one token that sees everything
            mixed = self._attend(q, k, v, is_causal=pos == 0 and n > 1)
        else:  # query i sits at pos + i; SDPA's is_causal aligns to the top left, not to the end
            mask = torch.arange(pos + n, device=x.device) <= torch.arange(pos, pos + n, device=x.device)[:, None]
            mixed = self._attend(q, k, v, is_causal=False, mask=mask)
        return self._finish(x, mixed), {"k": k, "v": v, "pos": pos + n}


class LinearBlock(_MultiHeadBlock):
    """Linear attention; RoPE goes on q, k before phi, so phi keeps the kernel positive."""

    eps = 1e-6

    def __init__(
        self,
        dim: int,
        heads: int,
        causal: bool,
        chunk_size: int = 256,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        **style,
    ):
        super().__init__(dim, heads, causal, mlp_ratio, dropout, **style)
        self.chunk_size = chunk_size

    def mix(self, q, k, v):
        return linear_attention(q, k, v, self.causal, self.chunk_size, self.eps)

    def init_state(self, batch: int, device=None, dtype: torch.dtype = torch.float32) -> dict:
        """The RNN state before the first token: S (B, H, d, d), z (B, H, d), pos (int)."""
        d, acc = self.head_dim, _acc_dtype(dtype)
        return {
            "S": torch.zeros(batch, self.heads, d, d, device=device, dtype=acc),
            "z": torch.zeros(batch, self.heads, d, device=device, dtype=acc),
            "pos": 0,
        }

    def step(self, x_t: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """One token x_t (B, D) of the causal block as an RNN; returns y_t and a new state."""
        if not self.causal:
            raise RuntimeError("step() is the causal block's recurrent form")
        q, k, v = (t[:, :, 0] for t in self._qkv(x_t[:, None], offset=state["pos"]))  # (B, H, d)
        q, k = _phi(q), _phi(k)
        acc = state["S"].dtype
        S = state["S"] + k.to(acc).unsqueeze(-1) * v.to(acc).unsqueeze(-2)
        z = state["z"] + k.to(acc)
        num = (q.to(acc).unsqueeze(-1) * S).sum(-2)
        den = (q.to(acc) * z).sum(-1, keepdim=True)
        mixed = (num / (den + self.eps)).to(v.dtype)
        y = self._finish(x_t[:, None], mixed[:, :, None])[:, 0]
        return y, {"S": S, "z": z, "pos": state["pos"] + 1}

    def extend(self, x: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """New tokens x (B, n, D): from the empty state in the chunk-wise parallel form (a prompt),
        else token by token."""
        if state["pos"] > 0 or x.shape[1] == 1:
            ys = []
            for t in range(x.shape[1]):
                y, state = self.step(x[:, t], state)
                ys.append(y)
            return torch.stack(ys, 1), state
        q, k, v = self._qkv(x)
        y = self._finish(x, linear_attention(q, k, v, True, self.chunk_size, self.eps))
        acc = state["S"].dtype
        k = _phi(k).to(acc)
        return y, {"S": k.transpose(-1, -2) @ v.to(acc), "z": k.sum(-2), "pos": x.shape[1]}


# ---------------------------------------------------------------- GAU / FLASH


def relu2_attention(q, k, v, *, causal: bool, scale_len: int) -> torch.Tensor:
    """FLASH-Quad's kernel relu(q k^T / scale_len)^2 over the whole sequence; (B, N, .) inputs."""
    kernel = F.relu(q @ k.transpose(-1, -2) / scale_len) ** 2
    if causal:
        kernel = kernel.masked_fill(~_causal_mask(q.shape[-2], q.device), 0)
    return kernel @ v


def mixed_chunk_attention(quad_q, quad_k, lin_q, lin_k, v, *, causal: bool, chunk_size: int) -> torch.Tensor:
    """FLASH's mixed chunk attention on (B, N, .) inputs: relu^2 attention inside each chunk of C
    tokens plus unnormalised linear attention across chunks (only earlier chunks when causal).

    The tail is zero-padded; padded values v are zero, so padding adds nothing to either part.
    """
    n = v.shape[-2]
    size = min(chunk_size, n)
    qq, qk, lq, lk, vc = (_chunk(t, -2, size) for t in (quad_q, quad_k, lin_q, lin_k, v))  # (B, G, C, .)
    quad = relu2_attention(qq, qk, vc, causal=causal, scale_len=chunk_size)
    kv = lk.transpose(-1, -2) @ vc / chunk_size  # (B, G, s, e)
    if causal:
        kv = _exclusive_cumsum(kv, 1)
    else:
        kv = kv.sum(1, keepdim=True, dtype=_acc_dtype(kv.dtype))
    out = quad + lq @ kv.to(lq.dtype)
    return out.flatten(1, 2)[:, :n]


class ScaleOffset(nn.Module):
    """Per-dimension gamma, beta that turn the shared z into several queries and keys."""

    def __init__(self, dim: int, count: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(count, dim) * 0.02)
        self.beta = nn.Parameter(torch.zeros(count, dim))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (z.unsqueeze(-2) * self.gamma + self.beta).unbind(-2)


class FlashBlock(nn.Module):
    """One gated attention unit: out = x + W_o (u * attention(q, k, v)), u, v, z = SiLU(W x).

    It replaces attention + MLP, so a FLASH model stacks about twice as many of them. The
    kernel scale is 1/chunk_size in both modes: the paper's 1/N would make a causal prefix's
    outputs depend on how many tokens follow it. RoPE carries position; there is no extra
    relative-position bias. The llama style takes RMSNorm and drops the biases of W and W_o
    (ScaleOffset's per-dimension offsets stay: they make the queries and keys differ).
    """

    def __init__(
        self,
        dim: int,
        causal: bool,
        expansion: int = 2,
        qk_dim: int = 128,
        chunk_size: int = 256,
        quad: bool = False,
        dropout: float = 0.0,
        *,
        block: str = "classic",
        norm_eps: float = 1e-5,
        rope_base: float = 10000.0,
    ):
        super().__init__()
        if block not in BLOCK_KINDS:
            raise ValueError(f"unknown block style {block!r}; choose one of {', '.join(BLOCK_KINDS)}")
        self.causal, self.chunk_size, self.quad = causal, chunk_size, quad
        self.split = (expansion * dim, expansion * dim, qk_dim)
        bias = block == "classic"
        self.norm = make_norm(block, dim, norm_eps)
        self.hidden = nn.Linear(dim, sum(self.split), bias=bias)
        self.qk = ScaleOffset(qk_dim, 2 if quad else 4)  # (quad_q, quad_k[, lin_q, lin_k])
        self.rotary = Rotary(qk_dim, base=rope_base)
        self.out = nn.Linear(expansion * dim, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v, z = F.silu(self.hidden(self.norm(x))).split(self.split, -1)
        qk = [self.rotary(t) for t in self.qk(z)]
        if self.quad:
            mixed = relu2_attention(*qk, v, causal=self.causal, scale_len=self.chunk_size)
        else:
            mixed = mixed_chunk_attention(*qk, v, causal=self.causal, chunk_size=self.chunk_size)
        return x + self.drop(self.out(u * mixed))


# ---------------------------------------------------------------- choosing and counting


def make_block(
    kind: str,
    *,
    dim: int,
    heads: int,
    causal: bool,
    chunk_size: int = 256,
    expansion: int = 2,
    qk_dim: int = 128,
    mlp_ratio: int = 4,
    dropout: float = 0.0,
    sdpa_backend: str = "auto",
    block: str = "classic",
    mlp_hidden: int = 0,
    norm_eps: float = 1e-5,
    rope_base: float = 10000.0,
) -> nn.Module:
    style = {"block": block, "norm_eps": norm_eps, "rope_base": rope_base}
    if kind == "softmax":
        return SoftmaxBlock(
            dim,
            heads,
            causal,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            sdpa_backend=sdpa_backend,
            mlp_hidden=mlp_hidden,
            **style,
        )
    if kind == "linear":
        return LinearBlock(
            dim,
            heads,
            causal,
            chunk_size=chunk_size,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            mlp_hidden=mlp_hidden,
            **style,
        )
    if kind in ("flash", "flash_quad"):
        return FlashBlock(
            dim,
            causal,
            expansion=expansion,
            qk_dim=qk_dim,
            chunk_size=chunk_size,
            quad=kind == "flash_quad",
            dropout=dropout,
            **style,
        )
    raise ValueError(f"unknown attention kind {kind!r}; choose one of {', '.join(ATTENTION_KINDS)}")


def attention_flops_per_token(
    kind: str,
    *,
    dim: int,
    heads: int,
    tokens: int,
    chunk_size: int = 256,
    expansion: int = 2,
    qk_dim: int = 128,
    mlp_ratio: int = 4,
    causal: bool,
    block: str = "classic",
    mlp_hidden: int = 0,
) -> float:
    """Forward matmul FLOPs (2 x multiply-adds) per token of one block, for MFU.

    With D = dim, N = tokens, d = D / heads, C = min(chunk_size, N), e = expansion D, s = qk_dim,
    and c = 1/2 on quadratic (masked) terms when causal, else 1:
      softmax:     2 [4 D^2 + M + 2 c N D]                     (q, k, v, out, MLP; q k^T, A v)
      linear:      2 [4 D^2 + M + 2 D d + 2 c C D [causal]]    (k v^T, q S; in-chunk terms)
      flash:       2 [3 e D + s D + c C (s + e) + 2 s e]        (W, W_o; in-chunk relu^2; k^T v, q S)
      flash_quad:  2 [3 e D + s D + c N (s + e)]
    where the MLP's M = 2 mlp_ratio D^2 (classic) or 3 D h with h the SwiGLU width (llama).
    Norms, activations, RoPE and normalisers are left out.
    """
    D, c = dim, 0.5 if causal else 1.0
    C = min(chunk_size, tokens)
    if kind in ("softmax", "linear"):
        mlp = 3 * D * swiglu_hidden(D, mlp_ratio, mlp_hidden) if block == "llama" else 2 * mlp_ratio * D * D
        macs = 4 * D * D + mlp
        if kind == "softmax":
            macs += 2 * c * tokens * D
        else:
            macs += 2 * D * (D // heads) + (2 * c * C * D if causal else 0)
    elif kind in ("flash", "flash_quad"):
        e, s = expansion * D, qk_dim
        macs = 3 * e * D + s * D
        macs += c * tokens * (s + e) if kind == "flash_quad" else c * C * (s + e) + 2 * s * e
    else:
        raise ValueError(f"unknown attention kind {kind!r}; choose one of {', '.join(ATTENTION_KINDS)}")
    return 2 * macs

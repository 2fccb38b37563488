"""DETR (Carion et al. 2020), small: a conv backbone of our own (no pretrained ResNet here),
a post-norm transformer encoder-decoder with sine positions added to queries and keys in
every layer, learned object queries, and class / box heads on every decoder layer's output
(the auxiliary decoding losses read the earlier ones)."""

from __future__ import annotations

import math

import torch
from torch import nn


def conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    # GroupNorm: batch statistics would differ between ranks and batch sizes
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU(inplace=True))


class Backbone(nn.Module):
    """(B, 3, H, W) -> (B, d, H/8, W/8)."""

    def __init__(self, width: int, d_model: int):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            conv(3, w, 2),
            conv(w, w, 1),
            conv(w, 2 * w, 2),
            conv(2 * w, 2 * w, 1),
            conv(2 * w, 4 * w, 2),
            conv(4 * w, 4 * w, 1),
            nn.Conv2d(4 * w, d_model, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def sine_positions(h: int, w: int, d_model: int, device=None) -> torch.Tensor:
    """(h*w, d_model) fixed 2-D sine embedding: half the channels for y, half for x."""
    n = d_model // 4
    freqs = 10000 ** (-torch.arange(n, device=device, dtype=torch.float32) / n)
    y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 * math.pi
    x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 * math.pi
    ey = torch.cat([(y[:, None] * freqs).sin(), (y[:, None] * freqs).cos()], 1)  # (h, 2n)
    ex = torch.cat([(x[:, None] * freqs).sin(), (x[:, None] * freqs).cos()], 1)
    return torch.cat([ey[:, None, :].expand(h, w, -1), ex[None, :, :].expand(h, w, -1)], -1).reshape(h * w, -1)


class FFN(nn.Sequential):
    def __init__(self, d: int, hidden: int, dropout: float):
        super().__init__(nn.Linear(d, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, d))


class EncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ffn = FFN(d, ffn, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = src + pos
        src = self.norm1(src + self.drop(self.attn(q, q, src, need_weights=False)[0]))
        return self.norm2(src + self.drop(self.ffn(src)))


class DecoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ffn = FFN(d, ffn, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)

    def forward(self, tgt, memory, pos, query_pos):
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.drop(self.self_attn(q, q, tgt, need_weights=False)[0]))
        tgt = self.norm2(tgt + self.drop(self.cross_attn(tgt + query_pos, memory + pos, memory, need_weights=False)[0]))
        return self.norm3(tgt + self.drop(self.ffn(tgt)))


class DETR(nn.Module):
    """forward(images) -> (logits (L, B, Q, C+1), boxes (L, B, Q, 4)) for the L decoder
    layers, last layer last; boxes are normalized (cx, cy, w, h) in (0, 1); logit C is
    "no object"."""

    def __init__(
        self,
        *,
        num_classes: int,
        num_queries: int,
        d_model: int,
        heads: int,
        enc_layers: int,
        dec_layers: int,
        ffn: int,
        dropout: float,
        backbone_width: int,
    ):
        super().__init__()
        self.backbone = Backbone(backbone_width, d_model)
        self.encoder = nn.ModuleList(EncoderLayer(d_model, heads, ffn, dropout) for _ in range(enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(d_model, heads, ffn, dropout) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(d_model)
        self.queries = nn.Embedding(num_queries, d_model)
        self.class_head = nn.Linear(d_model, num_classes + 1)
        self.box_head = nn.Sequential(
            nn.Linear(d_model, d_model),
            nn.ReLU(inplace=True),
            nn.Linear(d_model, d_model),
            nn.ReLU(inplace=True),
            nn.Linear(d_model, 4),
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.backbone(images)
        b, d, h, w = f.shape
        src = f.flatten(2).transpose(1, 2)  # (B, h*w, d)
        pos = sine_positions(h, w, d, device=f.device).to(src.dtype)[None]
        for layer in self.encoder:
            src = layer(src, pos)
        query_pos = self.queries.weight[None].expand(b, -1, -1)
        tgt, outs = torch.zeros_like(query_pos), []
        for layer in self.decoder:
            tgt = layer(tgt, src, pos, query_pos)
            outs.append(self.decoder_norm(tgt))
        hs = torch.stack(outs)  # (L, B, Q, d)
        return self.class_head(hs), self.box_head(hs).sigmoid()

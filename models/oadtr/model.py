"""The two online action detectors: OadTR (Wang et al. 2021) and a GRU over the same window.

Both read a window x of T frame features (B, T, D), the current frame last, and return the
current frame's class logits (B, K + 1); OadTR also returns logits of the next l_d frames
(B, l_d, K + 1), from its decoder.
"""

from __future__ import annotations

import torch
from torch import nn


class OadTR(nn.Module):
    """Encoder: the frames, linearly projected, after a learnable task token, plus a learned
    positional embedding, through a transformer encoder. Decoder: l_d learned queries attend
    to the encoder's output and predict the future frames' classes. The current frame is
    classified from the task token's output concatenated with the decoder's mean output."""

    def __init__(
        self,
        *,
        feature_dim: int,
        window: int,
        num_classes: int,
        anticipation: int,
        dim: int,
        heads: int,
        encoder_layers: int,
        decoder_layers: int,
        ff_mult: int,
        dropout: float,
    ):
        super().__init__()
        self.embed = nn.Linear(feature_dim, dim)
        self.task_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.zeros(1, window + 1, dim))
        self.queries = nn.Parameter(torch.zeros(1, anticipation, dim))
        for p in (self.task_token, self.position, self.queries):
            nn.init.trunc_normal_(p, std=0.02)
        self.dropout = nn.Dropout(dropout)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(
                dim, heads, ff_mult * dim, dropout, activation="gelu", batch_first=True, norm_first=True
            ),
            encoder_layers,
            norm=nn.LayerNorm(dim),
            enable_nested_tensor=False,
        )
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(
                dim, heads, ff_mult * dim, dropout, activation="gelu", batch_first=True, norm_first=True
            ),
            decoder_layers,
            norm=nn.LayerNorm(dim),
        )
        self.future_head = nn.Linear(dim, num_classes)
        self.current_head = nn.Linear(2 * dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        tokens = torch.cat([self.task_token.expand(b, -1, -1), self.embed(x)], 1)
        memory = self.encoder(self.dropout(tokens + self.position))
        future = self.decoder(self.queries.expand(b, -1, -1), memory)
        current = self.current_head(torch.cat([memory[:, 0], future.mean(1)], -1))
        return current, self.future_head(future)


class WindowGRU(nn.Module):
    """A GRU over the window; the current frame is classified from its last hidden state."""

    def __init__(self, *, feature_dim: int, num_classes: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.gru = nn.GRU(feature_dim, hidden, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, _ = self.gru(x)
        return self.head(self.dropout(out[:, -1])), None

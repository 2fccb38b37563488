"""A pixel check of text-to-image samples: does an image's dominant colour match the colour
its prompt names? Meaningful for data whose captions name flat colours (the captioned shapes);
the palette comes with the data (`palette.json`), so the check knows no dataset itself."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Palette:
    colors: dict[str, tuple[int, int, int]]  # the colour words of the captions -> RGB
    background: tuple[int, int, int]

    @classmethod
    def load(cls, path: str | Path) -> Palette:
        try:
            raw = json.loads(Path(path).read_text())
            return cls({k: tuple(v) for k, v in raw["colors"].items()}, tuple(raw["background"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"model.color_palette={path} is not a palette file "
                f"({{'colors': {{name: [r, g, b]}}, 'background': [r, g, b]}}): {exc}"
            ) from None

    def dominant(self, image: np.ndarray, min_fraction: float = 0.02) -> str | None:
        """The palette colour nearest to most non-background pixels of an (H, W, 3) uint8
        image, or None when fewer than `min_fraction` of the pixels differ from the background."""
        px = image.reshape(-1, 3).astype(np.float32)
        coloured = np.abs(px - np.array(self.background, np.float32)).sum(1) > 60
        if coloured.mean() < min_fraction:
            return None
        palette = np.array(list(self.colors.values()), np.float32)
        nearest = np.argmin(((px[coloured, None, :] - palette[None]) ** 2).sum(-1), axis=1)
        return list(self.colors)[int(np.bincount(nearest, minlength=len(self.colors)).argmax())]

    def named(self, prompt: str) -> str | None:
        """The one palette colour a prompt names, or None (none, or several)."""
        words = set(prompt.lower().replace(",", " ").split())
        found = [c for c in self.colors if c in words]
        return found[0] if len(found) == 1 else None

"""Score-based workload on points: the 2-D mixture of `launch.make_shards mixture2d`
(`model.data_kind=mixture2d`) or the binarized 8x8 digits as 64-vectors in [-1, 1]
(`model.data_kind=digits`). A time-conditioned MLP learns the score by denoising score
matching under a VE, VP or sub-VP SDE, or NCSN's noise levels (`model.sde=smld`). At the end
of a run every sampler draws points and their sliced Wasserstein distance to true data is
reported (`swd_<sampler>`), beside the distance between two true samples (`swd_reference`):
fresh mixture samples, or for digits the test split against a draw from the train split.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch import nn

from models.base import Workload
from models.registry import register
from models.score import sde as S

MIXTURE_COMPONENTS, MIXTURE_RADIUS, MIXTURE_STD = 8, 2.0, 0.15


def mixture2d(n: int, generator: torch.Generator) -> torch.Tensor:
    """n points of 8 Gaussians (std 0.15) evenly spaced on a circle of radius 2."""
    k = torch.randint(MIXTURE_COMPONENTS, (n,), generator=generator)
    angle = 2 * math.pi * k.double() / MIXTURE_COMPONENTS
    centers = MIXTURE_RADIUS * torch.stack([angle.cos(), angle.sin()], 1)
    return (centers + MIXTURE_STD * torch.randn(n, 2, generator=generator, dtype=torch.float64)).float()


DATA_KINDS = ("mixture2d", "digits")
DIGIT_SIZE = 8


def digit_vectors(split: str) -> torch.Tensor:
    """One split of scikit-learn's binarized digits (the split the shards are made from) as
    (N, 64) vectors in [-1, 1], the same values `decode` gives the shards' PNGs."""
    from data_pipelines.sources.digits import binarized_digits, split_indices

    images, _ = binarized_digits()
    on = torch.from_numpy(images[split_indices()[split]].reshape(-1, DIGIT_SIZE ** 2)).float()
    return on * 2 - 1


def draw(x: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """x itself when it has n rows, else n rows drawn with replacement."""
    return x if len(x) == n else x[torch.randint(len(x), (n,), generator=generator)]


@dataclass(kw_only=True)
class ScoreConfig:
    name: str = "score"
    sde: str = "vp"  # ve | vp | subvp | smld
    data_kind: str = "mixture2d"  # mixture2d (json points) | digits (8x8 PNGs, dims 64)
    dims: int = 2
    hidden: int = 256
    layers: int = 3
    sigma_min: float = 0.01  # ve, smld
    sigma_max: float = 5.0  # ve, smld: about the largest distance between data points
    beta_min: float = 0.1  # vp, subvp
    beta_max: float = 20.0
    smld_levels: int = 10
    eval_samples: int = 2000  # points each sampler draws at the end (digits: 360 = the test split)
    sampler_steps: int = 500
    langevin_steps: int = 100  # smld: steps per noise level
    langevin_lr: float = 2e-5  # smld: step = lr (sigma / sigma_min)^2


class ScoreMLP(nn.Module):
    """s(x, t) = net([x, fourier(c)]) / std, with c = log sigma (VE, SMLD) or t (VP family):
    dividing by the kernel's std keeps the network's output of order one at every noise level."""

    def __init__(self, dims: int, hidden: int, layers: int, features: int = 32):
        super().__init__()
        self.register_buffer("freqs", torch.randn(features // 2, generator=torch.Generator().manual_seed(0)) * 4)
        blocks, width = [], dims + features
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.net = nn.Sequential(*blocks, nn.Linear(width, dims))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        angles = cond[:, None] * self.freqs[None] * 2 * math.pi
        h = torch.cat([x, angles.sin(), angles.cos()], 1)
        return self.net(h) / std[:, None]


@register("score")
class ScoreWorkload(Workload):
    Config = ScoreConfig
    best_metric = "dsm_loss"

    def __init__(self, cfg: ScoreConfig):
        if cfg.sde not in (*S.SDES, "smld"):
            raise ValueError(f"model.sde '{cfg.sde}' is not one of ve, vp, subvp, smld")
        if cfg.data_kind not in DATA_KINDS:
            raise ValueError(f"model.data_kind '{cfg.data_kind}' is not one of {', '.join(DATA_KINDS)}")
        if cfg.data_kind == "digits" and cfg.dims != DIGIT_SIZE ** 2:
            raise ValueError(f"model.data_kind 'digits' needs model.dims {DIGIT_SIZE ** 2} (8x8 pixels), "
                             f"got {cfg.dims}")
        super().__init__(cfg)
        c = cfg
        self.sde = {"ve": lambda: S.VESDE(c.sigma_min, c.sigma_max), "vp": lambda: S.VPSDE(c.beta_min, c.beta_max),
                    "subvp": lambda: S.SubVPSDE(c.beta_min, c.beta_max), "smld": lambda: None}[c.sde]()
        self.sigmas = S.geometric_sigmas(c.sigma_max, c.sigma_min, c.smld_levels)

    def build_model(self) -> nn.Module:
        return ScoreMLP(self.cfg.dims, self.cfg.hidden, self.cfg.layers)

    def decode(self, sample: dict) -> torch.Tensor:
        if self.cfg.data_kind == "digits":
            return self._decode_digit(sample)
        if "json" not in sample:
            raise KeyError(f"no 'json' field with the point; the sample has "
                           f"{sorted(k for k in sample if not k.startswith('__'))}")
        x = torch.tensor(json.loads(sample["json"])["x"], dtype=torch.float32)
        if x.shape != (self.cfg.dims,):
            raise ValueError(f"point has shape {tuple(x.shape)}, model.dims is {self.cfg.dims}")
        return x

    def _decode_digit(self, sample: dict) -> torch.Tensor:
        """A 0/255 8x8 PNG -> 64 pixels mapped linearly to [-1, 1]."""
        if "png" not in sample:
            raise KeyError(f"no 'png' field with the digit; the sample has "
                           f"{sorted(k for k in sample if not k.startswith('__'))}")
        img = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("L"), dtype=np.float32)
        if img.shape != (DIGIT_SIZE, DIGIT_SIZE):
            raise ValueError(f"digit image is {img.shape}, model.data_kind 'digits' needs "
                             f"({DIGIT_SIZE}, {DIGIT_SIZE})")
        return torch.from_numpy(img.reshape(-1) / 127.5 - 1)

    def score_fn(self, model: nn.Module):
        """The model as `score(x, t)` (SDEs) or `score(x, sigma)` (SMLD)."""
        if self.sde is None:
            return lambda x, sigma: model(x, sigma.log(), sigma)
        if isinstance(self.sde, S.VESDE):
            return lambda x, t: model(x, self.sde.sigma(t).log(), self.sde.marginal(x, t)[1])
        return lambda x, t: model(x, t, self.sde.marginal(x, t)[1])

    def _loss(self, model, x, generator=None) -> torch.Tensor:
        if self.sde is None:
            return S.smld_loss(self.score_fn(model), x, self.sigmas, generator=generator)
        return S.dsm_loss(self.score_fn(model), self.sde, x, generator=generator)

    def training_loss(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self._loss(model, x)

    def eval_sums(self, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        g = torch.Generator(device=x.device).manual_seed(0)  # the same noise in every evaluation
        loss = self._loss(model, x, generator=g)
        n = torch.tensor(float(x.shape[0]), device=x.device)
        return {"dsm_sum": loss * n, "count": n}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {"dsm_loss": sums["dsm_sum"] / sums["count"], "count": sums["count"]}

    @staticmethod
    def _device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
        return generator if device.type == "cpu" else torch.Generator(device=device).manual_seed(generator.initial_seed())

    @torch.no_grad()
    def sample_images(self, model: nn.Module, n: int, generator: torch.Generator) -> Optional[torch.Tensor]:
        """Digits: n probability-flow samples (SMLD: annealed Langevin) as (n, 1, 8, 8) images
        in [0, 1]; the mixture has no images."""
        if self.cfg.data_kind != "digits":
            return None
        c, device = self.cfg, next(model.parameters()).device
        g, shape, score = self._device_generator(generator, device), (n, c.dims), self.score_fn(model)
        if self.sde is None:
            x = S.annealed_langevin(score, shape, self.sigmas, steps_per_level=c.langevin_steps,
                                    step_lr=c.langevin_lr, generator=g, device=device)
        else:
            x = S.probability_flow(score, self.sde, shape, generator=g, device=device)[0]
        return ((x + 1) / 2).clamp(0, 1).view(n, 1, DIGIT_SIZE, DIGIT_SIZE)

    def _truth_and_reference(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """eval_samples true points to score samplers against, and as many independent ones."""
        n = self.cfg.eval_samples
        if self.cfg.data_kind == "digits":
            truth = draw(digit_vectors("test"), n, generator)
            return truth, draw(digit_vectors("train"), n, generator)
        truth = mixture2d(n, generator)
        return truth, mixture2d(n, generator)

    @torch.no_grad()
    def final_metrics(self, model: nn.Module, generator: torch.Generator) -> dict[str, float]:
        c, device = self.cfg, next(model.parameters()).device
        shape = (c.eval_samples, c.dims)
        g = self._device_generator(generator, device)
        score = self.score_fn(model)
        truth, reference = (x.to(device) for x in self._truth_and_reference(generator))
        out = {"swd_reference": S.sliced_wasserstein(reference, truth, generator=generator)}
        if self.sde is None:
            x = S.annealed_langevin(score, shape, self.sigmas, steps_per_level=c.langevin_steps,
                                    step_lr=c.langevin_lr, generator=g, device=device)
            out["swd_langevin"] = S.sliced_wasserstein(x, truth, generator=generator)
            return out
        samplers = {
            "euler_maruyama": lambda: S.euler_maruyama(score, self.sde, shape, steps=c.sampler_steps,
                                                       generator=g, device=device),
            "predictor_corrector": lambda: S.predictor_corrector(score, self.sde, shape, steps=c.sampler_steps,
                                                                 generator=g, device=device),
            "probability_flow": lambda: S.probability_flow(score, self.sde, shape, generator=g,
                                                           device=device)[0],
        }
        for name, draw in samplers.items():
            out[f"swd_{name}"] = S.sliced_wasserstein(draw(), truth, generator=generator)
        return out

"""Score-based workload on points: JSON records {"x": [...]} of `model.dims` floats
(`model.data_kind=points`, e.g. `launch.make_shards mixture2d`) or grayscale PNGs of
`model.dims` pixels (a square) mapped to [-1, 1] (`model.data_kind=image`, e.g. the 8x8
digits). A time-conditioned MLP learns the score by denoising score matching under a VE, VP
or sub-VP SDE, or NCSN's noise levels (`model.sde=smld`). At the end of a run every sampler
draws points and their sliced Wasserstein distance to the run's held-out split (data.test,
else data.val) is reported (`swd_<sampler>`), beside the distance between two disjoint
halves of that split (`swd_reference`), the floor a perfect sampler would be near.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from models.base import Workload
from models.registry import register
from models.score import sde as S

DATA_KINDS = ("points", "image")


@dataclass(kw_only=True)
class ScoreConfig:
    name: str = "score"
    sde: str = "vp"  # ve | vp | subvp | smld
    data_kind: str = "points"  # points (json {"x": [dims floats]}) | image (grayscale PNG, dims pixels)
    dims: int = 2
    hidden: int = 256
    layers: int = 3
    sigma_min: float = 0.01  # ve, smld
    sigma_max: float = 5.0  # ve, smld: about the largest distance between data points
    beta_min: float = 0.1  # vp, subvp
    beta_max: float = 20.0
    smld_levels: int = 10
    # points each sampler draws at the end, scored against as many of the held-out split's
    # (drawn without replacement); 0: as many as the split has, scored against all of them
    eval_samples: int = 0
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
        if cfg.data_kind == "image" and math.isqrt(cfg.dims) ** 2 != cfg.dims:
            raise ValueError(
                f"model.data_kind 'image' needs a square number of pixels as model.dims (side x side), got {cfg.dims}"
            )
        if cfg.eval_samples < 0:
            raise ValueError(f"model.eval_samples must be >= 0 (0: the whole held-out split), got {cfg.eval_samples}")
        super().__init__(cfg)
        c = cfg
        self.sde = {
            "ve": lambda: S.VESDE(c.sigma_min, c.sigma_max),
            "vp": lambda: S.VPSDE(c.beta_min, c.beta_max),
            "subvp": lambda: S.SubVPSDE(c.beta_min, c.beta_max),
            "smld": lambda: None,
        }[c.sde]()
        self.sigmas = S.geometric_sigmas(c.sigma_max, c.sigma_min, c.smld_levels)

    def build_model(self) -> nn.Module:
        return ScoreMLP(self.cfg.dims, self.cfg.hidden, self.cfg.layers)

    def decode(self, sample: dict) -> torch.Tensor:
        if self.cfg.data_kind == "image":
            return self._decode_image(sample)
        if "json" not in sample:
            raise KeyError(
                f"no 'json' field with the point; the sample has {sorted(k for k in sample if not k.startswith('__'))}"
            )
        x = torch.tensor(json.loads(sample["json"])["x"], dtype=torch.float32)
        if x.shape != (self.cfg.dims,):
            raise ValueError(f"point has shape {tuple(x.shape)}, model.dims is {self.cfg.dims}")
        return x

    @property
    def side(self) -> int:
        return math.isqrt(self.cfg.dims)

    def _decode_image(self, sample: dict) -> torch.Tensor:
        """A grayscale side x side PNG -> its pixels mapped linearly from 0..255 to [-1, 1]."""
        if "png" not in sample:
            raise KeyError(
                f"no 'png' field with the image; the sample has {sorted(k for k in sample if not k.startswith('__'))}"
            )
        img = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("L"), dtype=np.float32)
        if img.shape != (self.side, self.side):
            raise ValueError(f"image is {img.shape}, model.dims {self.cfg.dims} needs ({self.side}, {self.side})")
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
        return (
            generator if device.type == "cpu" else torch.Generator(device=device).manual_seed(generator.initial_seed())
        )

    @torch.no_grad()
    def sample_images(self, model: nn.Module, n: int, generator: torch.Generator) -> torch.Tensor | None:
        """Images: n probability-flow samples (SMLD: annealed Langevin) as (n, 1, side, side)
        in [0, 1]; points have no images."""
        if self.cfg.data_kind != "image":
            return None
        c, device = self.cfg, next(model.parameters()).device
        g, shape, score = self._device_generator(generator, device), (n, c.dims), self.score_fn(model)
        if self.sde is None:
            x = S.annealed_langevin(
                score,
                shape,
                self.sigmas,
                steps_per_level=c.langevin_steps,
                step_lr=c.langevin_lr,
                generator=g,
                device=device,
            )
        else:
            x = S.probability_flow(score, self.sde, shape, generator=g, device=device)[0]
        return ((x + 1) / 2).clamp(0, 1).view(n, 1, self.side, self.side)

    def bind_splits(self, splits) -> None:
        """Refuses, before the first step, a run with no held-out split to measure against."""
        super().bind_splits(splits)
        self._held_out_split()

    def _held_out_split(self) -> str:
        split = self.first_split("test", "val")
        if split is None:
            raise ValueError(
                "the score workload's final metrics (swd_*) measure samples against the run's "
                "held-out split: set data.test.urls or data.val.urls (splits handed over: "
                f"{', '.join(sorted(self.splits)) or 'none'})"
            )
        return split

    def held_out_points(self) -> torch.Tensor:
        """The run's held-out split (test, else val; `bind_splits`) decoded by this workload,
        (N, dims): what the samplers are measured against, data no step trained on."""
        split = self._held_out_split()
        points = list(self.splits[split](decode=self.decode))
        if len(points) < 2:
            raise ValueError(f"the {split} split has {len(points)} sample(s); swd_* need two at least")
        return torch.stack(points).float()

    def truth_and_halves(
        self, held_out: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The eval_samples held-out points the samplers are scored against (all of them at
        eval_samples 0), and two disjoint halves of the split for the reference distance."""
        n_all = len(held_out)
        n = self.cfg.eval_samples or n_all
        if n > n_all:
            raise ValueError(
                f"model.eval_samples is {n}, more than the {n_all} samples of the held-out "
                f"split (data.test, else data.val); set it to {n_all} or less, or 0 for all"
            )
        truth = held_out if n == n_all else held_out[torch.randperm(n_all, generator=generator)[:n]]
        half, perm = n_all // 2, torch.randperm(n_all, generator=generator)
        return truth, held_out[perm[:half]], held_out[perm[half : 2 * half]]

    @torch.no_grad()
    def final_metrics(self, model: nn.Module, generator: torch.Generator) -> dict[str, float]:
        """swd_<sampler> of each sampler's points against the held-out split, and swd_reference
        between two disjoint halves of that split (at half the size, so a little above what a
        perfect sampler would score)."""
        c, device = self.cfg, next(model.parameters()).device
        truth, half_a, half_b = self.truth_and_halves(self.held_out_points(), generator)
        shape = (len(truth), c.dims)
        g = self._device_generator(generator, device)
        score = self.score_fn(model)
        truth = truth.to(device)
        out = {"swd_reference": S.sliced_wasserstein(half_a.to(device), half_b.to(device), generator=generator)}
        if self.sde is None:
            x = S.annealed_langevin(
                score,
                shape,
                self.sigmas,
                steps_per_level=c.langevin_steps,
                step_lr=c.langevin_lr,
                generator=g,
                device=device,
            )
            out["swd_langevin"] = S.sliced_wasserstein(x, truth, generator=generator)
            return out
        samplers = {
            "euler_maruyama": lambda: S.euler_maruyama(
                score, self.sde, shape, steps=c.sampler_steps, generator=g, device=device
            ),
            "predictor_corrector": lambda: S.predictor_corrector(
                score, self.sde, shape, steps=c.sampler_steps, generator=g, device=device
            ),
            "probability_flow": lambda: S.probability_flow(score, self.sde, shape, generator=g, device=device)[0],
        }
        for name, sample in samplers.items():
            out[f"swd_{name}"] = S.sliced_wasserstein(sample(), truth, generator=generator)
        return out

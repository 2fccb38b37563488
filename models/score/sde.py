"""Score-based generative modelling: forward SDEs, their denoising score matching losses,
and the samplers that run them backwards (Song et al. 2021, "Score-Based Generative
Modeling through Stochastic Differential Equations"; Song & Ermon 2019, NCSN/SMLD).

A score model is any callable `score(x, t) -> tensor like x` with t of shape (B,). Time
runs from 0 (data) to 1 (prior). Everything here is device-agnostic and batch-first.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast against x."""
    return v.reshape(-1, *([1] * (x.dim() - 1)))


class SDE:
    """dx = f(x, t) dt + g(t) dw, with a Gaussian perturbation kernel p_t(x_t | x_0)."""

    eps = 1e-5  # smallest time trained and sampled (the kernel degenerates at t = 0)

    def drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def marginal(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (like x0) and std (B,) of p_t(x_t | x_0)."""
        raise NotImplementedError

    def prior_sample(self, shape, generator: torch.Generator | None, device) -> torch.Tensor:
        raise NotImplementedError


class VESDE(SDE):
    """Variance exploding: sigma(t) = sigma_min (sigma_max / sigma_min)^t, no drift."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def drift(self, x, t):
        return torch.zeros_like(x)

    def diffusion(self, t):
        return self.sigma(t) * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))

    def marginal(self, x0, t):
        return x0, self.sigma(t)

    def prior_sample(self, shape, generator, device):
        return torch.randn(shape, generator=generator, device=device) * self.sigma_max


class VPSDE(SDE):
    """Variance preserving: beta(t) linear from beta_min to beta_max (DDPM's continuous limit)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min, self.beta_max = beta_min, beta_max

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_mean_coeff(self, t):
        """log of the mean's scale: -1/2 integral_0^t beta."""
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def drift(self, x, t):
        return -0.5 * _bcast(self.beta(t), x) * x

    def diffusion(self, t):
        return self.beta(t).sqrt()

    def marginal(self, x0, t):
        lmc = self.log_mean_coeff(t)
        return _bcast(lmc.exp(), x0) * x0, (1 - (2 * lmc).exp()).sqrt()

    def prior_sample(self, shape, generator, device):
        return torch.randn(shape, generator=generator, device=device)


class SubVPSDE(VPSDE):
    """sub-VP: the VP drift with a smaller diffusion, so the variance stays below VP's."""

    def diffusion(self, t):
        return (self.beta(t) * (1 - (4 * self.log_mean_coeff(t)).exp())).sqrt()

    def marginal(self, x0, t):
        lmc = self.log_mean_coeff(t)
        return _bcast(lmc.exp(), x0) * x0, 1 - (2 * lmc).exp()


SDES = {"ve": VESDE, "vp": VPSDE, "subvp": SubVPSDE}


def dsm_loss(
    score: Score, sde: SDE, x0: torch.Tensor, generator: torch.Generator | None = None, t: torch.Tensor | None = None
) -> torch.Tensor:
    """Continuous-time denoising score matching with lambda(t) = std(t)^2: the mean over the
    batch of || std * score(x_t, t) + z ||^2 summed over dimensions, x_t = mean + std z."""
    b = x0.shape[0]
    if t is None:
        t = torch.rand(b, generator=generator, device=x0.device) * (1 - sde.eps) + sde.eps
    z = torch.randn(x0.shape, generator=generator, device=x0.device)
    mean, std = sde.marginal(x0, t)
    s = score(mean + _bcast(std, x0) * z, t)
    return (_bcast(std, x0) * s + z).pow(2).flatten(1).sum(1).mean()


# ---------------------------------------------------------------- SMLD / NCSN


def geometric_sigmas(sigma_max: float, sigma_min: float, n: int) -> torch.Tensor:
    """NCSN's noise levels, largest first."""
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n))


def smld_loss(
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    sigmas: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """NCSN's weighted DSM: a noise level per sample, lambda(sigma) = sigma^2; `score(x, sigma)`."""
    idx = torch.randint(len(sigmas), (x0.shape[0],), generator=generator, device=x0.device)
    sigma = sigmas.to(x0.device)[idx]
    z = torch.randn(x0.shape, generator=generator, device=x0.device)
    s = score(x0 + _bcast(sigma, x0) * z, sigma)
    return (_bcast(sigma, x0) * s + z).pow(2).flatten(1).sum(1).mean()


@torch.no_grad()
def annealed_langevin(
    score,
    shape,
    sigmas: torch.Tensor,
    *,
    steps_per_level: int = 100,
    step_lr: float = 2e-5,
    generator=None,
    device="cpu",
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """Annealed Langevin dynamics: at each sigma, `steps_per_level` steps of size
    step_lr * (sigma / sigma_min)^2; returns the final (noise-free mean) step's x."""
    sigmas = sigmas.to(device)
    x = init if init is not None else torch.rand(shape, generator=generator, device=device) * 2 - 1
    for sigma in sigmas:
        alpha = step_lr * (sigma / sigmas[-1]) ** 2
        s_vec = torch.full((shape[0],), float(sigma), device=device)
        for _ in range(steps_per_level):
            z = torch.randn(shape, generator=generator, device=device)
            x = x + alpha * score(x, s_vec) + (2 * alpha).sqrt() * z
    return x + sigmas[-1] ** 2 * score(x, torch.full((shape[0],), float(sigmas[-1]), device=device))


# ---------------------------------------------------------------- reverse-time samplers


@torch.no_grad()
def euler_maruyama(score: Score, sde: SDE, shape, *, steps: int = 500, generator=None, device="cpu") -> torch.Tensor:
    """The reverse-time SDE dx = [f - g^2 score] dt + g dw_bar, integrated from t=1 to eps;
    the last step is noise-free."""
    x = sde.prior_sample(shape, generator, device)
    ts = torch.linspace(1.0, sde.eps, steps, device=device)
    dt = (sde.eps - 1.0) / (steps - 1)
    for i, t in enumerate(ts):
        x = _reverse_step(score, sde, x, t.expand(shape[0]), dt, i == len(ts) - 1, generator)
    return x


def _reverse_step(score, sde, x, tb, dt: float, last: bool, generator) -> torch.Tensor:
    """One Euler-Maruyama step of the reverse-time SDE (dt < 0); the last one adds no noise."""
    g = _bcast(sde.diffusion(tb), x)
    mean = x + (sde.drift(x, tb) - g**2 * score(x, tb)) * dt
    return mean if last else mean + g * math.sqrt(-dt) * torch.randn(x.shape, generator=generator, device=x.device)


@torch.no_grad()
def predictor_corrector(
    score: Score,
    sde: SDE,
    shape,
    *,
    steps: int = 500,
    snr: float = 0.16,
    corrector_steps: int = 1,
    generator=None,
    device="cpu",
) -> torch.Tensor:
    """Reverse-diffusion predictor (Euler-Maruyama) + Langevin corrector with a step size set
    by the signal-to-noise ratio `snr` (Song et al. 2021, Algorithm 1-2)."""
    x = sde.prior_sample(shape, generator, device)
    ts = torch.linspace(1.0, sde.eps, steps, device=device)
    dt = (sde.eps - 1.0) / (steps - 1)
    alpha_of = (
        (lambda t: torch.ones_like(t)) if isinstance(sde, VESDE) else (lambda t: 1 - sde.beta(t) * (-dt))
    )  # VP family: alpha_i = 1 - beta_i / N
    for i, t in enumerate(ts):
        tb = t.expand(shape[0])
        for _ in range(corrector_steps):
            grad = score(x, tb)
            noise = torch.randn(shape, generator=generator, device=device)
            g_norm = grad.flatten(1).norm(dim=1).mean()
            n_norm = noise.flatten(1).norm(dim=1).mean()
            eps = 2 * alpha_of(tb) * (snr * n_norm / g_norm.clamp_min(1e-12)) ** 2
            x = x + _bcast(eps, x) * grad + _bcast((2 * eps).sqrt(), x) * noise
        x = _reverse_step(score, sde, x, tb, dt, i == len(ts) - 1, generator)
    return x


@torch.no_grad()
def probability_flow(
    score: Score, sde: SDE, shape, *, rtol: float = 1e-5, atol: float = 1e-5, generator=None, device="cpu"
) -> tuple[torch.Tensor, int]:
    """The probability-flow ODE dx/dt = f - g^2 score / 2 from t=1 to eps with scipy's RK45
    (adaptive); returns samples and the number of score evaluations."""
    from scipy.integrate import solve_ivp

    x = sde.prior_sample(shape, generator, device)
    dtype = x.dtype
    calls = 0

    def rhs(t, y):
        nonlocal calls
        calls += 1
        xt = torch.as_tensor(y, dtype=dtype, device=device).reshape(shape)
        tb = torch.full((shape[0],), float(t), dtype=dtype, device=device)
        g = _bcast(sde.diffusion(tb), xt)
        return (sde.drift(xt, tb) - 0.5 * g**2 * score(xt, tb)).flatten().double().cpu().numpy()

    sol = solve_ivp(rhs, (1.0, sde.eps), x.flatten().double().cpu().numpy(), rtol=rtol, atol=atol, method="RK45")
    return torch.as_tensor(sol.y[:, -1], dtype=dtype, device=device).reshape(shape), calls


# ---------------------------------------------------------------- distances


def sliced_wasserstein(
    a: torch.Tensor, b: torch.Tensor, projections: int = 256, generator: torch.Generator | None = None
) -> float:
    """Sliced 1-Wasserstein distance between two equal-size point sets (N, D): the mean over
    random unit directions of the W1 distance of the 1-D projections (sorted differences)."""
    if a.shape != b.shape:
        raise ValueError(f"point sets differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.flatten(1).double(), b.flatten(1).double()
    dirs = torch.randn(a.shape[1], projections, generator=generator, dtype=torch.float64)
    dirs = (dirs / dirs.norm(dim=0, keepdim=True)).to(a.device)
    pa, _ = (a @ dirs).sort(dim=0)
    pb, _ = (b @ dirs).sort(dim=0)
    return float((pa - pb).abs().mean())

"""Stage one of latent diffusion: an AutoencoderKL trained on images by itself.

Reconstruction (MSE) plus a small KL term keeps the latent close to a unit Gaussian, as in
Stable Diffusion's autoencoder, without its perceptual and adversarial losses (those buy
sharp textures at 256+ px; at the tiny sizes we train here plain MSE keeps colours and
shapes). At the end of the run `vae/` holds a diffusers AutoencoderKL folder whose
`scaling_factor` is 1 / (latent std on the validation split), the file the latent-diffusion
stage (`model.vae`) and `make_shards latents` read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from data_pipelines.decode import image_tensor, to_unit
from models.base import Workload
from models.registry import register


@dataclass(kw_only=True)
class VAEConfig:
    name: str = "vae"
    pretrained: str = ""  # a diffusers AutoencoderKL folder to fine-tune (else built from the keys below)
    image_size: int = 32
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # len-1 halvings
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16
    kl_weight: float = 1e-4


def build_autoencoder(c: VAEConfig):
    from diffusers import AutoencoderKL

    if c.pretrained:
        return AutoencoderKL.from_pretrained(c.pretrained)
    levels = len(c.block_out_channels)
    bad = [ch for ch in c.block_out_channels if ch % c.norm_num_groups]
    if bad:
        raise ValueError(f"model.block_out_channels {bad} not divisible by model.norm_num_groups={c.norm_num_groups}")
    if c.image_size % 2 ** (levels - 1):
        raise ValueError(
            f"model.image_size={c.image_size} is not divisible by 2^{levels - 1} "
            f"(model.block_out_channels has {levels} levels)"
        )
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=c.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(c.block_out_channels),
        layers_per_block=c.layers_per_block,
        norm_num_groups=c.norm_num_groups,
        sample_size=c.image_size,
    )


class VAEModule(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, sample: bool = True):
        posterior = self.vae.encode(images).latent_dist
        z = posterior.sample() if sample else posterior.mode()
        return self.vae.decode(z).sample, posterior, z


@register("vae")
class VAEWorkload(Workload):
    Config = VAEConfig
    best_metric = "mse"

    def __init__(self, cfg: VAEConfig):
        super().__init__(cfg)
        self._shown: torch.Tensor | None = None  # the first validation images, for grids

    def build_model(self) -> nn.Module:
        return VAEModule(build_autoencoder(self.cfg))

    def decode(self, sample: dict) -> torch.Tensor:
        return image_tensor(sample, self.cfg.image_size)

    throughput_unit = "images"

    def training_loss(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        recon, posterior, _ = model(images)
        kl = posterior.kl().mean() / images[0].numel()  # per pixel, like the MSE
        return nn.functional.mse_loss(recon, images) + self.cfg.kl_weight * kl

    def eval_sums(self, model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._shown is None:
            self._shown = images[:16].detach().cpu()
        recon, _, z = model(images, sample=False)
        per_image = ((recon - images) ** 2).flatten(1).mean(1)
        n = torch.tensor(float(images.shape[0]), device=images.device)
        return {
            "se": per_image.sum(),
            "count": n,
            "z_sum": z.double().sum(),
            "z_sq": (z.double() ** 2).sum(),
            "z_count": torch.tensor(float(z.numel()), device=z.device),
        }

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        mse = sums["se"] / sums["count"]
        mean = sums["z_sum"] / sums["z_count"]
        std = math.sqrt(max(sums["z_sq"] / sums["z_count"] - mean**2, 1e-12))
        # images span [-1, 1]: a peak-to-peak of 2
        return {"mse": mse, "psnr": 10 * math.log10(4 / max(mse, 1e-12)), "latent_std": std, "count": sums["count"]}

    @torch.no_grad()
    def sample_images(self, model: nn.Module, n: int, generator: torch.Generator):
        """Validation images (top row) over their reconstructions."""
        if self._shown is None:
            return None
        x = self._shown[:n].to(next(model.parameters()).device)
        recon, _, _ = model(x, sample=False)
        return torch.cat([to_unit(x), to_unit(recon)])

    def export(self, weights: dict, out_dir: Path, final: dict) -> None:
        """`out_dir/vae`: a diffusers AutoencoderKL folder with the measured scaling factor."""
        std = final.get("val/latent_std")
        if std is None:
            raise ValueError(
                "the vae workload needs data.val.urls: the latent scaling factor is measured on the validation split"
            )
        model = self.build_model()
        model.load_state_dict(weights)
        model.vae.register_to_config(scaling_factor=1.0 / std)
        model.vae.save_pretrained(out_dir / "vae")

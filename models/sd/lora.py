"""LoRA adapters on a pretrained UNet, through peft (Hu et al. 2021: W x + (alpha / r) B A x,
with A of r x d_in, B of d_out x r, B starting at zero so that step 0 is the base model).

The adapters go in with diffusers' `UNet2DConditionModel.add_adapter`, which injects peft's
LoRA layers into the UNet in place: the module stays a UNet2DConditionModel (a pipeline takes
it as is) and tensor names stay the diffusers ones, `...attn1.to_q.lora_A.default.weight`
beside `...attn1.to_q.base_layer.weight`. peft's `get_peft_model` would wrap it instead and
prefix every name with `base_model.model.`. Checkpoints keep the adapters (and their EMA) and
not the frozen base, which is reloaded from `model.pretrained` when the model is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

ADAPTER = "default"  # peft's adapter name; it appears in the tensor names
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name load_lora_weights looks for


@dataclass(kw_only=True)
class LoRAConfig:
    rank: int = 0  # r; 0: no LoRA, the whole UNet trains
    alpha: float = 0.0  # the update is scaled by alpha / rank; 0: alpha = rank (scale 1)
    dropout: float = 0.0  # on the adapters' input
    # the UNet's attention projections (self- and cross-attention)
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    text_encoder: bool = False  # adapters on the CLIP text encoder too (not supported yet, see check)


def enabled(cfg: LoRAConfig) -> bool:
    return cfg.rank > 0


def check(cfg: LoRAConfig, *, pretrained: str) -> None:
    """Refuse a LoRA section that cannot train or export, naming the key."""
    if cfg.rank < 0:
        raise ValueError(f"model.lora.rank={cfg.rank} must be >= 0 (0: no LoRA)")
    if not enabled(cfg):
        return
    if not pretrained:
        raise ValueError(
            "model.lora.rank > 0 needs model.pretrained: checkpoints of a LoRA run hold the "
            "adapters only, and the frozen base is reloaded from that folder"
        )
    if cfg.alpha < 0:
        raise ValueError(f"model.lora.alpha={cfg.alpha} must be >= 0 (0: alpha = rank)")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"model.lora.dropout={cfg.dropout} must be in [0, 1)")
    if not cfg.target_modules or not all(isinstance(m, str) and m for m in cfg.target_modules):
        raise ValueError(f"model.lora.target_modules={cfg.target_modules!r} must be a non-empty list of module names")
    if cfg.text_encoder:
        # diffusers' load_lora_weights hands text-encoder adapters to transformers' load_adapter,
        # which (transformers 5) refuses every peft release there is today
        raise ValueError(
            "model.lora.text_encoder=true is not supported: diffusers loads text-encoder adapters "
            "through transformers' PEFT integration, which needs a newer peft than this stack has; "
            "keep the text encoder frozen, or train it whole with model.train_text_encoder=true"
        )


def peft_config(cfg: LoRAConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha or cfg.rank,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        init_lora_weights="gaussian",  # A ~ N(0, 1/r), B = 0: as diffusers' LoRA scripts
    )


def add_adapters(unet: nn.Module, cfg: LoRAConfig) -> None:
    """Freeze the UNet and inject trainable adapters into its target modules."""
    unet.requires_grad_(False)
    try:
        unet.add_adapter(peft_config(cfg))
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"model.lora.target_modules={list(cfg.target_modules)}: {exc}") from exc


def ema_key(name: str) -> str:
    """A parameter name as a ParameterDict key (no dots allowed there)."""
    return name.replace(".", "/")


class AdapterEMA(nn.Module):
    """An exponential moving average of the adapter weights only: r (d_in + d_out) numbers a
    projection, instead of a second copy of the whole UNet."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.names = [n for n, p in unet.named_parameters() if p.requires_grad]
        live = dict(unet.named_parameters())
        self.shadow = nn.ParameterDict(
            {ema_key(n): nn.Parameter(live[n].detach().clone(), requires_grad=False) for n in self.names}
        )

    def live(self, unet: nn.Module) -> list[torch.Tensor]:
        params = dict(unet.named_parameters())
        return [params[n] for n in self.names]

    def averages(self) -> list[torch.Tensor]:
        return [self.shadow[ema_key(n)] for n in self.names]


def write_lora_file(unet: nn.Module, folder) -> None:
    """`folder/pytorch_lora_weights.safetensors` in diffusers' format, with the adapter's
    LoraConfig as metadata (so that load_lora_weights restores alpha, not only the rank)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER))
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers={k: v.detach().contiguous() for k, v in layers.items()},
        unet_lora_adapter_metadata=unet.peft_config[ADAPTER].to_dict(),
        weight_name=LORA_FILE,
        safe_serialization=True,
    )

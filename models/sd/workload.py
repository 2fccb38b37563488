"""Latent diffusion, Stable Diffusion-style: a UNet2DConditionModel denoises VAE latents
under cross-attention on CLIP text-encoder states.

Two starts, one code path:
- `model.pretrained: PATH`: a local diffusers Stable Diffusion folder (unet/, vae/,
  text_encoder/, tokenizer/, scheduler/); VAE and text encoder frozen by default.
- from scratch: the UNet and text encoder are built from the keys below, the tokenizer is
  the one `make_shards shapes` trained on the captions, and the VAE is the `vae/` folder of
  a finished `vae` workload run (stage one, `model.vae`), as Stable Diffusion was trained.

Training: epsilon or v prediction, min-SNR weighting, caption dropout (the empty prompt,
which classifier-free guidance uses at sampling), noise offset, an EMA of the UNet that
lives in the model's state (so checkpoints and exact resume carry it), gradient
checkpointing, and optional precomputed latents / text states from shards
(`make_shards latents`). Or LoRA adapters on a pretrained UNet (`model.lora`, models/sd/lora.py),
the frozen base left out of checkpoints. Samples come from a StableDiffusionPipeline built on
the EMA UNet (or EMA adapters); the end of a run writes `pipeline/` (`write_pipeline`, which
`launch.export --pipeline` runs on any checkpoint), which `StableDiffusionPipeline.from_pretrained`
loads.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from data_pipelines.decode import fields
from models.base import Workload
from models.registry import register
from models.sd import lora as lora_lib
from models.sd import tokenizer as tok_lib
from models.sd.color_match import Palette

PREDICTIONS = ("epsilon", "v_prediction")
FROZEN_DTYPES = ("auto", "fp32")


@dataclass(kw_only=True)
class SDConfig:
    name: str = "sd"
    pretrained: str = ""  # local diffusers SD folder; empty: build from scratch
    vae: str = ""  # from scratch: the AutoencoderKL folder of a `vae` run (runs/.../vae)
    tokenizer: str = ""  # from scratch: folder with vocab.json + merges.txt
    image_size: int = 32
    max_length: int = 16  # text tokens (77 for real CLIP)
    # UNet, from scratch
    unet_channels: list[int] = field(default_factory=lambda: [64, 128])
    unet_layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 16
    # also add an attention-pooled text embedding to the timestep embedding (diffusers'
    # addition_embed_type="text", as in unCLIP/Kandinsky UNets): global attributes such as
    # colour then reach every ResNet block, which a toy model learns in CPU minutes
    text_time_embedding: bool = False
    # text encoder, from scratch
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 2
    train_text_encoder: bool = False
    # LoRA adapters on the UNet (models/sd/lora.py); rank 0: the whole UNet trains
    lora: lora_lib.LoRAConfig = field(default_factory=lora_lib.LoRAConfig)
    # objective
    prediction_type: str = ""  # epsilon | v_prediction; empty: the pretrained scheduler's, else epsilon
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    snr_gamma: float = 0.0  # min-SNR weighting (5.0 in the paper); 0: plain MSE
    caption_dropout: float = 0.1
    noise_offset: float = 0.0
    ema_decay: float = 0.999  # 0: no EMA
    # update the EMA every N optimizer steps, with decay**N: the same averaging horizon in steps
    # for 1/N of the EMA's cost (a whole-UNet lerp each step is memory-bound on large models)
    ema_every: int = 1
    # keep the EMA in host memory (fp32, updated from a device-to-host copy of the weights): a
    # UNet's worth of device memory saved, at one copy per update (pair it with ema_every);
    # DDP and DeepSpeed ZeRO-1/2 only (under FSDP the EMA is sharded with the UNet already)
    ema_offload: bool = False
    # the frozen VAE and text encoder (and a LoRA run's base UNet): "auto" stores them in the
    # training dtype under trainer.mixed_precision=bf16|fp16 (half their memory, as the diffusers
    # scripts do), fp32 without it; "fp32" keeps them fp32 (a VAE that overflows in fp16, SDXL's)
    frozen_dtype: str = "auto"
    activation_checkpointing: bool = False  # diffusers' gradient checkpointing of the UNet (and a trained text encoder)
    channels_last: bool = False  # the UNet's convolutions in NHWC memory format (weights' shapes unchanged)
    precomputed: bool = False  # shards carry latent.npy (and text.npy) from `make_shards latents`
    # sampling
    sample_steps: int = 25
    guidance_scale: float = 4.0
    # prompts of the sample grids and the colour check: a list, or a text file of one prompt
    # a line; empty: the first captions of the val split (else test, else train)
    sample_prompts: Any = None
    # the colour check at the end of a run (color_match_*): the data's palette.json, and how
    # many samples; it runs only when both are set, on prompts that name one palette colour
    color_palette: str = ""
    color_match_samples: int = 0


def scratch_unet(c: SDConfig, latent_channels: int, scale: int):
    """The from-scratch UNet of these keys, for latents of `latent_channels` at 1/`scale` of
    model.image_size."""
    from diffusers import UNet2DConditionModel

    levels = len(c.unet_channels)
    return UNet2DConditionModel(
        sample_size=c.image_size // scale,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=tuple(c.unet_channels),
        layers_per_block=c.unet_layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=c.text_hidden,
        attention_head_dim=c.attention_head_dim,
        norm_num_groups=c.norm_num_groups,
        addition_embed_type="text" if c.text_time_embedding else None,
        addition_embed_type_num_heads=c.text_heads,
    )


def prompt_list(value: Any) -> list[str]:
    """`model.sample_prompts` as a list: a list of strings, or a text file of one prompt a line."""
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, str):
        path = Path(value)
        if not path.is_file():
            raise FileNotFoundError(
                f"model.sample_prompts={value}: no such file (give a list of prompts, "
                "or a text file of one prompt a line)"
            )
        lines = [line.strip() for line in path.read_text().splitlines()]
        value = [line for line in lines if line]
        if not value:
            raise ValueError(f"model.sample_prompts={path} has no prompts")
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"model.sample_prompts must be a list of strings or a file path, got {value!r}")
    return list(value)


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for an MSE on epsilon or on v: the
    x0-space weight min(SNR, gamma) divided by what the target already carries (SNR for
    epsilon, SNR + 1 for v)."""
    return snr.clamp(max=gamma) / (snr if prediction_type == "epsilon" else snr + 1)


def params_to_buffers(module: nn.Module) -> None:
    """Hold a module's parameters as persistent buffers under the same names (the state dict,
    and the module's forward, see no difference): an EMA that DeepSpeed's 16-bit cast of the
    engine's parameters leaves in fp32, where its small steps are not rounded away."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                del m._parameters[name]
                m.register_buffer(name, p.detach())


@torch.no_grad()
def copy_into(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    for d, s in zip(dst, src, strict=True):  # one by one: DTensor (FSDP2) has no foreach copy
        d.copy_(s)


class LatentDiffusion(nn.Module):
    """The trained parts and the frozen ones, in one module so that a backend wraps, saves
    and restores them together. `forward(batch)` is the training loss."""

    def __init__(
        self,
        cfg: SDConfig,
        unet,
        vae,
        text_encoder,
        noise_scheduler,
        empty_ids: torch.Tensor,
        frozen_dtype: torch.dtype = torch.float32,
        ema_as_buffers: bool = False,
    ):
        super().__init__()
        self.cfg = cfg
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.noise_scheduler = noise_scheduler
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(cfg.train_text_encoder)
        self.lora = lora_lib.enabled(cfg.lora)
        if self.lora:
            lora_lib.add_adapters(self.unet, cfg.lora)
        self.frozen_dtype = frozen_dtype
        if frozen_dtype != torch.float32:  # what never trains needs no fp32 copy (autocast runs it)
            # nn.Module's own `to`: diffusers' warns of fp32-kept modules even when it has none
            nn.Module.to(self.vae, frozen_dtype)
            if not cfg.train_text_encoder:
                nn.Module.to(self.text_encoder, frozen_dtype)
            if self.lora:  # the base UNet under the adapters, which stay fp32
                for p in self.unet.parameters():
                    if not p.requires_grad:
                        p.data = p.data.to(frozen_dtype)
        if cfg.channels_last:  # before the EMA copy, which then samples in the same format
            self.unet.to(memory_format=torch.channels_last)
        self.ema_unet = self.ema_lora = None
        if cfg.ema_decay > 0 and self.lora:
            self.ema_lora = lora_lib.AdapterEMA(self.unet)
        elif cfg.ema_decay > 0:
            self.ema_unet = copy.deepcopy(unet).requires_grad_(False)
        if ema_as_buffers:  # DeepSpeed casts every parameter to 16 bits, and leaves buffers be
            for ema in (self.ema_unet, self.ema_lora):
                if ema is not None:
                    params_to_buffers(ema)
        self.ema_offload = cfg.ema_offload and (self.ema_unet is not None or self.ema_lora is not None)
        if self.ema_offload:
            # DDP neither checks the host-side EMA's device nor broadcasts it (the same on every rank)
            self._ddp_params_and_buffers_to_ignore = [n for n, _ in self.named_parameters() if n.startswith("ema_")]
        # a LoRA run saves what trains and its EMA (parameters or, see above, buffers)
        if cfg.activation_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                self.text_encoder.gradient_checkpointing_enable()
        self.register_buffer("empty_ids", empty_ids, persistent=False)
        self._empty_state: torch.Tensor | None = None
        self.latent_scale = float(vae.config.scaling_factor)
        # a LoRA run's state: what trains and its EMA; the frozen base comes from model.pretrained
        self._saved: set[str] | None = None
        if self.lora:
            self._saved = {n for n, p in self.named_parameters() if p.requires_grad}
            held = itertools.chain(self.named_parameters(), self.named_buffers())
            self._saved |= {n for n, _ in held if n.startswith("ema_lora.")}

    def _apply(self, fn, recurse: bool = True):
        """`.to(device)`, `.bfloat16()` and the like move everything but an offloaded EMA, which
        stays fp32 in host memory."""
        if not getattr(self, "ema_offload", False):
            return super()._apply(fn, recurse)
        name = "ema_unet" if self.ema_unet is not None else "ema_lora"
        ema = self._modules.pop(name)
        try:
            return super()._apply(fn, recurse)
        finally:
            self._modules[name] = ema

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        full = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if self._saved is None:
            return full
        for key in [k for k in full if k.startswith(prefix) and k[len(prefix) :] not in self._saved]:
            del full[key]
        return full

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self._saved is None:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        missing = sorted(self._saved - set(state_dict))
        unexpected = sorted(set(state_dict) - self._saved)
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"a LoRA model's state (model.lora.rank={self.cfg.lora.rank}) does not match: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]} (a full fine-tune's checkpoint, "
                "or other model.lora.target_modules?)"
            )
        super().load_state_dict(state_dict, strict=False, assign=assign)
        return nn.modules.module._IncompatibleKeys(missing, unexpected)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen parts never run in train mode
        if not self.cfg.train_text_encoder:
            self.text_encoder.eval()
        if self.ema_unet is not None:
            self.ema_unet.eval()
        return self

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.cfg.train_text_encoder and torch.is_grad_enabled()):
            return self.text_encoder(ids)[0]

    def train_dtype(self) -> torch.dtype:
        """The dtype of the UNet's trained parameters (a LoRA run's base may be 16-bit)."""
        return next(p.dtype for p in self.unet.parameters() if p.requires_grad)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images.to(self.vae.dtype)).latent_dist.sample() * self.latent_scale

    def forward(self, batch: dict) -> torch.Tensor:
        c, sched = self.cfg, self.noise_scheduler
        latents = batch["latents"] if "latents" in batch else self.encode_images(batch["images"])
        # in the dtype of what trains: fp32 under autocast, the engine's 16 bits under DeepSpeed
        dtype = self.train_dtype()
        latents = latents.to(dtype)
        b = latents.shape[0]
        drop = torch.rand(b, device=latents.device) < c.caption_dropout
        if "text_states" in batch:  # precomputed with the frozen encoder
            states = batch["text_states"]
            if self._empty_state is None:  # the frozen encoder's empty prompt, once
                with torch.no_grad():
                    self._empty_state = self.encode_text(self.empty_ids[None])
            states = torch.where(drop[:, None, None], self._empty_state.to(dtype), states.to(dtype))
        else:
            ids = torch.where(drop[:, None], self.empty_ids[None], batch["input_ids"])
            states = self.encode_text(ids).to(dtype)
        noise = torch.randn_like(latents)
        if c.noise_offset:
            noise = noise + c.noise_offset * torch.randn(b, latents.shape[1], 1, 1, device=latents.device, dtype=dtype)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), device=latents.device)
        noisy = sched.add_noise(latents, noise, t)
        if c.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
        pred = self.unet(noisy, t, states).sample
        per_sample = ((pred.float() - target.float()) ** 2).flatten(1).mean(1)
        if c.snr_gamma > 0:
            from diffusers.training_utils import compute_snr

            per_sample = per_sample * min_snr_weight(compute_snr(sched, t), c.snr_gamma, sched.config.prediction_type)
        return per_sample.mean()

    @torch.no_grad()
    def ema_update(self, step: int) -> None:
        if self.ema_unet is None and self.ema_lora is None:
            return
        every = self.cfg.ema_every
        if step % every:
            return
        decay = min(self.cfg.ema_decay, (1 + step) / (10 + step)) ** every  # short memory early on
        if self.ema_lora is not None:
            ema, params = self.ema_lora.averages(), list(self.ema_lora.live(self.unet))
        else:
            held = dict(self.ema_unet.named_parameters()) | dict(self.ema_unet.named_buffers())
            names, params = zip(*self.unet.named_parameters(), strict=True)
            ema = [held[n] for n in names]
        if self.ema_offload and any(isinstance(p, DTensor) for p in params):
            raise RuntimeError(
                "model.ema_offload=true under FSDP: the EMA is sharded with the UNet already "
                "(1/world of it per rank); set model.ema_offload=false"
            )
        # ZeRO-3 leaves empty placeholders here; its mark is on the Parameter, not on a detached view
        if any(hasattr(p, "ds_status") for p in params):
            raise RuntimeError(
                "model.ema_decay > 0 under DeepSpeed ZeRO-3: the UNet's parameters are "
                "partitioned away from the module, so the EMA would silently stand still; "
                "use ZeRO-2, FSDP or model.ema_decay=0"
            )
        # an offloaded EMA: one device-to-host copy of the weights per update; a fp32 one beside
        # DeepSpeed's 16-bit weights: the weights upcast
        live = [p.detach().to(e.device, e.dtype) for p, e in zip(params, ema, strict=True)]
        torch._foreach_lerp_(ema, live, 1 - decay)

    @contextlib.contextmanager
    def ema_adapters(self):
        """Inside: the UNet's adapters hold their EMA (a LoRA run with EMA); restored after."""
        if self.ema_lora is None:
            yield
            return
        live = self.ema_lora.live(self.unet)
        kept = [p.detach().clone() for p in live]
        copy_into(live, self.ema_lora.averages())
        try:
            yield
        finally:
            copy_into(live, kept)

    def pipeline(self, tokenizer, use_ema: bool = True):
        """A StableDiffusionPipeline on these modules (the EMA UNet when there is one; a LoRA
        run's EMA adapters are put in place by `ema_adapters`)."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        unet = self.ema_unet if use_ema and self.ema_unet is not None else self.unet
        pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=DDIMScheduler.from_config(self.noise_scheduler.config, set_alpha_to_one=False),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


@register("sd")
class SDWorkload(Workload):
    Config = SDConfig
    best_metric = "loss"

    def __init__(self, cfg: SDConfig):
        super().__init__(cfg)
        if cfg.prediction_type and cfg.prediction_type not in PREDICTIONS:
            raise ValueError(f"model.prediction_type '{cfg.prediction_type}' is not one of {', '.join(PREDICTIONS)}")
        if cfg.pretrained:
            missing = [
                s
                for s in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
                if not (Path(cfg.pretrained) / s).is_dir()
            ]
            if missing:
                raise FileNotFoundError(
                    f"model.pretrained={cfg.pretrained} is not a diffusers Stable Diffusion "
                    f"folder: it lacks {', '.join(s + '/' for s in missing)}"
                )
        else:
            for key in ("vae", "tokenizer"):
                if not getattr(cfg, key):
                    raise ValueError(
                        f"model.{key} is empty: from scratch (no model.pretrained) it must name "
                        f"a folder (see configs/sd/)"
                    )
            if not (Path(cfg.vae) / "config.json").is_file():
                raise FileNotFoundError(
                    f"model.vae={cfg.vae} is not an AutoencoderKL folder (no config.json): "
                    f"train stage one first, e.g. configs/sd/tiny_vae.yaml"
                )
        lora_lib.check(cfg.lora, pretrained=cfg.pretrained)
        if cfg.frozen_dtype not in FROZEN_DTYPES:
            raise ValueError(f"model.frozen_dtype={cfg.frozen_dtype!r} is not one of {', '.join(FROZEN_DTYPES)}")
        if cfg.ema_offload and cfg.ema_decay <= 0:
            raise ValueError("model.ema_offload=true needs an EMA (model.ema_decay > 0)")
        if cfg.ema_every < 1:
            raise ValueError(f"model.ema_every={cfg.ema_every} must be >= 1 (update the EMA every N steps)")
        if not 0 <= cfg.caption_dropout < 1:
            raise ValueError(f"model.caption_dropout={cfg.caption_dropout} must be in [0, 1)")
        self.palette = None
        if cfg.color_match_samples > 0:
            if not cfg.color_palette:
                raise ValueError(
                    f"model.color_match_samples={cfg.color_match_samples} needs model.color_palette: "
                    "the palette.json of data whose captions name colours (make_shards shapes writes one)"
                )
            self.palette = Palette.load(cfg.color_palette)
        self._recipe_prompts = prompt_list(cfg.sample_prompts)
        self._prompts: list[str] | None = None
        self._tokenizer = None

    # ------------------------------------------------------------------ parts
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            c = self.cfg
            if c.pretrained:
                from transformers import CLIPTokenizer

                self._tokenizer = CLIPTokenizer.from_pretrained(Path(c.pretrained) / "tokenizer")
            else:
                self._tokenizer = tok_lib.load(c.tokenizer, c.max_length)
        return self._tokenizer

    def __getstate__(self):  # data-loader workers build their own tokenizer
        return {**self.__dict__, "_tokenizer": None}

    def bind_splits(self, splits) -> None:
        super().bind_splits(splits)
        self._prompts = None  # captions are read from the splits now bound

    def prompts(self, n: int) -> list[str]:
        """n prompts, cycling: the recipe's, else the first captions of the held-out split."""
        if self._prompts is None:
            self._prompts = self._recipe_prompts or self._captions(max(n, self.cfg.color_match_samples))
        return [self._prompts[i % len(self._prompts)] for i in range(n)]

    def _captions(self, n: int) -> list[str]:
        split = self.first_split("val", "test", "train")
        if split is None:
            raise ValueError("no model.sample_prompts and no data split to take captions from")
        captions = (s["txt"].decode("utf-8") for s in self.splits[split]() if "txt" in s)
        out = list(itertools.islice(captions, n))
        if not out:
            raise ValueError(f"no model.sample_prompts, and the {split} split has no 'txt' captions to sample from")
        return out

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer
        return tok(
            texts, padding="max_length", truncation=True, max_length=tok.model_max_length, return_tensors="pt"
        ).input_ids

    def build_model(self) -> nn.Module:
        t = self.trainer_cfg  # under DeepSpeed's 16-bit engine the EMA is held as fp32 buffers
        deepspeed_16 = t is not None and t.backend == "deepspeed" and t.mixed_precision != "no"
        return self._build(self.frozen_dtype(), ema_as_buffers=deepspeed_16)

    def flops_model(self) -> nn.Module:
        """The run's model on the meta device for MFU's FLOPs: the folders' architectures from
        their config files, no weights read (from_pretrained refuses the meta device); all in
        fp32, as FLOPs do not depend on the dtype and the count runs outside the backend's
        autocast (a LoRA run's 16-bit frozen base would meet fp32 inputs)."""
        with torch.device("meta"):
            return self._build(torch.float32, weights=False)

    def _build(self, frozen_dtype: torch.dtype, ema_as_buffers: bool = False, weights: bool = True) -> LatentDiffusion:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        def load(cls, folder: Path):  # a diffusers model, or (weights=False) its architecture only
            return cls.from_pretrained(folder) if weights else cls.from_config(cls.load_config(folder))

        c = self.cfg
        if c.pretrained:
            root = Path(c.pretrained)
            unet = load(UNet2DConditionModel, root / "unet")
            vae = load(AutoencoderKL, root / "vae")
            text = root / "text_encoder"
            text_encoder = (
                CLIPTextModel.from_pretrained(text) if weights else CLIPTextModel(CLIPTextConfig.from_pretrained(text))
            )
            override = {"prediction_type": c.prediction_type} if c.prediction_type else {}
            sched = DDPMScheduler.from_pretrained(root, subfolder="scheduler", **override)
        else:
            vae = load(AutoencoderKL, Path(c.vae))
            tok = self.tokenizer
            text_encoder = CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=len(tok),
                    hidden_size=c.text_hidden,
                    intermediate_size=4 * c.text_hidden,
                    num_hidden_layers=c.text_layers,
                    num_attention_heads=c.text_heads,
                    max_position_embeddings=c.max_length,
                    bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id,
                )
            )
            scale = 2 ** (len(vae.config.block_out_channels) - 1)
            if c.image_size % scale:
                raise ValueError(f"model.image_size={c.image_size} is not a multiple of the VAE's factor {scale}")
            unet = scratch_unet(c, vae.config.latent_channels, scale)
            # Settings go in at construction: diffusers' from_config (used to derive the
            # sampling scheduler) drops keys set later by register_to_config that were
            # defaults at construction, so a v-prediction model would be sampled as epsilon.
            sched = DDPMScheduler(
                num_train_timesteps=c.num_train_timesteps,
                beta_schedule=c.beta_schedule,
                beta_start=c.beta_start,
                beta_end=c.beta_end,
                clip_sample=False,
                steps_offset=1,  # as Stable Diffusion's scheduler config
                prediction_type=c.prediction_type or "epsilon",
            )
        return LatentDiffusion(c, unet, vae, text_encoder, sched, self.tokenize([""])[0], frozen_dtype, ema_as_buffers)

    def frozen_dtype(self) -> torch.dtype:
        """The frozen parts' dtype in this run (model.frozen_dtype): 16 bits under a 16-bit
        trainer.mixed_precision with "auto"; fp32 outside a training run (export, doctor)."""
        t = self.trainer_cfg
        precision = t.mixed_precision if t is not None else "no"
        if precision == "no":
            return torch.float32
        if self.cfg.frozen_dtype == "fp32":
            if t.backend == "deepspeed":
                raise ValueError(
                    f"model.frozen_dtype=fp32 under trainer.backend=deepspeed with "
                    f"trainer.mixed_precision={precision}: DeepSpeed's engine casts the whole model, "
                    "frozen parts included, to 16 bits; use model.frozen_dtype=auto, or the accelerate backend"
                )
            return torch.float32
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    # ------------------------------------------------------------------ data
    def decode(self, sample: dict) -> dict:
        c = self.cfg
        out: dict = {}
        if c.precomputed:
            if "latent.npy" not in sample:
                raise KeyError(
                    f"model.precomputed is set but the sample has no latent.npy "
                    f"(fields: {fields(sample)}); make the shards with `make_shards latents`"
                )
            out["latents"] = torch.from_numpy(np.load(io.BytesIO(sample["latent.npy"]))).float()
            made = json.loads(sample["json"]).get("latent") if "json" in sample else None
            if isinstance(made, dict) and "original_size" in made:  # written with buckets: how it was cropped
                out["original_size"] = torch.tensor(made["original_size"])
                out["crop_top_left"] = torch.tensor(made["crop_top_left"])
            if "text.npy" in sample and not c.train_text_encoder:
                out["text_states"] = torch.from_numpy(np.load(io.BytesIO(sample["text.npy"]))).float()
        else:
            from data_pipelines.image_transforms import image_with_info

            if "latent.npy" in sample and not any(k in sample for k in ("jpg", "jpeg", "png", "webp")):
                raise KeyError(
                    f"the sample holds precomputed latents (fields: {fields(sample)}), not images: "
                    "set model.precomputed=true to train on them"
                )

            # the bucket and data.transforms come with the sample from the stream
            out["images"], info = image_with_info(sample, c.image_size)
            out["original_size"] = torch.tensor(info.original_size)  # (height, width)
            out["crop_top_left"] = torch.tensor(info.crop_top_left)  # (top, left) after resize
        if "text_states" not in out:
            if "txt" not in sample:
                raise KeyError(f"no 'txt' caption; the sample has {fields(sample)}")
            out["input_ids"] = self.tokenize([sample["txt"].decode("utf-8")])[0]
        return out

    def collate(self, samples: list[dict]) -> dict:
        shapes = {tuple(s["latents"].shape) for s in samples if "latents" in s}
        if len(shapes) > 1:
            raise ValueError(
                f"a batch mixes precomputed latent shapes {sorted(shapes)}: latents written with "
                "`make_shards latents --bucket-*` need data.buckets set in the recipe (the stream then "
                "batches latents of one shape)"
            )
        return super().collate(samples)

    # ------------------------------------------------------------------ steps
    throughput_unit = "images"

    def training_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(batch)

    def on_step_end(self, model: nn.Module, step: int) -> None:
        model.ema_update(step)

    def eval_sums(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        # the same noise, timesteps and caption dropout at every evaluation
        dev = next(model.parameters()).device
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(0)
            loss = model(batch)
        n = next(iter(batch.values())).shape[0]
        return {"loss_sum": loss * n, "count": torch.tensor(float(n), device=loss.device)}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {"loss": sums["loss_sum"] / sums["count"], "count": sums["count"]}

    # ------------------------------------------------------------------ samples
    def generate(
        self,
        model: LatentDiffusion,
        prompts: list[str],
        generator: torch.Generator,
        guidance_scale: float | None = None,
        batch: int = 32,
    ) -> np.ndarray:
        """(n, H, W, 3) floats in [0, 1]; one seeded generator draws every batch's noise."""
        pipe = model.pipeline(self.tokenizer)
        g = self.cfg.guidance_scale if guidance_scale is None else guidance_scale
        out = []
        # 16-bit frozen parts beside a fp32 UNet: the pipeline calls each module on its own, so
        # autocast (which the backend's forward has) mixes them, as the diffusers scripts sample
        dev = next(model.parameters()).device
        mixed = model.frozen_dtype != torch.float32
        autocast = torch.autocast(dev.type, dtype=model.frozen_dtype) if mixed else contextlib.nullcontext()
        with model.ema_adapters(), autocast:
            for i in range(0, len(prompts), batch):
                out.append(
                    pipe(
                        prompts[i : i + batch],
                        num_inference_steps=self.cfg.sample_steps,
                        guidance_scale=g,
                        generator=generator,
                        output_type="np",
                        height=self.cfg.image_size,
                        width=self.cfg.image_size,
                    ).images
                )
        return np.concatenate(out)

    @torch.no_grad()
    def sample_images(self, model: nn.Module, n: int, generator: torch.Generator) -> torch.Tensor:
        """Guided samples of the same prompts at every sample step (`prompts`)."""
        images = self.generate(model, self.prompts(n), generator)
        return torch.from_numpy(images).permute(0, 3, 1, 2)

    def sample_captions(self, n: int) -> list[str]:
        return self.prompts(n)

    @torch.no_grad()
    def final_metrics(self, model: nn.Module, generator: torch.Generator) -> dict[str, float]:
        """With a palette: the fraction of samples whose dominant colour is the one their prompt
        names, guided and unconditional (the empty prompt, against the same colours)."""
        if self.palette is None:
            return {}
        named = [(p, self.palette.named(p)) for p in self.prompts(self.cfg.color_match_samples)]
        prompts = [p for p, c in named if c is not None]
        colours = [c for _, c in named if c is not None]
        if not prompts:
            raise ValueError(
                f"model.color_match_samples: none of the prompts names exactly one colour of "
                f"{self.cfg.color_palette} ({', '.join(self.palette.colors)})"
            )
        out = {}
        for key, texts, scale in (
            ("color_match_guided", prompts, None),
            ("color_match_unconditional", [""] * len(prompts), 1.0),
        ):
            images = self.generate(model, texts, generator, guidance_scale=scale)
            found = [self.palette.dominant((im * 255).round().astype(np.uint8)) for im in images]
            out[key] = float(np.mean([f == w for f, w in zip(found, colours)]))
        return out

    def export(self, weights: dict, out_dir: Path, final: dict) -> None:
        """The end of a run: `out_dir/pipeline` (see `write_pipeline`)."""
        self.write_pipeline(weights, out_dir / "pipeline")

    def write_pipeline(self, weights: dict, folder: Path, *, use_ema: bool = True, fuse_lora: bool = False) -> str:
        """A diffusers folder that StableDiffusionPipeline.from_pretrained loads, from the model's
        state (a checkpoint's or the live one's); returns what it holds, in words.

        The UNet is the EMA's when there is one (use_ema). A LoRA run writes the base model's
        components plus `pytorch_lora_weights.safetensors` (diffusers' format, for
        `pipe.load_lora_weights(folder)`), or with fuse_lora a UNet with the adapters merged into
        its weights (no LoRA file; loads as a plain fine-tuned pipeline)."""
        model = self._build(torch.float32)
        # the frozen parts that come from a folder are taken from it, in fp32, not from the
        # run's state (which a 16-bit model.frozen_dtype rounded); a frozen random text encoder
        # (from scratch) exists only in the state
        fresh = model.state_dict()
        reloaded = ("vae.", "text_encoder.") if self.cfg.pretrained and not self.cfg.train_text_encoder else ("vae.",)
        weights = {k: fresh[k] if k.startswith(reloaded) and k in fresh else v for k, v in weights.items()}
        model.load_state_dict(weights)
        folder = Path(folder)
        ema = use_ema and (model.ema_unet is not None or model.ema_lora is not None)
        if not model.lora:
            model.pipeline(self.tokenizer, use_ema=use_ema).save_pretrained(folder, safe_serialization=True)
            return f"the {'EMA' if ema else 'trained'} UNet"
        if ema:  # the EMA adapters become the adapters, for good: this model is ours
            copy_into(model.ema_lora.live(model.unet), model.ema_lora.averages())
        pipe = model.pipeline(self.tokenizer, use_ema=False)
        (folder / lora_lib.LORA_FILE).unlink(missing_ok=True)
        which = "EMA" if ema else "trained"
        if fuse_lora:
            model.unet.fuse_lora()
            model.unet.unload_lora()
            pipe.save_pretrained(folder, safe_serialization=True)
            return f"the base model with the {which} LoRA adapters fused into its UNet"
        unet = model.unet
        folder.mkdir(parents=True, exist_ok=True)
        lora_lib.write_lora_file(unet, folder)
        unet.unload_lora()  # the folder's unet/ is the base one
        pipe.save_pretrained(folder, safe_serialization=True)
        return f"the base model and the {which} LoRA adapters in {lora_lib.LORA_FILE} (load_lora_weights)"

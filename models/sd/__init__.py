"""Latent diffusion (Stable Diffusion-style) on diffusers and transformers components."""

"""Score-based generative models: forward SDEs (VE, VP, sub-VP), SMLD/NCSN, denoising
score matching and reverse-time samplers (`sde.py`)."""

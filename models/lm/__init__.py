"""Byte-level language models with switchable attention (softmax, linear, FLASH): causal
and masked objectives on long sequences. `layers.py` holds the blocks, `workload.py` the
model, objectives and metrics (bits per byte)."""

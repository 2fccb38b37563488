"""The CLIP tokenizer of a from-scratch text-to-image run: a folder with vocab.json + merges.txt,
trained with the shards (data_pipelines/tokenizer.py) or a pipeline's `tokenizer/`.

A trap (docs/platform-notes.md): transformers 5 silently ignores the old `vocab_file=` /
`merges_file=` names (every token becomes <|endoftext|>), hence the probe in `load`.
"""

from __future__ import annotations

from pathlib import Path

FILES = ("vocab.json", "merges.txt")


def load(path: str | Path, max_length: int):
    """CLIPTokenizer from a folder with vocab.json + merges.txt (ours, or a pipeline's
    `tokenizer/` subfolder), padding and truncating to `max_length` tokens."""
    from transformers import CLIPTokenizer

    folder = Path(path)
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"tokenizer folder {folder} lacks {', '.join(missing)} "
            f"(make one with `python -m launch.make_shards shapes`, which trains it)"
        )
    tok = CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=max_length
    )
    probe = tok("a red circle").input_ids
    if len(set(probe[1:-1])) <= 1 and len(probe) > 3:
        raise ValueError(f"tokenizer in {folder} maps 'a red circle' to {probe}: its vocab did not load")
    return tok

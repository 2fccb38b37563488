"""A CLIP tokenizer for from-scratch text-to-image training, trained locally on captions.

BPE with `</w>` word ends, saved as vocab.json + merges.txt, the files CLIPTokenizer reads.
Two traps (docs/platform-notes.md): transformers 5 silently ignores the old `vocab_file=`/`merges_file=`
names (every token becomes <|endoftext|>), and BpeTrainer breaks ties differently from run
to run, so a tokenizer is trained once per dataset and shipped with it, never on resume.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
FILES = ("vocab.json", "merges.txt")


def train(captions: Iterable[str], out_dir: str | Path, *, vocab_size: int = 512) -> Path:
    """Train a CLIP-style BPE on `captions` and write vocab.json, merges.txt."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=EOS, end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  end_of_word_suffix="</w>", show_progress=False)
    tok.train_from_iterator(captions, trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved = json.loads(tok.to_str())["model"]
    (out / "vocab.json").write_text(json.dumps(saved["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in saved["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return out


def load(path: str | Path, max_length: int):
    """CLIPTokenizer from a folder with vocab.json + merges.txt (ours, or a pipeline's
    `tokenizer/` subfolder), padding and truncating to `max_length` tokens."""
    from transformers import CLIPTokenizer

    folder = Path(path)
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"tokenizer folder {folder} lacks {', '.join(missing)} "
                                f"(make one with `python -m launch.make_shards shapes`, which trains it)")
    tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                        model_max_length=max_length)
    probe = tok("a red circle").input_ids
    if len(set(probe[1:-1])) <= 1 and len(probe) > 3:
        raise ValueError(f"tokenizer in {folder} maps 'a red circle' to {probe}: its vocab did not load")
    return tok

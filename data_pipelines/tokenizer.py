"""A CLIP-style BPE tokenizer trained on a dataset's captions, for from-scratch text-to-image.

Saved as vocab.json + merges.txt, the two files CLIPTokenizer reads. BpeTrainer breaks ties
differently from run to run (docs/platform-notes.md), so a tokenizer is trained once, when
the shards are made, and shipped beside them; a run only loads it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def train_clip_bpe(captions: Iterable[str], out_dir: str | Path, *, vocab_size: int = 512) -> Path:
    """BPE with `</w>` word ends and CLIP's special tokens on `captions`; writes out_dir/{vocab.json,merges.txt}."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=EOS, end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS], end_of_word_suffix="</w>", show_progress=False
    )
    tok.train_from_iterator(captions, trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved = json.loads(tok.to_str())["model"]
    (out / "vocab.json").write_text(json.dumps(saved["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in saved["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return out

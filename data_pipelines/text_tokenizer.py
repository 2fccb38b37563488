"""Subword tokenizers for language models: a `tokenizer.json` (Hugging Face `tokenizers`) or a
local transformers tokenizer folder, read from disk only (no hub download).

The shard tools record `TokenizerInfo.manifest_entry()` in each split's manifest, and the LM
workload checks its own tokenizer against it, so recipe, tokenizer and shards cannot drift.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

# document separators, in the order they are looked for when the tokenizer does not name one
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


@dataclass(frozen=True)
class TokenizerInfo:
    path: str  # the tokenizer.json actually read
    vocab_size: int  # ids 0..vocab_size-1, added tokens included
    sha256: str  # of the tokenizer.json bytes
    eos_id: int | None
    eos_token: str | None

    def manifest_entry(self) -> dict:
        entry = asdict(self)
        entry["file"] = Path(entry.pop("path")).name
        return entry


def tokenizer_file(path: str | Path) -> Path:
    """The tokenizer.json of `path`: the file itself, or the one inside a tokenizer folder."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
        if not p.is_file():
            raise FileNotFoundError(
                f"tokenizer folder {path} has no tokenizer.json (a fast tokenizer); save one with "
                "`AutoTokenizer.from_pretrained(...).save_pretrained(folder)`"
            )
    elif not p.is_file():
        raise FileNotFoundError(f"tokenizer {path}: no such file or folder")
    return p


def _named_eos(folder: Path) -> str | None:
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    eos = json.loads(config.read_text()).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


def load_tokenizer(path: str | Path, *, eos: str | None = None):
    """(tokenizers.Tokenizer, TokenizerInfo) for a tokenizer.json or a tokenizer folder. The
    separator is `eos` if given, else the folder's tokenizer_config.json eos_token, else the
    first of EOS_CANDIDATES the vocabulary has (None when it has none)."""
    from tokenizers import Tokenizer

    file = tokenizer_file(path)
    raw = file.read_bytes()
    tok = Tokenizer.from_str(raw.decode())
    name = eos or _named_eos(file.parent)
    if name is not None:
        eos_id = tok.token_to_id(name)
        if eos_id is None:
            raise ValueError(f"tokenizer {file}: has no token {name!r} to separate documents")
    else:
        name, eos_id = next(
            ((t, tok.token_to_id(t)) for t in EOS_CANDIDATES if tok.token_to_id(t) is not None), (None, None)
        )
    info = TokenizerInfo(
        str(file), tok.get_vocab_size(with_added_tokens=True), hashlib.sha256(raw).hexdigest(), eos_id, name
    )
    return tok, info

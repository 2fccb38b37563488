"""Subword tokenizers for language models: a `tokenizer.json` (Hugging Face `tokenizers`) or a
local transformers tokenizer folder, read from disk only (no hub download).

The shard tools record `TokenizerInfo.manifest_entry()` in each split's manifest, and the LM
workload checks its own tokenizer against it, so recipe, tokenizer and shards cannot drift.
`DocumentEncoder` turns documents into the id stream that tokenized text shards hold, with the
bytes of text each id stands for; `train_byte_bpe` trains the embedded example's tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path

import numpy as np

# document separators, in the order they are looked for when the tokenizer does not name one
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
EOS = "<|endoftext|>"  # the separator of the tokenizers that `train_byte_bpe` makes


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

    @property
    def dtype(self) -> str:
        """The narrowest unsigned integer type that holds every id."""
        return "uint16" if self.vocab_size <= 1 << 16 else "uint32"


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
    # added tokens may sit above the model's vocabulary with gaps: the size is the largest id + 1
    vocab = tok.get_vocab(with_added_tokens=True)
    size = max(tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
    info = TokenizerInfo(str(file), size, hashlib.sha256(raw).hexdigest(), eos_id, name)
    return tok, info


class DocumentEncoder:
    """Encodes documents into one id stream, the separator after each, and the UTF-8 bytes of
    text that each id stands for (so bits per byte can be counted per window).

    A document is encoded as its tokenizer encodes it for its model (`add_special_tokens`: GPT-2's
    template adds nothing, Llama's a BOS at the start), then followed by `eos_id` unless the
    template already ended it so (BERT's [SEP]). Special tokens written in the text (a literal
    "<|endoftext|>") are encoded as plain text: only the separator marks a document's end.

    Bytes per id: each id gets the text from where the previous id's span ended to where its own
    ends (what it adds), the last of a document also the text after it; special ids get none.
    So a document's ids hold its bytes exactly, whatever the tokenizer strips or splits.
    """

    def __init__(self, tokenizer, eos_id: int):
        self.tokenizer, self.eos_id = tokenizer, eos_id  # a Tokenizer pickles, for worker processes

    def __call__(self, parts: Iterable[tuple[str, bool, bool]]) -> tuple[np.ndarray, np.ndarray, int]:
        """(ids, bytes per id, UTF-8 bytes of the text) of `parts`: (text, starts a document,
        ends a document) each; a long document comes in parts, without its template between."""
        self.tokenizer.encode_special_tokens = True  # here, not in __init__: pickling a Tokenizer drops it
        ids, nbytes, text_bytes = [np.zeros(0, np.uint32)], [np.zeros(0, np.uint32)], 0
        for text, first, last in parts:
            i, b, n = self._encode(text, first, last)
            ids.append(i)
            nbytes.append(b)
            text_bytes += n
        return np.concatenate(ids), np.concatenate(nbytes), text_bytes

    def _encode(self, text: str, first: bool, last: bool) -> tuple[np.ndarray, np.ndarray, int]:
        enc = self.tokenizer.encode(text)
        ids = np.asarray(enc.ids, np.uint32)
        special = np.asarray(enc.special_tokens_mask, bool)
        ends = np.fromiter(chain.from_iterable(enc.offsets), np.int64, 2 * len(ids))[1::2]
        lead = len(ids) if special.all() else int(np.argmax(~special))  # template tokens before the text
        trail = len(ids) if special.all() else int(np.argmax(~special[::-1]))  # and after it
        keep = slice(0 if first else lead, len(ids) if last else len(ids) - trail)
        ids, special, ends = ids[keep], special[keep], ends[keep]

        codepoints = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
        at = np.zeros(len(text) + 1, np.int64)  # the UTF-8 byte position of each character offset
        np.cumsum(1 + (codepoints >= 0x80) + (codepoints >= 0x800) + (codepoints >= 0x10000), out=at[1:])
        covered = at[np.maximum.accumulate(np.where(special, 0, ends))] if len(ids) else ends
        nbytes = np.diff(covered, prepend=0)
        content = np.flatnonzero(~special)
        if content.size:
            nbytes[content[-1]] += at[-1] - covered[-1]
        if last and not (len(ids) and special[-1] and ids[-1] == self.eos_id):
            ids = np.append(ids, np.uint32(self.eos_id))
            nbytes = np.append(nbytes, 0)
        return ids, nbytes.astype(np.uint32), int(at[-1])


_ENCODER: DocumentEncoder | None = None


def install_encoder(encoder: DocumentEncoder) -> None:
    """Pool initializer: the encoder of this worker process."""
    global _ENCODER
    _ENCODER = encoder


def encode_in_worker(parts: list[tuple[str, bool, bool]]) -> tuple[np.ndarray, np.ndarray, int]:
    return _ENCODER(parts)


def train_byte_bpe(texts: Iterable[str], out: str | Path, *, vocab_size: int) -> TokenizerInfo:
    """A GPT-2-style byte-level BPE with `<|endoftext|>` (id 0) trained on `texts`, written to
    `out` (a tokenizer.json); the same texts give the same file, byte for byte.

    BpeTrainer breaks count ties by token id, and gives ids in hash-map order only to tokens
    it makes up itself (word-end suffix, subword prefix); with neither, every id comes from the
    sorted byte alphabet or an earlier merge, so the merges and the file are deterministic.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(f"--vocab-size must be at least {len(alphabet) + 1} (256 bytes and {EOS}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(tok.to_str(pretty=True))
    os.replace(tmp, out)
    return load_tokenizer(out)[1]

"""Subword-tokenized text shards: `make_shards text --tokenizer` windows of ids with the text
bytes of their targets, and `make_shards tokenizer`, the deterministic byte-level BPE."""

import hashlib
import io
import json
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_pipelines.sources import text
from data_pipelines.text_tokenizer import EOS, DocumentEncoder, load_tokenizer, train_byte_bpe
from launch.make_shards import main as make_shards

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
FRACTIONS = dict(val_fraction=0.2, test_fraction=0.2)


def stdlib_sample(folder: Path, ascii_only: bool) -> Path:
    folder.mkdir()
    for p in sorted((STDLIB / "json").glob("*.py")) + sorted((STDLIB / "email").glob("*.py"))[:30]:
        data = p.read_bytes()
        if data.isascii() or not ascii_only:
            (folder / f"{p.parent.name}_{p.name}").write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Standard-library sources plus documents that test the edges: characters of 2 to 4
    bytes, a literal separator in the text, an empty document, one that is not UTF-8."""
    folder = stdlib_sample(tmp_path_factory.mktemp("corpus") / "docs", ascii_only=False)
    for i in range(12):
        (folder / f"intl{i:02d}.txt").write_text(f"naïve café {i} — 日本語のテキスト 😀\n" * (i + 3))
    (folder / "literal.txt").write_text(f"a document that mentions {EOS} in its text\n" * 20)
    (folder / "empty.txt").write_text("")
    (folder / "latin1.txt").write_bytes("déjà vu\n".encode("latin-1") * 30)
    return folder


@pytest.fixture(scope="module")
def bpe(corpus, tmp_path_factory):
    return train_byte_bpe(
        text.split_texts(str(corpus), **FRACTIONS), tmp_path_factory.mktemp("bpe") / "tokenizer.json", vocab_size=512
    ).path


def read_split(folder: Path) -> tuple[list[np.ndarray], list[int]]:
    """The windows of a split folder in key order: (ids per window, text bytes per window)."""
    fields: dict[str, dict] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                fields.setdefault(key, {})[ext] = tar.extractfile(m).read()
    keys = sorted(fields)
    assert all(set(fields[k]) == {"ids.npy", "json"} for k in keys)
    return [np.load(io.BytesIO(fields[k]["ids.npy"])) for k in keys], [
        json.loads(fields[k]["json"])["bytes"] for k in keys
    ]


def stream_of(windows: list[np.ndarray]) -> np.ndarray:
    assert all(a[-1] == b[0] for a, b in zip(windows, windows[1:]))  # one id shared, stride seq_len
    return np.concatenate([windows[0]] + [w[1:] for w in windows[1:]])


def reference_stream(tokenizer, docs: list[str], eos_id: int) -> list[int]:
    tokenizer.encode_special_tokens = True
    return [i for d in docs for i in tokenizer.encode(d).ids + [eos_id]]


def test_round_trip_text_to_shards_to_text(corpus, bpe, tmp_path, caplog):
    built = text.build(str(corpus), tmp_path, seq_len=64, tokenizer=bpe, **FRACTIONS)
    tok, info = load_tokenizer(bpe)
    assert info.dtype == "uint16" and info.eos_token == EOS
    assert "1 document(s) of the" in caplog.text and "latin1.txt" in caplog.text  # named, U+FFFD in its place
    seen = []
    for split in ("train", "val", "test"):
        docs = list(text.split_texts(str(corpus), split, **FRACTIONS))
        windows, _ = read_split(tmp_path / split)
        assert all(w.dtype == np.uint16 and w.shape == (65,) for w in windows)
        stream = stream_of(windows)

        pieces = np.split(stream, np.flatnonzero(stream == info.eos_id) + 1)
        decoded = [tok.decode(p[:-1].tolist()) for p in pieces[:-1]]
        assert decoded == docs[: len(decoded)]
        rest = tok.decode(pieces[-1].tolist()).rstrip("\ufffd")  # the windows end mid-document, maybe mid-character
        assert (docs + [""])[len(decoded)].startswith(rest)

        ref = reference_stream(tok, docs, info.eos_id)
        assert stream.tolist() == ref[: len(stream)]
        manifest = json.loads((tmp_path / split / "manifest.json").read_text())
        assert manifest["tokenizer"] == info.manifest_entry() and manifest["tokenizer"]["file"] == "tokenizer.json"
        assert manifest["tokens"] == len(ref) and manifest["dtype"] == "uint16" and manifest["seq_len"] == 64
        assert manifest["text_bytes"] == sum(len(d.encode()) for d in docs)
        assert manifest["total_samples"] == built[split]["samples"] == len(windows)
        assert built[split]["dropped_tail_tokens"] == len(ref) - len(stream) < 64
        seen += docs
    assert any(EOS in d for d in seen) and "" in seen  # the literal separator and the empty document were there


def test_window_bytes_are_the_bytes_of_their_targets(tmp_path):
    """On ASCII text every token is whole characters: a window's `bytes` is exactly the length of
    its target tokens' text, separators count nothing, and the windows, the first id and the
    dropped tail hold the split's text bytes between them."""
    corpus = stdlib_sample(tmp_path / "ascii", ascii_only=True)
    tokenizer = train_byte_bpe(text.split_texts(str(corpus), **FRACTIONS), tmp_path / "t.json", vocab_size=400).path
    text.build(str(corpus), tmp_path / "out", seq_len=50, tokenizer=tokenizer, **FRACTIONS)
    tok, info = load_tokenizer(tokenizer)

    def length(i: int) -> int:
        return 0 if i == info.eos_id else len(tok.decode([i]))

    for split in ("train", "val"):
        windows, nbytes = read_split(tmp_path / "out" / split)
        assert nbytes == [sum(length(i) for i in w[1:].tolist()) for w in windows]
        ref = reference_stream(tok, list(text.split_texts(str(corpus), split, **FRACTIONS)), info.eos_id)
        outside = length(ref[0]) + sum(length(i) for i in ref[len(stream_of(windows)) :])
        manifest = json.loads((tmp_path / "out" / split / "manifest.json").read_text())
        assert sum(nbytes) + outside == manifest["text_bytes"]
        assert manifest["text_bytes"] / manifest["tokens"] > 1.5  # merges: more than a byte per token


def test_encoder_bytes_with_split_characters_and_a_template(tmp_path):
    """Characters split over several byte tokens count once; a template's BOS/EOS count nothing
    and its EOS is not doubled; a document in two parts gets the template once."""
    from tokenizers import processors

    sample = "ab é 日本語 😀 z"
    path = train_byte_bpe([sample], tmp_path / "t.json", vocab_size=257)  # no merges: every character split
    tok, _ = load_tokenizer(path.path)
    tok.add_special_tokens(["<s>", "</s>"])
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    encoder = DocumentEncoder(tok, eos)

    ids, nbytes, text_bytes = encoder([(sample, True, True)])
    assert ids[0] == bos and ids[-1] == eos and (ids == eos).sum() == 1
    assert len(ids) == len(sample.encode()) + 2
    assert nbytes[0] == nbytes[-1] == 0 and nbytes.sum() == text_bytes == len(sample.encode())
    assert sorted(set(nbytes[1:-1].tolist())) == [0, 1, 2, 3, 4]  # the first byte of a character holds it

    ids2, nbytes2, _ = encoder([("ab é 日", True, False), ("本語 😀 z", False, True)])
    assert ids2.tolist() == ids.tolist() and nbytes2.tolist() == nbytes.tolist()


def test_ids_wider_than_16_bits_are_uint32(tmp_path):
    """A vocabulary whose ids pass 65535 (with gaps, as added tokens leave): uint32 windows that
    keep every id."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for d in ("alpha beta gamma delta", "epsilon zeta eta theta") for w in d.split()})
    vocab = {"[UNK]": 0, "</s>": 1} | {w: 70_000 + i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "wide.json"))
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"d{i}.txt").write_text(" ".join(words[j % len(words)] for j in range(i, i + 40)))
    _, info = load_tokenizer(tmp_path / "wide.json")
    assert info.vocab_size == 70_000 + len(words) and info.dtype == "uint32" and info.eos_token == "</s>"

    text.build(
        str(src), tmp_path / "out", seq_len=32, tokenizer=tmp_path / "wide.json", val_fraction=0, test_fraction=0
    )
    windows, _ = read_split(tmp_path / "out" / "train")
    stream = stream_of(windows)
    assert all(w.dtype == np.uint32 for w in windows) and stream.max() >= 70_000
    docs = list(text.split_texts(str(src), val_fraction=0, test_fraction=0))
    assert stream.tolist() == reference_stream(tok, docs, 1)[: len(stream)]
    assert json.loads((tmp_path / "out" / "train" / "manifest.json").read_text())["dtype"] == "uint32"


def shard_digests(folder: Path) -> dict:
    return {
        split: [s["sha256"] for s in json.loads((folder / split / "manifest.json").read_text())["shards"]]
        for split in ("train", "val", "test")
    }


def test_one_and_two_workers_write_the_same_shards(corpus, bpe, tmp_path, monkeypatch):
    monkeypatch.setattr(text, "TASK", 8192)  # many small tasks, so two processes interleave
    for k in (1, 2):
        text.build(str(corpus), tmp_path / f"k{k}", seq_len=64, tokenizer=bpe, workers=k, **FRACTIONS)
    assert shard_digests(tmp_path / "k1") == shard_digests(tmp_path / "k2")
    assert sum(len(v) for v in shard_digests(tmp_path / "k1").values()) >= 3 * 16


def test_one_file_in_pieces_round_trips(corpus, bpe, tmp_path, monkeypatch):
    """One file is split by bytes and encoded in pieces cut after newlines (or between
    characters): each split decodes back to its text, one separator at its end."""
    big = tmp_path / "big.txt"
    big.write_text("".join((corpus / n).read_text() for n in ("json___init__.py", "intl05.txt")) + "語" * 3000)
    monkeypatch.setattr(text, "PIECE", 1000)
    monkeypatch.setattr(text, "TASK", 3000)
    for k in (1, 2):
        text.build(str(big), tmp_path / f"k{k}", seq_len=32, tokenizer=bpe, workers=k, **FRACTIONS)
    assert shard_digests(tmp_path / "k1") == shard_digests(tmp_path / "k2")
    tok, info = load_tokenizer(bpe)
    texts = []
    for split in ("train", "val", "test"):
        expected = "".join(text.split_texts(str(big), split, **FRACTIONS))
        stream = stream_of(read_split(tmp_path / "k1" / split)[0])
        assert len(stream) > 100 and (stream[:-1] == info.eos_id).sum() == 0  # one separator, at the end
        assert expected.startswith(tok.decode(stream.tolist()).rstrip("\ufffd"))
        texts.append(expected)
    assert "".join(texts) == big.read_text()  # cuts move to character starts, nothing is lost


def test_tokenizer_command_is_deterministic(corpus, tmp_path, cpu_env):
    """Two trainings in two processes write the same bytes; the train split only; the file
    loads in tokenizers and transformers alike."""
    outs = []
    for i in range(2):
        out = tmp_path / f"run{i}" / "tokenizer.json"
        cmd = [sys.executable, "-m", "launch.make_shards", "tokenizer", str(corpus), "--vocab-size", "600"]
        cmd += ["--val-fraction", "0.2", "--test-fraction", "0.2", "--out", str(out)]
        done = subprocess.run(cmd, cwd=ROOT, env=cpu_env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "600 ids" in done.stdout
        outs.append(hashlib.sha256(out.read_bytes()).hexdigest())
    here = train_byte_bpe(text.split_texts(str(corpus), "train", **FRACTIONS), tmp_path / "here.json", vocab_size=600)
    assert outs[0] == outs[1] == here.sha256
    assert make_shards(["tokenizer", str(corpus), "--vocab-size", "600", "--out", str(tmp_path / "here.json")]) == 0

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    file = tmp_path / "run0" / "tokenizer.json"
    tok = Tokenizer.from_file(str(file))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(file))
    sample = "def f(x):\n    return x  # naïve\n"
    assert tok.encode(sample).ids == fast(sample)["input_ids"] and fast.decode(fast(sample)["input_ids"]) == sample
    assert tok.token_to_id(EOS) == 0 and tok.get_vocab_size() == 600


def test_a_transformers_tokenizer_folder(corpus, bpe, tmp_path, capsys):
    """A folder written by save_pretrained: its tokenizer_config names the separator."""
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_file=str(bpe), eos_token=EOS).save_pretrained(folder)
    args = ["text", str(corpus), "--seq-len", "64", "--val-fraction", "0.2", "--test-fraction", "0.2"]
    assert make_shards(args + ["--tokenizer", str(folder), "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "of 65 uint16 ids" in out and "bytes per token" in out
    assert make_shards(args + ["--tokenizer", str(bpe), "--out", str(tmp_path / "b")]) == 0
    a, b = read_split(tmp_path / "a" / "train"), read_split(tmp_path / "b" / "train")
    assert [w.tolist() for w in a[0]] == [w.tolist() for w in b[0]] and a[1] == b[1]
    entry = json.loads((tmp_path / "a" / "train" / "manifest.json").read_text())["tokenizer"]
    assert entry["eos_token"] == EOS and entry["file"] == "tokenizer.json"


def test_errors_name_the_problem(corpus, bpe, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    args = ["text", str(corpus), "--seq-len", "64"]
    missing = tmp_path / "nope" / "tokenizer.json"
    assert make_shards(args + ["--tokenizer", str(missing), "--out", str(tmp_path / "a")]) == 2
    assert f"tokenizer {missing}: no such file or folder" in capsys.readouterr().err

    plain = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    plain.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    plain.save(str(tmp_path / "plain.json"))
    assert make_shards(args + ["--tokenizer", str(tmp_path / "plain.json"), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert f"tokenizer {tmp_path / 'plain.json'}: no document separator" in err and "--eos TOKEN" in err

    assert make_shards(args + ["--tokenizer", str(bpe), "--eos", "<sep>", "--out", str(tmp_path / "c")]) == 2
    assert "has no token '<sep>'" in capsys.readouterr().err
    assert make_shards(args + ["--eos", EOS, "--out", str(tmp_path / "d")]) == 2
    assert "give --tokenizer too" in capsys.readouterr().err
    assert make_shards(["tokenizer", str(corpus), "--vocab-size", "100", "--out", str(tmp_path / "t.json")]) == 2
    assert "--vocab-size must be at least 257" in capsys.readouterr().err
    assert make_shards(args + ["--tokenizer", str(bpe), "--seq-len", "100000", "--out", str(tmp_path / "e")]) == 2
    assert "fewer than one window of --seq-len 100000" in capsys.readouterr().err

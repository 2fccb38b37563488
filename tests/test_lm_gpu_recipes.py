"""The GPU-sized LM recipes (configs/lm/gpt2_125m*.yaml, llama_1b*.yaml) on a CPU: each builds
at its real size on the meta device with the parameter count its name promises, keeps its
global batch from 8 to 256 GPUs, and passes launch.doctor at 4 nodes x 8 GPUs on token shards
of its vocabulary. The tokenizers are stand-ins with the real vocabulary sizes (GPT-2: 50,257
ids; Llama 2: 32,000); nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.recipes import load_recipe
from models.registry import build_workload
from trainer.config import resolve_global_batch

ROOT = Path(__file__).resolve().parents[1]
# recipe -> (vocabulary of its tokenizer, the parameter count its name promises)
RECIPES = {
    "gpt2_125m": (50257, 125e6),
    "gpt2_125m_flash_8k": (50257, 125e6),
    "llama_1b": (32000, 1e9),
    "llama_1b_flash_8k": (32000, 1e9),
}


def stand_in_tokenizer(path: Path, vocab_size: int) -> Path:
    """A word-level tokenizer.json with `vocab_size` ids, the last one <|endoftext|>."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(vocab_size - 1)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)} | {"<|endoftext|>": vocab_size - 1}, "w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizers")
    return {n: stand_in_tokenizer(folder / f"vocab{n}.json", n) for n in {v for v, _ in RECIPES.values()}}


def recipe(name: str, tokenizer: Path, *overrides: str):
    return load_recipe(str(ROOT / f"configs/lm/{name}.yaml"), [f"model.tokenizer={tokenizer}", *overrides])


@pytest.mark.parametrize("name", RECIPES)
def test_each_recipe_builds_at_its_size_on_the_meta_device(name, tokenizers):
    vocab, promised = RECIPES[name]
    cfg = recipe(name, tokenizers[vocab])
    with torch.device("meta"):
        model = build_workload(cfg.model).build_model()
    params = sum(p.numel() for p in model.parameters())  # a tied head counts once
    assert abs(params / promised - 1) <= 0.05, f"{name}: {params:,} parameters, not within 5% of {promised:,.0f}"
    assert model.embed.weight.shape[0] == vocab  # the vocabulary sets the embedding

    t = cfg.trainer
    assert (t.accelerate.strategy, t.mixed_precision, cfg.optim.impl) == ("fsdp", "bf16", "fused")
    assert cfg.model.activation_checkpointing
    if "flash" in name:  # the twin: 8k context, about the softmax model's parameters
        twin = recipe(name.split("_flash")[0], tokenizers[vocab])
        with torch.device("meta"):
            theirs = sum(p.numel() for p in build_workload(twin.model).build_model().parameters())
        assert cfg.model.seq_len == 8192 and cfg.model.attention == "flash"
        assert abs(params / theirs - 1) <= 0.05, (params, theirs)


@pytest.mark.parametrize("name", RECIPES)
def test_the_global_batch_holds_from_8_to_256_gpus(name, tokenizers):
    for gpus in (8, 16, 32, 64, 128, 256):
        cfg = recipe(name, tokenizers[RECIPES[name][0]])
        resolve_global_batch(cfg, gpus)
        d = cfg.data
        assert d.batch_size * cfg.trainer.grad_accum_steps * gpus == d.global_batch_size, (name, gpus)


@pytest.fixture(scope="module")
def token_shards(tmp_path_factory, tokenizers):
    """Token windows for each recipe's vocabulary and context, 64 shards per split (4 nodes x
    8 GPUs x 2 workers read train), from a corpus of the stand-in words."""
    root = tmp_path_factory.mktemp("token-shards")
    corpus = root / "corpus"
    corpus.mkdir()
    for d in range(640):  # documents of words, split by the shard tools' name hash
        (corpus / f"doc{d:03d}.txt").write_text(" ".join(f"w{(d * 7919 + i) % 30000}" for i in range(1200)))
    shards = {}
    for vocab in tokenizers:
        for seq_len in (1024, 2048, 8192) if vocab == 32000 else (1024, 8192):
            out = root / f"v{vocab}-{seq_len}"
            cmd = [sys.executable, "-m", "launch.make_shards", "text", str(corpus), "--tokenizer"]
            cmd += [str(tokenizers[vocab]), "--seq-len", str(seq_len), "--min-shards", "64", "--out", str(out)]
            cmd += ["--val-fraction", "0.1", "--test-fraction", "0.1", "--workers", "1"]
            made = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert made.returncode == 0, made.stderr[-2000:]
            shards[vocab, seq_len] = out
    return shards


def doctor(name: str, tokenizer: Path, shards: Path, tmp_path: Path, *more: str) -> tuple[int, str]:
    from launch import doctor as doctor_module

    urls = [f"data.{s}.urls={shards}/{s}" for s in ("train", "val", "test")]
    argv = ["--config", str(ROOT / f"configs/lm/{name}.yaml"), "--nodes", "4", "--gpus-per-node", "8"]
    argv += [f"model.tokenizer={tokenizer}", f"run.dir={tmp_path / 'run'}", *urls, *more]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = doctor_module.main(argv)
    return code, out.getvalue()


@pytest.mark.parametrize("name", RECIPES)
def test_the_doctor_passes_each_recipe_at_4_nodes_of_8_gpus(name, tokenizers, token_shards, tmp_path):
    vocab = RECIPES[name][0]
    seq_len = recipe(name, tokenizers[vocab]).model.seq_len
    code, out = doctor(name, tokenizers[vocab], token_shards[vocab, seq_len], tmp_path)
    assert code == 0 and "verdict: ready to launch on 4 node(s) x 8 GPU(s) = 32 rank(s)" in out, out
    assert re.search(r"^ok    memory   [\d,]+ params, accelerate fsdp on 32 rank", out, re.M), out


def test_the_doctor_refuses_shards_of_another_vocabulary(tokenizers, token_shards, tmp_path):
    """gpt2_125m on windows of the 32,000-id tokenizer: a FAIL naming recipe, tokenizer and shards."""
    code, out = doctor("gpt2_125m", tokenizers[50257], token_shards[32000, 1024], tmp_path)
    assert code == 1, out
    fail = next(line for line in out.splitlines() if line.startswith("FAIL  data"))
    assert "model.tokenizer" in fail and "32000" in fail and "50257" in fail and "data.train.urls" in fail, fail

"""The LM workload on subword tokens and in Llama-style blocks: windows of token ids, the
vocabulary check of recipe, tokenizer and shards, bits per byte from the bytes each window
records, the tokenizer travelling in checkpoints, RMSNorm/SwiGLU blocks, and the BPE recipe
on 2 CPU ranks resuming exactly after SIGKILL."""

from __future__ import annotations

import io
import json
import math
import sysconfig
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import kill_past_checkpoint
from test_lm import run, torchrun

from trainer.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
SEQ = 64
SMALL = ["model.dim=32", "model.depth=2", "model.heads=2", f"model.seq_len={SEQ}", "data.batch_size=4"]


def make_shards(*args: str) -> None:
    from launch.make_shards import main

    assert main([str(a) for a in args]) == 0, args


@pytest.fixture(scope="session")
def token_corpus(tmp_path_factory):
    """A folder of standard-library sources, a 512-id byte-level BPE trained on it, and its
    train/val/test windows of SEQ + 1 ids, all made by `launch.make_shards` as a user would."""
    root = tmp_path_factory.mktemp("tokens")
    src = root / "text"
    src.mkdir()
    for package in ("json", "email", "logging"):
        for p in sorted((STDLIB / package).glob("*.py")):
            (src / f"{package}_{p.name}").write_bytes(p.read_bytes())
    make_shards("tokenizer", src, "--vocab-size", 512, "--out", root / "bpe/tokenizer.json")
    make_shards(
        "text",
        src,
        "--tokenizer",
        root / "bpe/tokenizer.json",
        "--seq-len",
        SEQ,
        "--out",
        root / "shards",
        "--val-fraction",
        0.15,
        "--test-fraction",
        0.15,
    )
    return root / "bpe/tokenizer.json", root / "shards"


def first_samples(folder: Path, n: int) -> list[dict]:
    """The first n samples of a split, raw, as the stream hands them to decode."""
    samples: dict[str, dict] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(m).read()
        if len(samples) >= n:
            break
    assert len(samples) >= n, f"{folder} holds fewer than {n} samples"
    return [samples[k] for k in sorted(samples)[:n]]


def workload(**overrides):
    from models.lm.workload import LMConfig, LMWorkload

    return LMWorkload(LMConfig(**{"seq_len": SEQ, "dim": 32, "depth": 2, "heads": 2, **overrides}))


# ---------------------------------------------------------------- data


def test_decode_reads_windows_of_token_ids(token_corpus):
    tokenizer, shards = token_corpus
    wl = workload(tokenizer=str(tokenizer))
    assert wl.vocab_size == 512 and wl.rows == 512  # causal: no MASK row
    assert workload(tokenizer=str(tokenizer), objective="masked").rows == 513
    for sample in first_samples(shards / "val", 3):
        ids = np.load(io.BytesIO(sample["ids.npy"]))
        out = wl.decode(sample)
        assert out["tokens"].dtype == torch.long and out["tokens"].tolist() == ids.tolist()
        assert len(ids) == SEQ + 1 and out["bytes"].item() == json.loads(sample["json"])["bytes"] > 0


def test_decode_names_what_does_not_fit(token_corpus):
    tokenizer, shards = token_corpus
    sample = first_samples(shards / "val", 1)[0]
    with pytest.raises(ValueError, match="no model.tokenizer"):
        workload().decode(sample)
    with pytest.raises(ValueError, match="model.seq_len=32 needs 33 ids: build shards with --seq-len 32"):
        workload(tokenizer=str(tokenizer), seq_len=32).decode(sample)
    too_big = dict(sample, **{"ids.npy": _npy(np.full(SEQ + 1, 600, dtype=np.uint16))})
    with pytest.raises(ValueError, match=r"token id 600 is outside the vocabulary .*\(512 tokens\)"):
        workload(tokenizer=str(tokenizer)).decode(too_big)
    with pytest.raises(ValueError, match="byte window"):
        workload(tokenizer=str(tokenizer)).decode({"__key__": "k", "bin": bytes(SEQ + 1)})


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_vocabulary_mismatch_names_recipe_tokenizer_and_shards(token_corpus, tmp_path):
    """Shards made with one tokenizer, a recipe naming another: refused before any process group
    (no run dir yet), the message giving all three sides with their sizes and hashes."""
    from data_pipelines.text_tokenizer import load_tokenizer
    from launch.train import main

    tokenizer, shards = token_corpus
    other = tmp_path / "other.json"
    make_shards("tokenizer", tokenizer.parent.parent / "text", "--vocab-size", 300, "--out", other)
    _, mine = load_tokenizer(other)
    theirs = json.loads((shards / "train/manifest.json").read_text())["tokenizer"]
    args = [
        "--config",
        str(ROOT / "configs/lm/bpe_causal_1k.yaml"),
        f"run.dir={tmp_path / 'run'}",
        f"data.train.urls={shards}/train",
        f"data.val.urls={shards}/val",
        f"data.test.urls={shards}/test",
        *SMALL,
    ]
    import contextlib

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([*args, f"model.tokenizer={other}"])
    said = err.getvalue()
    assert code == 2 and not (tmp_path / "run").exists(), said
    for part in (
        "model.vocab_size=0",
        f"model.tokenizer={other}",
        f"{mine.vocab_size} tokens, sha256 {mine.sha256}",
        f"data.train.urls ({shards / 'train/manifest.json'})",
        f"{theirs['vocab_size']} tokens, sha256 {theirs['sha256']}",
    ):
        assert part in said, (part, said)

    wl = workload(tokenizer=str(tokenizer))
    manifest = json.loads((shards / "val/manifest.json").read_text())
    wl.check_data({"data.val.urls": ("m.json", manifest)})  # the right tokenizer passes
    padded = workload(tokenizer=str(tokenizer), vocab_size=640)
    with pytest.raises(
        ValueError, match=r"recipe model\.vocab_size=640; tokenizer .*: 512 tokens.*data\.val\.urls \(m\.json\): 512"
    ):
        padded.check_data({"data.val.urls": ("m.json", manifest)})
    with pytest.raises(ValueError, match=r"recipe model\.vocab_size=640; tokenizer .*: 512 tokens, .*shards: none"):
        padded.check_data({})
    with pytest.raises(ValueError, match=r"model\.vocab_size=640"):
        padded.build_model()
    with pytest.raises(ValueError, match="data.val.urls .* the recipe has no model.tokenizer .* set model.tokenizer"):
        workload().check_data({"data.val.urls": ("m.json", manifest)})
    bytes_manifest = {k: v for k, v in manifest.items() if k != "tokenizer"}
    with pytest.raises(ValueError, match=r"byte windows .* model\.tokenizer="):
        wl.check_data({"data.test.urls": ("m.json", bytes_manifest)})
    with pytest.raises(ValueError, match=r"model\.vocab_size=1000 needs model\.tokenizer"):
        workload(vocab_size=1000)


# ---------------------------------------------------------------- metrics


@pytest.mark.parametrize("objective", ["causal", "masked"])
def test_bits_per_byte_come_from_the_recorded_bytes(token_corpus, objective):
    tokenizer, _ = token_corpus
    wl = workload(tokenizer=str(tokenizer), objective=objective)
    torch.manual_seed(0)
    model = wl.build_model().eval()
    tokens = torch.randint(0, 512, (2, SEQ + 1), generator=torch.Generator().manual_seed(1))
    batch = {"tokens": tokens, "seed": torch.tensor([7, 8]), "bytes": torch.tensor([150, 37])}
    with torch.no_grad():
        sums = wl.eval_sums(model, batch)
        metrics = wl.eval_metrics({k: v.item() for k, v in sums.items()})
        if objective == "causal":
            logits = model(tokens[:, :-1])
            nll = F.cross_entropy(logits.reshape(-1, 512), tokens[:, 1:].reshape(-1), reduction="sum").item()
            count, covered = 2 * SEQ, 150 + 37
        else:
            inputs, targets, mask = wl._masked_inputs(tokens, batch["seed"])
            assert (inputs[mask] == 512).all()  # MASK is the extra row
            nll = F.cross_entropy(model(inputs)[mask], targets[mask], reduction="sum").item()
            hidden = mask.sum(1).tolist()
            count, covered = sum(hidden), hidden[0] * 150 / SEQ + hidden[1] * 37 / SEQ
    assert metrics["count"] == count and metrics["bytes"] == pytest.approx(covered, rel=1e-6)
    assert metrics["bits_per_byte"] == pytest.approx(nll / math.log(2) / covered, rel=1e-5)
    assert metrics["bits_per_token"] == pytest.approx(nll / math.log(2) / count, rel=1e-5)
    assert metrics["nll"] == pytest.approx(nll / count, rel=1e-5)


def test_bytes_bits_per_byte_are_bits_per_token():
    wl = workload()
    assert wl.rows == 257 and wl.vocab_size == 256
    sample = {"__key__": "w0", "bin": bytes(range(SEQ + 1))}
    out = wl.decode(sample)
    assert out["bytes"].item() == SEQ
    batch = {k: v[None] for k, v in out.items()}
    torch.manual_seed(0)
    with torch.no_grad():
        metrics = wl.eval_metrics({k: v.item() for k, v in wl.eval_sums(wl.build_model(), batch).items()})
    assert metrics["bits_per_byte"] == metrics["bits_per_token"] and metrics["bytes"] == SEQ


# ---------------------------------------------------------------- the llama block


def test_classic_model_keeps_its_names_and_shapes():
    """Existing byte-level checkpoints load: the default model's tensors are what they were."""
    model = workload().build_model()
    shapes = {n: tuple(v.shape) for n, v in model.state_dict().items()}
    block = {
        "attn_norm.weight": (32,),
        "attn_norm.bias": (32,),
        "qkv.weight": (96, 32),
        "out.weight": (32, 32),
        "mlp_norm.weight": (32,),
        "mlp_norm.bias": (32,),
        "mlp.0.weight": (128, 32),
        "mlp.0.bias": (128,),
        "mlp.2.weight": (32, 128),
        "mlp.2.bias": (32,),
    }
    want = {"embed.weight": (257, 32), "norm.weight": (32,), "norm.bias": (32,), "head.weight": (257, 32)}
    want.update({f"blocks.{i}.{k}": v for i in range(2) for k, v in block.items()})
    assert shapes == want


def test_llama_model_tree(token_corpus):
    """The names and shapes a Llama decoder maps onto: RMSNorm weights, fused qkv, SwiGLU
    gate/up/down, no biases anywhere; the head tied to the embedding on request."""
    from models.lm.layers import RMSNorm, SwiGLU, swiglu_hidden

    tokenizer, _ = token_corpus
    model = workload(tokenizer=str(tokenizer), block="llama", rope_base=500000.0).build_model()
    hidden = swiglu_hidden(32, 4)
    assert hidden == 128  # 2/3 * 4 * 32 = 85.3, up to a multiple of 64
    block = {
        "attn_norm.weight": (32,),
        "qkv.weight": (96, 32),
        "out.weight": (32, 32),
        "mlp_norm.weight": (32,),
        "mlp.gate.weight": (hidden, 32),
        "mlp.up.weight": (hidden, 32),
        "mlp.down.weight": (32, hidden),
    }
    want = {"embed.weight": (512, 32), "norm.weight": (32,), "head.weight": (512, 32)}
    want.update({f"blocks.{i}.{k}": v for i in range(2) for k, v in block.items()})
    assert {n: tuple(v.shape) for n, v in model.state_dict().items()} == want
    assert isinstance(model.norm, RMSNorm) and isinstance(model.blocks[0].mlp, SwiGLU)
    assert model.blocks[0].rotary.base == 500000.0 and model.blocks[0].attn_norm.eps == 1e-5
    assert swiglu_hidden(4096, 4) == 11008 and swiglu_hidden(32, 4, mlp_hidden=40) == 40  # Llama-7B's width

    tied = workload(tokenizer=str(tokenizer), block="llama", tie_embeddings=True).build_model()
    assert tied.head.weight is tied.embed.weight
    assert workload(block="llama", mlp_hidden=48).build_model().blocks[1].mlp.up.weight.shape == (48, 32)
    with pytest.raises(ValueError, match=r"model\.mlp_hidden=48 is the SwiGLU width .* model\.block=classic"):
        workload(mlp_hidden=48)

    flash = workload(attention="flash", block="llama", qk_dim=16).build_model()
    assert not [n for n, _ in flash.named_parameters() if n.endswith(".bias") and ".qk." not in n]
    assert isinstance(flash.blocks[0].norm, RMSNorm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_its_formula(dtype):
    from models.lm.layers import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = (torch.randn(3, 5, 16) * 4 + 1).to(dtype)
    xf = x.float()
    want = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    torch.testing.assert_close(norm(x), want, rtol=0, atol=0)
    assert not torch.allclose(norm(x).float(), xf / xf.norm(dim=-1, keepdim=True), atol=1e-2)


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_llama_blocks_learn_and_stay_causal(attention):
    wl = workload(attention=attention, block="llama", chunk_size=16)
    torch.manual_seed(0)
    model = wl.build_model().double()
    tokens = torch.randint(0, 256, (2, SEQ + 1), generator=torch.Generator().manual_seed(2))
    batch = {"tokens": tokens, "seed": torch.tensor([1, 2]), "bytes": torch.tensor([SEQ, SEQ])}
    loss = wl.training_loss(model, batch)
    assert 7.0 < loss.item() < 9.5  # untrained: about log2(257) bits per byte
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        changed = tokens.clone()
        changed[:, 40] = (changed[:, 40] + 1) % 256
        a, b = model(tokens[:, :-1]), model(changed[:, :-1])
    torch.testing.assert_close(a[:, :40], b[:, :40], rtol=0, atol=1e-12)
    assert (a[:, 40:] - b[:, 40:]).abs().max() > 1e-6


def test_llama_flops_formula_matches_counted_matmuls():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from models.lm.layers import attention_flops_per_token, make_block

    block = make_block("softmax", dim=32, heads=2, causal=False, block="llama", mlp_hidden=72)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        block(torch.randn(1, 16, 32))
    want = attention_flops_per_token("softmax", dim=32, heads=2, tokens=16, causal=False, block="llama", mlp_hidden=72)
    assert math.isclose(counter.get_total_flops() / 16, want, rel_tol=1e-9)


# ---------------------------------------------------------------- the recipe on 2 ranks


def test_bpe_recipe_resumes_exactly_after_sigkill(tmp_path, token_corpus, cpu_env):
    """configs/lm/bpe_causal_1k.yaml at tiny width on 2 ranks: killed mid-run and restarted, the
    same per-step losses as an unbroken run; every checkpoint and best/ carry the tokenizer."""
    tokenizer, shards = token_corpus
    small = [
        f"model.tokenizer={tokenizer}",
        *SMALL,
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "trainer.sample_every=0",
        "trainer.checkpoint_every=15",
        "trainer.max_steps=40",
        "optim.warmup_steps=5",
        "model.sample_bytes=8",
    ]
    run(torchrun(tmp_path / "ref", "bpe_causal_1k.yaml", shards, *small), cpu_env)
    killed = tmp_path / "killed"
    cmd = torchrun(killed, "bpe_causal_1k.yaml", shards, *small)
    kill_past_checkpoint(cmd, cpu_env, killed, checkpoint=15, past=22)
    assert "resumed from" in run(cmd, cpu_env)

    def series(d):
        return [(r["step"], r["train/loss"]) for r in read_jsonl(d / "metrics.jsonl") if "train/loss" in r]

    assert series(killed) == series(tmp_path / "ref") and len(series(killed)) == 40
    assert 7.0 < series(killed)[0][1] < 10.5  # bits per token, untrained: about log2(512) = 9
    final = json.loads((killed / "final_metrics.json").read_text())
    assert final["val/bits_per_byte"] < final["val/bits_per_token"]  # a token covers more than a byte
    for folder in [*sorted((killed / "checkpoints").glob("step-*")), killed / "best"]:
        assert (folder / "tokenizer.json").read_bytes() == tokenizer.read_bytes(), folder


def test_prompts_start_a_document_as_the_shards_do(token_corpus, tmp_path):
    """A tokenizer whose template wraps text in separators: a prompt keeps the leading one (a
    document's start, as in the shards) and drops the one after it (the text goes on)."""
    from tokenizers import Tokenizer, processors

    tokenizer, _ = token_corpus
    plain = workload(tokenizer=str(tokenizer))
    ids = plain.encode_text("def f():")
    assert plain.decode_text(ids) == "def f():" and 0 not in ids and plain.encode_text("") == []
    wrapped = Tokenizer.from_file(str(tokenizer))
    wrapped.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A <|endoftext|>", special_tokens=[("<|endoftext|>", 0)]
    )
    (tmp_path / "wrapped").mkdir()
    wrapped.save(str(tmp_path / "wrapped/tokenizer.json"))
    templated = workload(tokenizer=str(tmp_path / "wrapped"))
    assert templated.encode_text("def f():") == [0, *ids] and templated.encode_text("") == [0]


def test_bpe_flash_recipe_trains_at_tiny_width(tmp_path, token_corpus, cpu_env):
    """configs/lm/bpe_flash_4k.yaml's short form: FLASH in the Llama style on 2 ranks, at tiny width
    and context, reports bits per byte and bits per token on val and test."""
    tokenizer, shards = token_corpus
    small = [
        f"model.tokenizer={tokenizer}",
        *SMALL,
        "model.chunk_size=16",
        "model.qk_dim=16",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "trainer.sample_every=0",
        "trainer.checkpoint_every=0",
        "trainer.max_steps=6",
        "optim.warmup_steps=2",
        "model.sample_bytes=8",
    ]
    run(torchrun(tmp_path, "bpe_flash_4k.yaml", shards, *small), cpu_env)
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    for split in ("val", "test"):
        assert math.isfinite(final[f"{split}/bits_per_byte"]) and final[f"{split}/bits_per_token"] > 0
        assert final[f"{split}/bits_per_byte"] < final[f"{split}/bits_per_token"]


@pytest.fixture(scope="session")
def stdlib_windows(tmp_path_factory):
    """`make data-lm-bpe`'s tokenizer and 1k/4k windows and `make data-lm`'s byte windows of the
    same text, read from data/lm/ or built here when missing: {(kind, context): folder}."""
    data, built = ROOT / "data/lm", {}
    root = tmp_path_factory.mktemp("stdlib")
    tokenizer = data / "bpe/tokenizer.json"
    if not tokenizer.exists():
        tokenizer = root / "bpe/tokenizer.json"
        make_shards("tokenizer", "stdlib", "--vocab-size", 4096, "--out", tokenizer)
    for n, suffix in ((1024, "1k"), (4096, "4k")):
        for kind, name, extra in (
            ("bpe", f"bpe-{suffix}", ["--tokenizer", tokenizer]),
            ("bytes", f"stdlib-{suffix}", []),
        ):
            folder = data / name
            if not (folder / "test/manifest.json").exists() or (kind == "bpe" and tokenizer.parent.parent != data):
                folder = root / name
                make_shards("text", "stdlib", *extra, "--seq-len", n, "--out", folder)
            built[kind, n] = folder
    return tokenizer, built


@pytest.mark.drill
@pytest.mark.parametrize(
    "recipe,twin,seq", [("bpe_causal_1k.yaml", "causal_1k.yaml", 1024), ("bpe_flash_4k.yaml", "causal_4k.yaml", 4096)]
)
def test_bpe_recipe_at_full_width_beside_its_byte_twin(tmp_path, stdlib_windows, cpu_env, recipe, twin, seq):
    """The BPE recipe as shipped (full width, the stdlib's 4096-id BPE) and the byte recipe of the
    same context, each for the same 30 steps on 2 ranks: both report test bits per byte on the same
    text, printed side by side (not a quality claim: 30 steps; benchmarks/lm_quality.py compares)."""
    tokenizer, shards = stdlib_windows
    short = ["trainer.max_steps=30", "trainer.log_every=5", "trainer.eval_every=0", "trainer.checkpoint_every=0"]
    short += ["trainer.sample_every=0", "optim.warmup_steps=5", "model.sample_bytes=16"]
    run(
        torchrun(tmp_path / "bpe", recipe, shards["bpe", seq], f"model.tokenizer={tokenizer}", *short),
        cpu_env,
        timeout=1800,
    )
    run(torchrun(tmp_path / "bytes", twin, shards["bytes", seq], *short), cpu_env, timeout=1800)
    bpe = json.loads((tmp_path / "bpe/final_metrics.json").read_text())
    byte = json.loads((tmp_path / "bytes/final_metrics.json").read_text())
    print(
        json.dumps(
            {
                "recipe": recipe,
                "bpe_test_bpb": bpe["test/bits_per_byte"],
                "twin": twin,
                "bytes_test_bpb": byte["test/bits_per_byte"],
            }
        )
    )
    for final in (bpe, byte):
        assert final["step"] == 30 and 0 < final["test/bits_per_byte"] < 9
    assert bpe["test/bits_per_byte"] < bpe["test/bits_per_token"]

"""Generation (models/lm/generate.py): the key/value cache and the recurrent state give what
recomputing the window gives, token for token and logit for logit, also once the context
outgrows model.seq_len; sampling is seeded; `launch.generate` continues a prompt from a
finished run's best/ export and from its checkpoints alike."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import pytest
import torch
from test_lm_tokens import token_corpus  # noqa: F401 - the session's tokenized corpus

from models.lm.generate import Window, generate, next_token

ROOT = Path(__file__).resolve().parents[1]


def lm(attention="softmax", block="classic", seq_len=16, **overrides):
    from models.lm.workload import LMConfig, LMWorkload

    cfg = LMConfig(
        attention=attention,
        block=block,
        seq_len=seq_len,
        dim=32,
        depth=2,
        heads=2,
        qk_dim=16,
        chunk_size=4,
        **overrides,
    )
    wl = LMWorkload(cfg)
    torch.manual_seed(0)
    return wl, wl.build_model().double().eval()


CACHED = [("softmax", "classic"), ("softmax", "llama"), ("linear", "classic"), ("linear", "llama")]


@pytest.mark.parametrize("attention,block", CACHED)
def test_cached_logits_are_the_recomputed_ones(attention, block):
    """Step by step, past three slides of the 16-token window: the same logits either way, and
    inside the first window the plain forward pass's."""
    _, model = lm(attention, block)
    seq = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    cached, recomputed = Window(model, cache=True), Window(model, cache=False)
    with torch.no_grad():
        for length in range(3, 41):
            a, b = cached.logits(seq[:, :length]), recomputed.logits(seq[:, :length])
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
            if length <= 16:
                torch.testing.assert_close(a, model(seq[:, :length])[:, -1, :256], rtol=1e-9, atol=1e-9)
    assert cached.start == recomputed.start == 27  # slid at 17, 26 and 35 tokens, keeping the newest 8


@pytest.mark.parametrize("attention,block", CACHED)
@pytest.mark.parametrize("temperature,top_k", [(0.0, 0), (1.0, 0), (0.8, 5)], ids=["greedy", "sampled", "top5"])
def test_cached_and_recomputed_generation_give_the_same_tokens(attention, block, temperature, top_k):
    _, model = lm(attention, block)
    prompt = torch.randint(0, 256, (3, 5), generator=torch.Generator().manual_seed(2))

    def tokens(cache, seed=3):
        g = torch.Generator().manual_seed(seed)
        return generate(model, prompt, 30, temperature=temperature, top_k=top_k, generator=g, cache=cache)

    out = tokens(cache=True)
    assert out.shape == (3, 35) and (out[:, :5] == prompt).all() and out.max() < 256
    assert torch.equal(out, tokens(cache=False))
    if temperature > 0:  # another seed, other tokens: the draw is seeded, not fixed
        assert not torch.equal(out, tokens(cache=True, seed=4))


@pytest.mark.parametrize("attention", ["flash", "flash_quad"])
def test_flash_generates_over_the_last_window(attention):
    _, model = lm(attention)
    prompt = torch.randint(0, 256, (2, 3), generator=torch.Generator().manual_seed(2))
    out = generate(model, prompt, 25, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 28) and out.max() < 256
    assert torch.equal(out, generate(model, prompt, 25, generator=torch.Generator().manual_seed(0), cache=False))
    window = Window(model, cache=True)
    seq = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(window.logits(seq), model(seq[:, -16:])[:, -1, :256])


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_blocks_continue_from_a_state_in_pieces_of_any_length(attention):
    """A block fed 3, 4, 1 and 5 new tokens in turn gives its whole-sequence outputs."""
    _, model = lm(attention, "llama")
    block = model.blocks[0]
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    with torch.no_grad():
        want = block(x)
        state, pieces, at = block.init_state(2, dtype=torch.float64), [], 0
        for n in (3, 4, 1, 5):
            y, state = block(x[:, at : at + n], state)
            pieces.append(y)
            at += n
    torch.testing.assert_close(torch.cat(pieces, 1), want, rtol=1e-10, atol=1e-10)
    assert state["pos"] == 13


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert next_token(logits, temperature=0.0, top_k=0, generator=None).item() == 1
    g = torch.Generator().manual_seed(0)
    assert {next_token(logits, temperature=5.0, top_k=1, generator=g).item() for _ in range(20)} == {1}
    drawn = {next_token(logits, temperature=5.0, top_k=2, generator=g).item() for _ in range(200)}
    assert drawn == {1, 3}
    assert len({next_token(logits, temperature=5.0, top_k=0, generator=g).item() for _ in range(200)}) == 4


def test_generation_refuses_what_it_cannot_do():
    _, masked = lm(objective="masked")
    with pytest.raises(ValueError, match="model.objective=masked"):
        generate(masked, torch.zeros(1, 2, dtype=torch.long), 3)
    _, model = lm()
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 3)


def test_text_samples_continue_the_prompt(token_corpus):  # noqa: F811
    """The trainer's text samples go through the same generation, decoded by the tokenizer."""
    tokenizer, _ = token_corpus
    for extra in ({}, {"tokenizer": str(tokenizer), "block": "llama"}):
        wl, model = lm(sample_bytes=12, **extra)
        texts = wl.sample_text(model.float(), 2, torch.Generator().manual_seed(0))
        assert len(texts) == 2 and all(t.startswith("def ") and len(t) > 4 for t in texts), texts
    # masked: the source of textwrap, tokenized, with the model's fill of each hidden span in [...]
    wl, model = lm("flash", seq_len=64, objective="masked", tokenizer=str(tokenizer), sample_bytes=40)
    (text,) = wl.sample_text(model.float(), 1, torch.Generator().manual_seed(0))
    assert text.startswith('"""Text wrap') and "[" in text and "]" in text, text


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_launch_generate_continues_a_prompt_from_a_finished_run(tmp_path, token_corpus, cpu_env, attention):  # noqa: F811
    """launch.generate on a finished run: cached (softmax's key/value cache, linear attention's
    recurrent state) and --no-cache give the same text, from best/ and from a DCP checkpoint."""
    import subprocess

    from launch.generate import main

    tokenizer, shards = token_corpus
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "launch.train",
        "--config",
        str(ROOT / "configs/lm/bpe_causal_1k.yaml"),
        f"run.dir={run_dir}",
        f"data.train.urls={shards}/train",
        f"data.val.urls={shards}/val",
        f"data.test.urls={shards}/test",
        f"model.tokenizer={tokenizer}",
        "model.seq_len=64",
        f"model.attention={attention}",
        "model.chunk_size=16",
        "model.dim=32",
        "model.depth=2",
        "model.heads=2",
        "data.batch_size=4",
        "trainer.max_steps=10",
        "trainer.log_every=5",
        "trainer.eval_every=0",
        "trainer.checkpoint_every=5",
        "trainer.sample_every=0",
        "model.sample_bytes=4",
        "optim.warmup_steps=1",
        "trainer.progress_bar=false",
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=cpu_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    def generated(*args):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(run_dir), "--prompt", "import os", "--max-new-tokens", "20", "--seed", "1", *args])
        return code, out.getvalue(), err.getvalue()

    code, text, said = generated()
    assert code == 0 and text.startswith("import os") and len(text) > len("import os\n"), (text, said)
    assert "20 new tokens in" in said and "tokens/s (cached" in said and "run/best" in said
    # the best/ export is the last step's weights here: the DCP checkpoint gives the same text
    assert generated("--which", "latest")[1] == text
    assert generated("--step", "10", "--no-cache")[1] == text
    code, _, said = generated("--step", "7")
    assert code == 2 and "step-7" in said

"""`launch.export --format hf`: tiny LMs trained by the real trainer load with transformers'
Auto classes and no custom code, give our model's logits for the same ids (fp32), decode
greedily as ours does, and tokenize text to the ids our pipeline gives; models without a
transformers class get the standard export and the tokenizer, and a line that says so."""

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
PROMPTS = ["import json\nimport ", "    def __init__(self, x):\n        self.", "héllo <pad> wörld\t🙂\x00"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    files = sorted((STDLIB / "json").rglob("*.py")) + sorted((STDLIB / "email").rglob("*.py"))
    out = tmp_path_factory.mktemp("corpus") / "stdlib.txt"
    out.write_bytes(b"\n\n".join(p.read_bytes() for p in files)[:400_000])
    return out


@pytest.fixture(scope="module")
def byte_shards(tmp_path_factory, corpus):
    from data_pipelines.sources import text

    out = tmp_path_factory.mktemp("bytes64")
    text.build(str(corpus), out, seq_len=64, val_fraction=0.1, test_fraction=0.1)
    return out


def train(run_dir: Path, data: Path, env: dict, *overrides: str) -> None:
    """One process of the real trainer on a tiny model; a checkpoint at the last step."""
    cmd = [
        sys.executable,
        "-m",
        "launch.train",
        "--config",
        str(ROOT / "configs/lm/causal_1k.yaml"),
        f"run.dir={run_dir}",
        f"data.train.urls={data}/train",
        f"data.val.urls={data}/val",
        "data.test.urls=''",
        "model.seq_len=64",
        "model.dim=32",
        "model.depth=2",
        "model.heads=2",
        "data.batch_size=16",
        "data.num_workers=0",
        "trainer.eval_every=0",
        "trainer.sample_every=0",
        "trainer.log_every=20",
        "trainer.progress_bar=false",
        "optim.warmup_steps=10",
        "optim.lr=0.01",
        *overrides,
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-5000:]


def export(capsys, run_dir: Path, step: int | None, out: Path, *args: str) -> str:
    """launch.export in this process; what it printed. step None: its default source (best/)."""
    from launch import export as launch_export

    capsys.readouterr()
    source = [] if step is None else ["--step", str(step)]
    code = launch_export.main([str(run_dir), *source, "--out", str(out), *args])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    return printed.out


def ours_from(std_dir: Path):
    """Our workload and model, from a standard export (its config.yaml, tokenizer and tensors)."""
    from launch.recipes import load_recipe
    from models.registry import build_workload
    from trainer.export import iter_exported

    own = std_dir / "tokenizer.json"  # the run's tokenizer travels with the export
    cfg = load_recipe(std_dir / "config.yaml", ["trainer.resume=never"] + [f"model.tokenizer={own}"] * own.exists())
    workload = build_workload(cfg.model)
    model = workload.build_model()
    model.load_state_dict(dict(iter_exported(std_dir)))
    return workload, model.eval()


@torch.no_grad()
def assert_same_lm(hf_dir: Path, std_dir: Path, prompts: list[str], new_tokens: int = 8):
    """Same ids from text, same logits, same greedy continuation (and the logits of every
    generated step, which transformers computes from its key/value cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workload, ours = ours_from(std_dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    assert hf.dtype == torch.float32
    assert hf.config.vocab_size == ours.embed.weight.shape[0]
    generated = set()
    for text in prompts:
        ids = tok(text, return_tensors="pt").input_ids
        assert ids[0].tolist() == workload.encode_text(text)
        assert tok.decode(ids[0]) == text
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)
        gen = hf.generate(
            ids, max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
        seq = ids
        for step_logits in gen.logits:
            expected = ours(seq)[:, -1]
            torch.testing.assert_close(step_logits, expected, rtol=1e-5, atol=1e-5)
            seq = torch.cat([seq, expected.argmax(-1, keepdim=True)], 1)
        assert gen.sequences.tolist() == seq.tolist()
        generated.update(seq[0, ids.shape[1] :].tolist())
    assert len(generated) > 1  # not one token over and over, as a broken model would repeat
    return hf, tok


def test_classic_block_exports_as_gpt_neox(tmp_path, byte_shards, cpu_env, capsys):
    """Byte-level classic block, DCP checkpoint, cut into several shards on the way."""
    from transformers import GPTNeoXForCausalLM

    run_dir = tmp_path / "run"
    train(run_dir, byte_shards, cpu_env, "trainer.max_steps=120", "trainer.checkpoint_every=120")
    printed = export(capsys, run_dir, 120, tmp_path / "hf", "--format", "hf", "--max-shard-size", "30KB")
    assert "GPTNeoXForCausalLM" in printed and "AutoModelForCausalLM.from_pretrained" in printed
    export(capsys, run_dir, 120, tmp_path / "std")
    index = json.loads((tmp_path / "hf/model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "gpt_neox.layers.1.attention.query_key_value.weight" in index["weight_map"]

    hf, tok = assert_same_lm(tmp_path / "hf", tmp_path / "std", PROMPTS)
    assert isinstance(hf, GPTNeoXForCausalLM)
    assert not hf.config.use_parallel_residual and hf.config.rope_parameters["partial_rotary_factor"] == 1.0
    # every byte value is its own id, and "<pad>" in text is bytes, not the pad token (id 256)
    text = "".join(map(chr, range(128))) + "é€🙂<pad>"
    assert tok(text).input_ids == list(text.encode())
    assert tok.pad_token_id == 256 and tok.model_max_length == 64
    padded = tok(["ab", "abcd"], padding=True).input_ids
    assert padded[0][2:] == [256, 256]


def test_llama_block_exports_as_llama(tmp_path, corpus, cpu_env, capsys):
    """The llama block (RMSNorm, SwiGLU, RoPE base 500000, tied embeddings) on BPE token shards,
    as LlamaForCausalLM with the run's tokenizer, from the best/ export (the default source)."""
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    tokenizer, shards = tmp_path / "tokenizer.json", tmp_path / "shards"
    for args in (
        ["tokenizer", str(corpus), "--vocab-size", "512", "--out", str(tokenizer)],
        ["text", str(corpus), "--tokenizer", str(tokenizer), "--seq-len", "64", "--out", str(shards)],
    ):
        made = subprocess.run([sys.executable, "-m", "launch.make_shards", *args], cwd=ROOT, capture_output=True)
        assert made.returncode == 0, made.stderr.decode()[-3000:]
    run_dir = tmp_path / "run"
    train(
        run_dir,
        shards,
        cpu_env,
        f"model.tokenizer={tokenizer}",
        "model.block=llama",
        "model.rope_base=500000",
        "model.norm_eps=1e-6",
        "model.tie_embeddings=true",
        "trainer.max_steps=120",
        "trainer.checkpoint_every=0",
    )
    tokenizer.unlink()  # the export finds the run's tokenizer in best/
    printed = export(capsys, run_dir, None, tmp_path / "hf", "--format", "hf")
    assert f"from {run_dir / 'best'}; LlamaForCausalLM" in printed
    export(capsys, run_dir, None, tmp_path / "std")
    hf, tok = assert_same_lm(tmp_path / "hf", tmp_path / "std", PROMPTS)
    assert isinstance(hf, LlamaForCausalLM)
    c = hf.config
    assert (c.num_key_value_heads, c.rms_norm_eps, c.rope_parameters["rope_theta"]) == (2, 1e-6, 500000.0)
    assert c.vocab_size == len(tok) == 512 and c.pad_token_id is None  # Llama's pad row would not train
    assert tok.eos_token == "<|endoftext|>" and hf.generation_config.eos_token_id == tok.eos_token_id
    assert c.tie_word_embeddings and hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    with safe_open(str(tmp_path / "hf/model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.layers.0.self_attn.q_proj.weight" in f.keys()


def test_flash_writes_the_standard_export_and_says_so(tmp_path, byte_shards, cpu_env, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.export import check_shapes

    run_dir = tmp_path / "run"
    train(
        run_dir,
        byte_shards,
        cpu_env,
        "model.attention=flash",
        "model.qk_dim=16",
        "model.chunk_size=32",
        "trainer.max_steps=2",
        "trainer.checkpoint_every=2",
        "trainer.log_every=1",
        "optim.warmup_steps=1",
    )
    out = tmp_path / "hf"
    printed = export(capsys, run_dir, 2, out, "--format", "hf")
    assert "model.attention=flash: transformers has no flash attention class" in printed
    assert "wrote the standard export" in printed
    assert {p.name for p in out.iterdir()} == {
        "model.safetensors",
        "config.yaml",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    workload, ours = ours_from(out)
    check_shapes(out, ours)
    assert AutoTokenizer.from_pretrained(out)("def f():").input_ids == workload.encode_text("def f():")
    with pytest.raises((OSError, ValueError)):
        AutoModelForCausalLM.from_pretrained(out)


def test_subword_tokenizer_encodes_as_our_shards(tmp_path, corpus):
    """A BPE tokenizer whose template opens each text with a BOS (as Llama's does): the exported
    tokenizer encodes a document to the ids our shards hold for it (DocumentEncoder, less the
    separator it appends), literal special tokens in the text included; it names eos and bos
    and takes its length limit from model.seq_len."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer

    from data_pipelines.text_tokenizer import DocumentEncoder
    from models.lm.hf import write_tokenizer
    from models.lm.workload import LMConfig

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train([str(corpus)], trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))

    ids = write_tokenizer(tmp_path / "out", LMConfig(tokenizer=str(path), seq_len=128), path)
    loaded = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert (ids.bos, ids.eos, loaded.bos_token_id, loaded.eos_token_id) == (bos, eos, bos, eos)
    assert loaded.model_max_length == 128
    shards = DocumentEncoder(Tokenizer.from_file(str(path)), eos)
    for text in [*PROMPTS, "x = {'a': 1}</s><s>def"]:
        in_shards = shards([(text, True, True)])[0].tolist()
        assert in_shards[0] == bos and in_shards[-1] == eos
        assert loaded(text).input_ids == in_shards[:-1]
        assert loaded.decode(loaded(text).input_ids, skip_special_tokens=True) == text


def test_no_transformers_class_is_named():
    from models.lm.hf import byte_tokenizer, unsupported
    from models.lm.workload import LMConfig

    assert unsupported(LMConfig()) is None
    assert unsupported(LMConfig(block="llama")) is None
    assert "masked" in unsupported(LMConfig(objective="masked"))
    assert "linear" in unsupported(LMConfig(attention="linear"))
    assert byte_tokenizer("masked").id_to_token(256) == "<mask>"
    assert byte_tokenizer("causal").id_to_token(256) == "<pad>"

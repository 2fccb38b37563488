"""The byte-level LM workload: text shards, objectives, every configs/lm recipe on 2 CPU
ranks through the real trainer, exact resume after SIGKILL, text samples in TensorBoard."""

import json
import math
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import kill_past_checkpoint

from trainer.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    """~3 MB of standard-library source in one file (the single-file path of the tool)."""
    files = sorted(
        p for d in ("asyncio", "email", "json", "logging", "unittest", "xml") for p in (STDLIB / d).rglob("*.py")
    )
    out = tmp_path_factory.mktemp("corpus") / "stdlib_sample.txt"
    out.write_bytes(b"\n\n".join(p.read_bytes() for p in files)[:3_000_000])
    return out


@pytest.fixture(scope="session")
def lm_data(tmp_path_factory, corpus_file):
    """Shards of the sample corpus per sequence length, built on first use."""
    from data_pipelines.sources import text

    built = {}

    def get(seq_len: int) -> Path:
        if seq_len not in built:
            out = tmp_path_factory.mktemp(f"lm{seq_len}")
            text.build(str(corpus_file), out, seq_len=seq_len, val_fraction=0.1, test_fraction=0.1)
            built[seq_len] = out
        return built[seq_len]

    return get


def read_windows(folder: Path) -> list[tuple[str, bytes]]:
    out = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            out += [(m.name.split(".")[0], tar.extractfile(m).read()) for m in tar.getmembers()]
    return sorted(out)


def test_text_windows_cover_each_split_exactly(tmp_path):
    """Every byte of a split is in the windows in order (stride seq_len, one byte shared),
    except the reported tail; the document split is by name, so a rebuild is identical."""
    from data_pipelines.sources import text

    src = tmp_path / "docs"
    src.mkdir()
    for i in range(40):
        (src / f"doc{i:02d}.txt").write_bytes(bytes(range(32, 127)) * (i + 1))
    built = text.build(str(src), tmp_path / "a", seq_len=100, val_fraction=0.2, test_fraction=0.2)
    again = text.build(str(src), tmp_path / "b", seq_len=100, val_fraction=0.2, test_fraction=0.2)
    for split in ("train", "val", "test"):
        assert [s["sha256"] for s in built[split]["shards"]] == [s["sha256"] for s in again[split]["shards"]]
        names = sorted(f"doc{i:02d}.txt" for i in range(40) if text.split_of(f"doc{i:02d}.txt", 0.2, 0.2) == split)
        assert names, split
        stream = b"".join((src / n).read_bytes() + text.SEPARATOR for n in names)
        windows = [w for _, w in read_windows(tmp_path / "a" / split)]
        assert all(len(w) == 101 for w in windows)
        assert all(a[-1] == b[0] for a, b in zip(windows, windows[1:]))
        joined = windows[0] + b"".join(w[1:] for w in windows[1:])
        assert stream.startswith(joined)
        assert len(stream) - len(joined) == built[split]["dropped_tail_bytes"] < 101
        assert built[split]["samples"] == len(windows)


def test_single_file_split_by_bytes(tmp_path, corpus_file):
    from data_pipelines.sources import text

    built = text.build(str(corpus_file), tmp_path, seq_len=4096, val_fraction=0.05, test_fraction=0.05)
    data = corpus_file.read_bytes()
    val = read_windows(tmp_path / "val")
    cut = int(len(data) * 0.90)
    assert val[0][1] == data[cut : cut + 4097]
    assert built["train"]["samples"] == (int(len(data) * 0.9) - 1) // 4096


def test_span_mask_hides_the_asked_fraction():
    from models.lm.workload import span_mask

    g = torch.Generator().manual_seed(0)
    mask = span_mask((64, 4096), 0.15, 3.0, g, "cpu")
    assert 0.13 < mask.float().mean().item() < 0.17
    runs = torch.diff(mask.int(), dim=1)
    starts = (runs == 1).sum().item()
    assert 2.5 < mask[:, 1:].sum().item() / starts < 3.8  # mean span length


def test_masked_loss_counts_hidden_bytes_only():
    """A model that is hopeless on visible bytes and uniform on hidden ones: the masked loss
    is log2(257) bits exactly, so visible positions are not in it."""
    from models.lm.workload import MASK, VOCAB, LMConfig, LMWorkload

    wl = LMWorkload(LMConfig(objective="masked", seq_len=512))

    def model(inputs):
        logits = torch.full((*inputs.shape, VOCAB), 0.0)
        visible = inputs != MASK
        wrong = (inputs + 1) % 256
        logits[visible] = -1e4
        logits[visible, wrong[visible]] = 1e4  # certain of a wrong byte
        return logits

    tokens = torch.randint(0, 256, (3, 513))
    batch = {"tokens": tokens, "seed": torch.tensor([1, 2, 3])}
    assert wl.training_loss(model, batch).item() == pytest.approx(math.log2(VOCAB), rel=1e-6)
    sums = wl.eval_sums(model, batch)
    assert sums["nll_sum"].item() / sums["count"].item() == pytest.approx(math.log(VOCAB), rel=1e-6)
    assert 0 < sums["count"].item() < tokens[:, 1:].numel()
    again = wl.eval_sums(model, batch)  # eval masks come from the samples' seeds: repeatable
    assert again["count"].item() == sums["count"].item()


def torchrun(run_dir, recipe, data, *overrides, nproc=2):
    return [
        str(Path(sys.executable).parent / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "launch.train",
        "--config",
        str(ROOT / "configs/lm" / recipe),
        f"run.dir={run_dir}",
        f"data.train.urls={data}/train",
        f"data.val.urls={data}/val",
        f"data.test.urls={data}/test",
        "trainer.progress_bar=false",
        *overrides,
    ]


def run(cmd, env, timeout=600):
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-5000:]
    return out.stdout


SEQ = {
    "causal_1k.yaml": 1024,
    "causal_4k.yaml": 4096,
    "causal_16k.yaml": 16384,
    "causal_64k.yaml": 65536,
    "masked_4k.yaml": 4096,
}


@pytest.mark.parametrize(
    "recipe", [r if r == "causal_1k.yaml" else pytest.param(r, marks=pytest.mark.drill) for r in SEQ]
)
def test_recipe_trains_on_two_ranks(tmp_path, lm_data, cpu_env, recipe):
    """Each recipe as shipped (only the step counts shortened): bits per byte logged and
    evaluated, text samples in the TensorBoard event file."""
    run(
        torchrun(
            tmp_path,
            recipe,
            lm_data(SEQ[recipe]),
            "trainer.max_steps=3",
            "trainer.log_every=1",
            "trainer.eval_every=0",
            "trainer.checkpoint_every=0",
            "trainer.sample_every=0",
            "model.sample_bytes=24",
            "optim.warmup_steps=1",
        ),
        cpu_env,
    )
    losses = [r["train/loss"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[0] > 1.0 and losses[0] < 12.0  # bits per byte, untrained: about log2(257)
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert math.isfinite(final["val/bits_per_byte"]) and math.isfinite(final["test/bits_per_byte"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    assert "val/bits_per_byte" in acc.Tags()["scalars"]
    texts = acc.Tensors("samples/text/text_summary")
    body = texts[-1].tensor_proto.string_val[0].decode()
    assert body.count("```") >= 2
    if "masked" in recipe:
        assert "[" in body  # filled spans are bracketed
    else:
        assert body.count("def ") >= 1  # every causal sample starts with the prompt
    # the same samples as plain text, and the run's row of launch.report's headline table
    assert (tmp_path / "samples.txt").read_text().startswith("step 3\n\n")
    from launch import report

    table = report.headline_table({tmp_path: final})
    row = table.splitlines()[2]
    assert row.split()[:2] == [tmp_path.name, "lm"] and f", {SEQ[recipe]} ctx" in row
    assert f"bits/byte {final['test/bits_per_byte']:.3f}" in row and row.endswith("3")


@pytest.mark.parametrize(
    "recipe,overrides",
    [
        # (make test's kill-and-resume checks run the smoke recipe: tests/test_preemption.py)
        pytest.param("causal_1k.yaml", ["model.attention=softmax"], marks=pytest.mark.drill),
        pytest.param("masked_4k.yaml", ["model.attention=flash"], marks=pytest.mark.drill),
        pytest.param("causal_4k.yaml", ["model.attention=linear"], marks=pytest.mark.drill),
        pytest.param("causal_16k.yaml", ["model.activation_checkpointing=true"], marks=pytest.mark.drill),
    ],
)
def test_sigkill_resume_is_exact(tmp_path, lm_data, cpu_env, recipe, overrides):
    """Killed mid-run and restarted: the same per-step losses as an uninterrupted run (the
    masked objective draws its masks from the checkpointed RNG)."""
    small = [
        "model.seq_len=256",
        "model.dim=32",
        "model.depth=2",
        "model.heads=2",
        "model.qk_dim=32",
        "model.chunk_size=64",
        "data.batch_size=4",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "trainer.sample_every=0",
        "trainer.checkpoint_every=20",
        "trainer.max_steps=60",
        "optim.warmup_steps=5",
        *overrides,
    ]
    data = lm_data(256)
    run(torchrun(tmp_path / "ref", recipe, data, *small), cpu_env)
    killed = tmp_path / "killed"
    cmd = torchrun(killed, recipe, data, *small)
    kill_past_checkpoint(cmd, cpu_env, killed, checkpoint=20, past=30)
    assert "resumed from" in run(cmd, cpu_env)

    def series(d):
        return [(r["step"], r["train/loss"]) for r in read_jsonl(d / "metrics.jsonl") if "train/loss" in r]

    assert series(killed) == series(tmp_path / "ref")
    assert len(series(killed)) == 60


@pytest.mark.drill
def test_compile_switch(tmp_path, lm_data, cpu_env):
    """trainer.compile=true trains (inductor on CPU) and exports the plain model's keys."""
    data = lm_data(256)
    cmd = [
        sys.executable,
        "-m",
        "launch.train",
        "--config",
        str(ROOT / "configs/lm/causal_1k.yaml"),
        f"run.dir={tmp_path}",
        f"data.train.urls={data}/train",
        f"data.val.urls={data}/val",
        "data.test.urls=''",
        "trainer.compile=true",
        "model.seq_len=256",
        "model.dim=32",
        "model.depth=2",
        "model.heads=2",
        "trainer.max_steps=4",
        "trainer.log_every=2",
        "trainer.eval_every=0",
        "trainer.checkpoint_every=0",
        "trainer.sample_every=0",
        "model.sample_bytes=4",
        "optim.warmup_steps=1",
        "trainer.progress_bar=false",
    ]
    run(cmd, cpu_env)
    from safetensors.torch import load_file

    from models.lm.workload import ByteLM, LMConfig

    weights = load_file(str(tmp_path / "best/model.safetensors"))
    plain = ByteLM(LMConfig(seq_len=256, dim=32, depth=2, heads=2))
    assert set(weights) == set(plain.state_dict())

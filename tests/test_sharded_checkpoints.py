"""Sharded (DCP) checkpoints through real torchrun launches on 2 CPU ranks: each rank writes
its own part, a resume at the same layout is bit-exact under DDP and FSDP2, a checkpoint
resumes at another world size and under the other strategy, and a checkpoint of another
model shape is refused by name."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.checkpoint import verify
from trainer.metrics import read_jsonl
from trainer.sharded import read_metadata

ROOT = Path(__file__).resolve().parents[1]
FSDP = ["trainer.accelerate.strategy=fsdp", "trainer.accelerate.fsdp_min_params=1000"]
STEPS = ("trainer.max_steps=20", "trainer.log_every=1", "trainer.eval_every=10", "trainer.checkpoint_every=10")


def command(run_dir, digits_dir, *overrides, nproc=2):
    return [
        str(Path(sys.executable).parent / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "launch.train",
        "--config",
        str(ROOT / "configs/autoregressive/made.yaml"),
        f"run.dir={run_dir}",
        f"data.train.urls={digits_dir}/train",
        f"data.val.urls={digits_dir}/val",
        f"data.test.urls={digits_dir}/test",
        "model.hidden=[128]",
        "trainer.progress_bar=false",
        "optim.warmup_steps=2",
        "trainer.sample_every=0",
        *STEPS,
        *overrides,
    ]


def run(cmd, env, ok=True):
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if ok:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-6000:]
    return out


def steps(run_dir, key):
    return {r["step"]: r[key] for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if key in r}


@pytest.fixture(scope="module")
def written(tmp_path_factory, digits_dir, cpu_env):
    """20 steps on 2 ranks under DDP and under FSDP2, a checkpoint every 10."""
    root = tmp_path_factory.mktemp("sharded")
    run(command(root / "ddp", digits_dir), cpu_env)
    # best/ cut into shards of 40 KB: written a tensor at a time, read back as shards at the end
    run(command(root / "fsdp", digits_dir, *FSDP, "trainer.export_max_shard_size=40KB"), cpu_env)
    return root


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_each_rank_writes_its_part_and_resume_is_exact(written, digits_dir, cpu_env, tmp_path, strategy):
    ckpt = written / strategy / "checkpoints/step-10"
    meta = json.loads((ckpt / "COMPLETE.json").read_text())
    shards = {n: e for n, e in meta["files"].items() if n.endswith(".distcp")}
    assert {e["rank"] for e in shards.values()} == {0, 1} and meta["files"]["state/.metadata"]["rank"] == 0
    sizes = sorted(e["bytes"] for e in shards.values())
    assert sizes[0] > 0.5 * sizes[1]  # the ranks share the writing (DDP: replicas deduplicated by size)
    chunks = len(read_metadata(ckpt / "state").state_dict_metadata["model.net.0.weight"].chunks)
    assert chunks == (2 if strategy == "fsdp" else 1)  # FSDP2: each rank's own half of the tensor

    out = run(command(tmp_path, digits_dir, *(FSDP if strategy == "fsdp" else []), f"trainer.resume={ckpt}"), cpu_env)
    assert f"resumed from {ckpt} (step 10, exact)" in out.stdout + out.stderr
    for key in ("train/loss", "train/grad_norm", "train/lr"):
        ref = steps(written / strategy, key)
        assert steps(tmp_path, key) == {s: v for s, v in ref.items() if s > 10}, key  # bit for bit
    assert json.loads((tmp_path / "final_metrics.json").read_text()) == json.loads(
        (written / strategy / "final_metrics.json").read_text()
    )


def test_fsdp_checkpoint_resumes_on_one_rank_as_ddp_does(written, digits_dir, cpu_env, tmp_path):
    """2 -> 1 rank: FSDP2's shards are re-cut for one rank; the next steps match DDP's 2-rank
    checkpoint resumed on one rank."""
    out = run(
        command(
            tmp_path / "fsdp1", digits_dir, *FSDP, f"trainer.resume={written / 'fsdp/checkpoints/step-10'}", nproc=1
        ),
        cpu_env,
    )
    assert "(step 10, elastic: 2 rank(s)" in out.stdout + out.stderr
    run(
        command(tmp_path / "ddp1", digits_dir, f"trainer.resume={written / 'ddp/checkpoints/step-10'}", nproc=1),
        cpu_env,
    )
    for key in ("train/loss", "train/grad_norm"):
        fsdp1, ddp1 = steps(tmp_path / "fsdp1", key), steps(tmp_path / "ddp1", key)
        assert sorted(fsdp1) == list(range(11, 21))
        assert list(fsdp1.values()) == pytest.approx(list(ddp1.values()), rel=1e-5), key
    assert json.loads((tmp_path / "fsdp1/checkpoints/step-20/COMPLETE.json").read_text())["world_size"] == 1


def test_ddp_checkpoint_resumes_under_fsdp(written, digits_dir, cpu_env, tmp_path):
    """The same parameter names under both strategies: DDP's whole tensors load as FSDP2 shards."""
    run(command(tmp_path, digits_dir, *FSDP, f"trainer.resume={written / 'ddp/checkpoints/step-10'}"), cpu_env)
    for key in ("train/loss", "train/grad_norm"):
        ref = {s: v for s, v in steps(written / "ddp", key).items() if s > 10}
        assert list(steps(tmp_path, key).values()) == pytest.approx(list(ref.values()), rel=1e-5), key


@pytest.mark.drill  # make test resumes 2 -> 1; this is the way back
def test_one_rank_fsdp_checkpoint_resumes_on_two(written, digits_dir, cpu_env, tmp_path):
    one = tmp_path / "one"
    run(command(one, digits_dir, *FSDP, f"trainer.resume={written / 'fsdp/checkpoints/step-10'}", nproc=1), cpu_env)
    out = run(
        command(
            tmp_path / "two", digits_dir, *FSDP, "trainer.max_steps=30", f"trainer.resume={one / 'checkpoints/step-20'}"
        ),
        cpu_env,
    )
    assert "(step 20, elastic: 1 rank(s)" in out.stdout + out.stderr
    assert sorted(steps(tmp_path / "two", "train/loss")) == list(range(21, 31))
    assert verify(tmp_path / "two/checkpoints/step-30") is None


def test_a_checkpoint_of_another_model_shape_is_refused_by_name(written, digits_dir, cpu_env, tmp_path):
    ckpt = written / "fsdp/checkpoints/step-20"
    out = run(command(tmp_path, digits_dir, *FSDP, "model.hidden=[64]", f"trainer.resume={ckpt}"), cpu_env, ok=False)
    assert out.returncode != 0 and "exitcode  : 2" in out.stderr, out.stderr[-3000:]
    line = next(x for x in out.stderr.splitlines() if x.startswith("error: rank 0"))
    # the checkpoint's own records (config.yaml, model.json) name the key, before DCP reads a byte
    assert (
        f"{ckpt} was written for another model, and nothing was loaded: model.hidden: the checkpoint "
        "has [128], this recipe [64]" in line
    ), line
    assert verify(ckpt) is None  # the checkpoint is untouched

    # a checkpoint from before checkpoints carried those records: DCP's index names the tensor
    old = tmp_path / "old" / "step-20"
    shutil.copytree(ckpt, old)
    marker = json.loads((old / "COMPLETE.json").read_text())
    for name in ("config.yaml", "model.json"):
        (old / name).unlink()
        del marker["files"][name]
    (old / "COMPLETE.json").write_text(json.dumps(marker))
    out = run(command(tmp_path, digits_dir, *FSDP, "model.hidden=[64]", f"trainer.resume={old}"), cpu_env, ok=False)
    line = next(x for x in out.stderr.splitlines() if x.startswith("error: rank 0"))
    assert "'net.0.weight' is (64, 64) in the model but (128, 64) float32 in the checkpoint" in line, line


def test_exports_are_indexed_safetensors_shards(written, digits_dir, cpu_env, tmp_path):
    """best/ of the FSDP2 run is sharded (trainer.export_max_shard_size) and was loaded back for
    the test split; launch.export cuts a DCP checkpoint the same way; both load into the plain
    model through accelerate's reader of the index format and give the run's numbers."""
    from accelerate.utils import load_checkpoint_in_model

    from models.autoregressive import MADEConfig, MADEWorkload
    from trainer.export import INDEX
    from trainer.sharded import model_tensors, read_model_tensors

    best = written / "fsdp/best"
    index = json.loads((best / INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1
    final = json.loads((written / "fsdp/final_metrics.json").read_text())
    ddp = json.loads((written / "ddp/final_metrics.json").read_text())
    assert final["best_step"] == 20 and final["test/nll"] == pytest.approx(ddp["test/nll"], rel=1e-5)

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.export",
            str(written / "fsdp"),
            "--step",
            "20",
            "--max-shard-size",
            "40KB",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=cpu_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # the checkpoint's own record of the config it was written with
    assert "checked against the model of " + str(written / "fsdp/checkpoints/step-20/config.yaml") in out.stdout
    files = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(files) > 1 and all((tmp_path / f).stat().st_size < 40_000 for f in files)
    state = written / "fsdp/checkpoints/step-20/state"
    saved = read_model_tensors(state, list(model_tensors(read_metadata(state))))
    for folder in (tmp_path, best):
        net = MADEWorkload(MADEConfig(hidden=[128])).build_model()
        load_checkpoint_in_model(net, str(folder / INDEX))
        assert net.state_dict().keys() == saved.keys()
        assert all(saved[k].equal(v) for k, v in net.state_dict().items())  # step 20 = best

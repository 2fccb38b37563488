"""One recipe, every backend, by config alone: DDP, FSDP2, DeepSpeed ZeRO-1/2/3 on 2 CPU
ranks (torchrun, gloo), and ZeRO-2 built by Accelerate's DeepSpeed plugin under
`accelerate launch`. Losses agree with DDP; ZeRO-2, ZeRO-3 and FSDP resume exactly after
SIGKILL; ZeRO-2/3 resume at another world size like DDP does; DeepSpeed's own partitions
consolidate to the weights we export; launcher settings that contradict the recipe are
refused."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import kill_past_checkpoint

from trainer.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = {
    "ddp": [],
    "fsdp": ["trainer.accelerate.strategy=fsdp", "trainer.accelerate.fsdp_min_params=1000"],
    "zero1": ["trainer.backend=deepspeed", "trainer.deepspeed.zero_stage=1"],
    "zero2": ["trainer.backend=deepspeed", "trainer.deepspeed.zero_stage=2"],
    "zero3": ["trainer.backend=deepspeed", "trainer.deepspeed.zero_stage=3"],
}


def command(run_dir, digits_dir, backend, *overrides, nproc=2):
    return [
        str(Path(sys.executable).parent / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "launch.train",
        *recipe(run_dir, digits_dir, backend, *overrides),
    ]


def recipe(run_dir, digits_dir, backend, *overrides):
    return [
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
        *BACKENDS[backend],
        *overrides,
    ]


def run(cmd, env):
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-6000:]
    return out.stdout + out.stderr


def losses(run_dir, key="train/loss"):
    return [r[key] for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if key in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits_dir, cpu_env):
    run_dir = tmp_path_factory.mktemp("ddp")
    run(
        command(
            run_dir,
            digits_dir,
            "ddp",
            "trainer.max_steps=20",
            "trainer.log_every=1",
            "trainer.eval_every=10",
            "trainer.checkpoint_every=10",
        ),
        cpu_env,
    )
    return run_dir


# the ZeRO stages run in make drills (CI time); make test keeps FSDP here, and ZeRO-2's
# agreement with DDP through Accelerate's DeepSpeed plugin below
@pytest.mark.parametrize("backend", ["fsdp"] + [pytest.param(f"zero{s}", marks=pytest.mark.drill) for s in (1, 2, 3)])
def test_backends_agree_with_ddp(tmp_path, digits_dir, cpu_env, reference, backend):
    run(
        command(
            tmp_path,
            digits_dir,
            backend,
            "trainer.max_steps=20",
            "trainer.log_every=1",
            "trainer.eval_every=10",
            "trainer.checkpoint_every=10",
        ),
        cpu_env,
    )
    meta = json.loads((tmp_path / "checkpoints/step-20/COMPLETE.json").read_text())
    if backend == "fsdp":  # really sharded: each rank wrote its half of every tensor
        assert {meta["files"][f"state/__{r}_0.distcp"]["rank"] for r in (0, 1)} == {0, 1}
        from trainer.sharded import read_metadata

        index = read_metadata(tmp_path / "checkpoints/step-20/state").state_dict_metadata
        assert len(index["model.net.0.weight"].chunks) == 2
    else:  # no full-weights gather into a DeepSpeed checkpoint unless asked
        assert not [f for f in meta["files"] if f.endswith(".safetensors")]
    from omegaconf import OmegaConf

    saved = OmegaConf.load(tmp_path / "config.yaml").trainer
    assert (saved.backend, saved.accelerate.strategy, saved.deepspeed.zero_stage) == {
        "fsdp": ("accelerate", "fsdp", 2),
        "zero1": ("deepspeed", "ddp", 1),
        "zero2": ("deepspeed", "ddp", 2),
        "zero3": ("deepspeed", "ddp", 3),
    }[backend]
    for key in ("train/loss", "train/grad_norm"):
        assert losses(tmp_path, key) == pytest.approx(losses(reference, key), rel=1e-5), key
    ours = json.loads((tmp_path / "final_metrics.json").read_text())
    ref = json.loads((reference / "final_metrics.json").read_text())
    assert ours["test/nll"] == pytest.approx(ref["test/nll"], rel=1e-5)
    assert ours["test/count"] == 360 and ours["val/count"] == 180


# drills (CI time), as is the resize below: make test kills and resumes the smoke recipe
# under torchrun (tests/test_multinode.py)
@pytest.mark.parametrize("backend", [pytest.param(b, marks=pytest.mark.drill) for b in ("zero2", "zero3", "fsdp")])
def test_sigkill_resume_is_exact(tmp_path, digits_dir, cpu_env, backend):
    args = ("trainer.max_steps=160", "trainer.log_every=1", "trainer.checkpoint_every=40", "trainer.eval_every=40")
    run(command(tmp_path / "ref", digits_dir, backend, *args), cpu_env)
    killed = tmp_path / "killed"
    cmd = command(killed, digits_dir, backend, *args)
    kill_past_checkpoint(cmd, cpu_env, killed, checkpoint=40, past=55)

    assert "resumed from" in run(cmd, cpu_env)
    for key in ("train/loss", "train/grad_norm", "train/lr"):
        assert losses(killed, key) == losses(tmp_path / "ref", key), key  # exact
    assert json.loads((killed / "final_metrics.json").read_text()) == json.loads(
        (tmp_path / "ref" / "final_metrics.json").read_text()
    )


def test_deepspeed_partitions_consolidate_to_the_export(tmp_path, digits_dir, cpu_env):
    """ZeRO-3 partitions -> one safetensors file with DeepSpeed's own zero_to_fp32; it equals
    the weights our gather wrote, loads strictly into the plain model and gives the run's
    test NLL."""
    run_dir = tmp_path / "z3"
    run(
        command(
            run_dir,
            digits_dir,
            "zero3",
            "trainer.max_steps=20",
            "trainer.log_every=10",
            "trainer.eval_every=0",
            "trainer.checkpoint_every=0",
            "trainer.keep_last_k=1",
            "trainer.deepspeed.save_full_weights=true",
        ),
        cpu_env,
    )
    out = subprocess.run(
        [sys.executable, "-m", "launch.export", str(run_dir), "--which", "latest", "--out", str(tmp_path / "export")],
        cwd=ROOT,
        env=cpu_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    from safetensors.torch import load_file, load_model

    consolidated = load_file(tmp_path / "export/model.safetensors")
    # the same weights gathered a parameter at a time: into the checkpoint when asked
    # (trainer.deepspeed.save_full_weights), and into best/
    gathered = load_file(run_dir / "checkpoints/step-20/model.safetensors")
    best = load_file(run_dir / "best/model.safetensors")
    assert consolidated.keys() == gathered.keys() == best.keys()
    assert all((consolidated[k] == gathered[k]).all() and (best[k] == gathered[k]).all() for k in consolidated)
    meta = json.loads((run_dir / "checkpoints/step-20/COMPLETE.json").read_text())
    assert meta["files"]["model.safetensors"]["rank"] == 0
    assert {e["rank"] for n, e in meta["files"].items() if "zero_pp_rank_1_" in n} == {1}  # each hashes its own

    from data_pipelines.stream import eval_batches, resolve_shards
    from models.autoregressive import MADEConfig, MADEWorkload

    wl = MADEWorkload(MADEConfig(hidden=[128]))
    net = wl.build_model()
    load_model(net, str(tmp_path / "export/model.safetensors"))
    sums = {"nll_sum": 0.0, "count": 0.0}
    for x in eval_batches(
        resolve_shards(str(digits_dir / "test")),
        decode=wl.decode,
        collate=wl.collate,
        batch_size=100,
        rank=0,
        world_size=1,
    ):
        for k, v in wl.eval_sums(net, x).items():
            sums[k] += v.item()
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["best_step"] == 20  # one evaluation, at the end: best = last = exported
    assert wl.eval_metrics(sums)["nll"] == pytest.approx(final["test/nll"], rel=1e-5)


@pytest.mark.drill
def test_native_deepspeed_launcher(tmp_path, digits_dir, cpu_env):
    """`deepspeed --num_gpus 2 --module launch.train` (it adds --local_rank; without
    --num_gpus it would start one process on a CPU machine: docs/platform-notes.md)."""
    bin_dir = Path(sys.executable).parent
    env = dict(cpu_env, PATH=f"{bin_dir}:{cpu_env['PATH']}")
    cmd = [str(bin_dir / "deepspeed"), "--num_gpus", "2", "--module", "launch.train"] + recipe(
        tmp_path,
        digits_dir,
        "zero3",
        "trainer.max_steps=10",
        "trainer.log_every=5",
        "trainer.eval_every=0",
        "trainer.checkpoint_every=0",
    )
    run(cmd, env)
    meta = json.loads((tmp_path / "checkpoints/step-10/COMPLETE.json").read_text())
    assert meta["world_size"] == 2
    assert len([f for f in meta["files"] if f.startswith("deepspeed/") and "optim_states" in f]) == 2


def test_accelerate_deepspeed_plugin(tmp_path, digits_dir, cpu_env, reference):
    """`accelerate launch` with launch/accelerate/deepspeed_zero2.yaml: the engine is built by
    Accelerate's plugin from our config, and steps at the accumulation boundary we set. Two
    micro-batches of 16 take DDP's steps of 32. ACCELERATE_USE_CPU must be unset: with it
    Accelerate drops the DeepSpeed plugin (docs/platform-notes.md)."""
    env = {k: v for k, v in cpu_env.items() if k != "ACCELERATE_USE_CPU"}
    launcher = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--config_file",
        str(ROOT / "launch/accelerate/deepspeed_zero2.yaml"),
        "--num_processes",
        "2",
        "-m",
        "launch.train",
    ]
    out = run(
        launcher
        + recipe(
            tmp_path,
            digits_dir,
            "zero2",
            "trainer.max_steps=20",
            "trainer.log_every=1",
            "trainer.eval_every=10",
            "trainer.checkpoint_every=10",
            "data.batch_size=16",
            "trainer.grad_accum_steps=2",
        ),
        env,
    )
    assert "backend: DeepSpeed ZeRO-2, engine built by Accelerate's DeepSpeed plugin on 2 rank(s)" in out
    for key in ("train/loss", "train/grad_norm"):
        assert losses(tmp_path, key) == pytest.approx(losses(reference, key), rel=1e-4), key
    meta = json.loads((tmp_path / "checkpoints/step-20/COMPLETE.json").read_text())
    assert len([f for f in meta["files"] if f.startswith("deepspeed/") and "optim_states" in f]) == 2
    assert not [f for f in meta["files"] if f.endswith(".safetensors")]  # no full-weights gather
    ours = json.loads((tmp_path / "final_metrics.json").read_text())
    ref = json.loads((reference / "final_metrics.json").read_text())
    assert ours["test/nll"] == pytest.approx(ref["test/nll"], rel=1e-4)

    # the same YAML under a recipe that asks for ZeRO-3 is refused before any training
    bad = subprocess.run(
        launcher + recipe(tmp_path / "bad", digits_dir, "zero3"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0
    assert "zero_stage=2, the recipe's trainer.deepspeed.zero_stage=3" in bad.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("backend", [pytest.param(b, marks=pytest.mark.drill) for b in ("zero2", "zero3")])
def test_deepspeed_resumes_at_another_world_size(tmp_path, digits_dir, cpu_env, reference, backend):
    """A ZeRO checkpoint written by 2 ranks resumes on 1 rank through DeepSpeed's universal
    checkpoint (weights and Adam moments re-partitioned): its steps equal those of DDP
    resumed on 1 rank from DDP's own 2-rank checkpoint of the same step."""
    args = ("trainer.max_steps=20", "trainer.log_every=1", "trainer.eval_every=10", "trainer.checkpoint_every=10")
    run(command(tmp_path / "two", digits_dir, backend, *args), cpu_env)
    out = run(
        command(
            tmp_path / "one",
            digits_dir,
            backend,
            *args,
            f"trainer.resume={tmp_path / 'two/checkpoints/step-10'}",
            nproc=1,
        ),
        cpu_env,
    )
    assert "(step 10, elastic" in out
    ddp = tmp_path / "ddp_one"
    run(command(ddp, digits_dir, "ddp", *args, f"trainer.resume={reference / 'checkpoints/step-10'}", nproc=1), cpu_env)
    for key in ("train/loss", "train/grad_norm"):
        assert len(losses(ddp, key)) == 10
        assert losses(tmp_path / "one", key) == pytest.approx(losses(ddp, key), rel=1e-5), key
    # the converted copy is gone; the 2-rank checkpoint is as it was written
    assert sorted(p.name for p in (tmp_path / "two/checkpoints").iterdir()) == ["step-10", "step-20"]
    from trainer.checkpoint import verify

    assert verify(tmp_path / "two/checkpoints/step-10") is None
    meta = json.loads((tmp_path / "one/checkpoints/step-20/COMPLETE.json").read_text())
    assert meta["world_size"] == 1


def ds_trainer(**ds):
    from trainer.config import DeepSpeedSection, TrainerConfig

    return TrainerConfig(backend="deepspeed", deepspeed=DeepSpeedSection(**ds))


def test_launcher_settings_must_agree_with_the_recipe(monkeypatch):
    """What an `accelerate launch` YAML exports may agree with the recipe, never overrule it."""
    from trainer.backends import check_launch_env
    from trainer.config import ConfigError, TrainerConfig

    for key in [k for k in __import__("os").environ if k.startswith("ACCELERATE_")]:
        monkeypatch.delenv(key)
    check_launch_env(TrainerConfig(), 8)
    check_launch_env(ds_trainer(zero_stage=1), 8)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="FSDP config.*trainer.accelerate.strategy=ddp"):
        check_launch_env(TrainerConfig(), 8)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ConfigError, match="DeepSpeed config.*trainer.backend=accelerate"):
        check_launch_env(TrainerConfig(), 8)
    with pytest.raises(ConfigError, match="zero_stage=3, the recipe's trainer.deepspeed.zero_stage=2"):
        check_launch_env(ds_trainer(zero_stage=2), 8)
    check_launch_env(ds_trainer(zero_stage=3), 8)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    with pytest.raises(ConfigError, match="trainer.deepspeed.offload_optimizer=False"):
        check_launch_env(ds_trainer(zero_stage=3), 8)
    check_launch_env(ds_trainer(zero_stage=3, offload_optimizer=True), 8)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "launch/deepspeed/zero3_offload.json")
    with pytest.raises(ConfigError, match="trainer.deepspeed.config_file"):
        check_launch_env(ds_trainer(zero_stage=3, offload_optimizer=True), 8)


def test_launcher_precision_must_agree_with_the_recipe(monkeypatch):
    """`accelerate launch --mixed_precision bf16` on a recipe that trains in fp32 is refused,
    naming both; the launcher's default "no" leaves a bf16 recipe as it is."""
    from trainer.backends import check_launch_env
    from trainer.config import ConfigError, TrainerConfig

    for key in [k for k in __import__("os").environ if k.startswith("ACCELERATE_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    for trainer in (TrainerConfig(mixed_precision="no"), ds_trainer(zero_stage=2)):
        with pytest.raises(ConfigError, match="--mixed_precision bf16.*trainer.mixed_precision=no"):
            check_launch_env(trainer, 8)
    check_launch_env(TrainerConfig(mixed_precision="bf16"), 8)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    check_launch_env(TrainerConfig(mixed_precision="bf16"), 8)
    check_launch_env(TrainerConfig(mixed_precision="no"), 8)


def test_deepspeed_json_must_agree_with_the_recipe(tmp_path):
    from trainer.backends.deepspeed import deepspeed_config
    from trainer.config import ConfigError

    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"stage": 3, "overlap_comm": True}, "wall_clock_breakdown": True}))
    with pytest.raises(ConfigError, match="stage=3, but trainer.deepspeed.zero_stage=2"):
        deepspeed_config(ds_trainer(zero_stage=2, config_file=str(f)), 8)
    merged = deepspeed_config(ds_trainer(zero_stage=3, config_file=str(f)), 8)
    assert merged["zero_optimization"] == {
        "stage": 3,
        "overlap_comm": True,
        "stage3_gather_16bit_weights_on_model_save": True,
    }
    assert merged["wall_clock_breakdown"] is True and merged["train_micro_batch_size_per_gpu"] == 8
    with pytest.raises(
        ConfigError, match="offload_optimizer.device=cpu, but trainer.deepspeed.offload_optimizer=False"
    ):
        deepspeed_config(
            ds_trainer(
                zero_stage=3, config_file=str(ROOT / "launch/deepspeed/zero3_offload.json"), offload_params=True
            ),
            8,
        )
    f.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=4, but the trainer config gives 8"):
        deepspeed_config(ds_trainer(zero_stage=2, config_file=str(f)), 8)


def test_launch_that_forms_a_smaller_group_is_refused(tmp_path, digits_dir, cpu_env):
    """A GPU launch YAML on a CPU machine without ACCELERATE_USE_CPU=1 starts processes that
    each form a group of one: they would train alone and race on one run dir."""
    env = {k: v for k, v in cpu_env.items() if k != "ACCELERATE_USE_CPU"}
    cmd = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--config_file",
        str(ROOT / "launch/accelerate/fsdp.yaml"),
        "--num_processes",
        "2",
        "-m",
        "launch.train",
        *recipe(tmp_path / "run", digits_dir, "fsdp", "trainer.max_steps=5"),
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "the launcher started 2 processes (WORLD_SIZE) but the Accelerate FSDP2" in out.stderr
    assert not (tmp_path / "run").exists()

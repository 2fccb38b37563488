"""launch.doctor: each planted mistake is caught, with a message naming the key, shard or
folder at fault; a clean recipe is declared ready."""

import json
import re
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from launch import doctor
from launch.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "configs" / "autoregressive"


@pytest.fixture
def run(capsys, digits_dir, tmp_path):
    """doctor on a recipe (made.yaml by default) over the test digits shards: (exit code, lines)."""

    def run(*args, recipe="made.yaml"):
        argv = [
            "--config",
            str(RECIPES / recipe),
            f"run.dir={tmp_path / 'run'}",
            *(f"data.{s}.urls={digits_dir / s}" for s in ("train", "val", "test")),
            *args,
        ]
        code = doctor.main(argv)
        return code, capsys.readouterr().out.splitlines()

    return run


def failures(lines):
    return [line for line in lines if line.startswith("FAIL")]


def test_clean_recipe_is_ready(run, digits_dir):
    code, lines = run("--nodes", "2", "--gpus-per-node", "2")
    assert code == 0 and not failures(lines)
    assert lines[-1] == "verdict: ready to launch on 2 node(s) x 2 GPU(s) = 4 rank(s)"
    manifest = json.loads((digits_dir / "train" / "manifest.json").read_text())
    shards, samples = len(manifest["shards"]), manifest["total_samples"]
    train = next(line for line in lines if "data.train.urls" in line)
    assert f"{shards} shard(s), {samples} samples" in train
    assert f"one epoch ~ {samples / 128:,.0f} step(s) at global batch 128" in train  # 32 x 4 ranks
    assert any(
        "global batch 128 = data.batch_size 32 x trainer.grad_accum_steps 1 x 4 rank(s)" in line for line in lines
    )


@pytest.mark.parametrize("override, key", [("trainer.max_stepz=5", "trainer.max_stepz"), ("optim.lr=-1", "optim.lr")])
def test_bad_key_is_named_and_stops_the_rest(run, override, key):
    code, lines = run(override)
    assert code == 1
    assert lines[0].startswith("FAIL  config") and f"'{key}'" in lines[0]
    assert len(lines) == 2 and lines[-1] == "verdict: 1 problem(s); fix them before submitting"


def test_too_few_shards_for_the_readers(run, digits_dir):
    shards = len(json.loads((digits_dir / "train" / "manifest.json").read_text())["shards"])
    code, lines = run("--nodes", "2", "--gpus-per-node", "4", "data.num_workers=2")
    assert code == 1
    (fail,) = failures(lines)
    assert "data.train.urls" in fail and f"{shards} shard(s) cannot feed 8 rank(s) x 2 worker(s) = 16 readers" in fail


def test_indivisible_global_batch(run):
    code, lines = run("--procs-per-node", "2", "data.global_batch_size=100")
    assert code == 1
    (fail,) = failures(lines)
    assert "data.global_batch_size" in fail and "data.batch_size=32 x 2 rank(s) = 64" in fail
    assert lines[-1] == "verdict: 1 problem(s); fix them before submitting"


def test_global_batch_sets_accumulation(run):
    code, lines = run("--procs-per-node", "2", "data.global_batch_size=256")
    assert code == 0
    assert any(
        "global batch 256 = data.batch_size 32 x trainer.grad_accum_steps 4 x 2 rank(s)" in line for line in lines
    )
    assert lines[-1].endswith("1 node(s) x 2 process(es) = 2 rank(s)")


def test_deepspeed_config_file_batch_disagrees(run, tmp_path):
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"train_batch_size": 64}))
    code, lines = run(
        "--nodes", "2", "--gpus-per-node", "2", f"trainer.deepspeed.config_file={ds_json}", recipe="made_zero2.yaml"
    )
    assert code == 1
    (fail,) = failures(lines)
    assert "trainer.deepspeed.config_file" in fail and "train_batch_size=64" in fail and "= 128" in fail


def test_deepspeed_config_file_not_json(run, tmp_path):
    ds_json = tmp_path / "ds.json"
    ds_json.write_text("{zero_optimization: {stage: 2}}")  # YAML-ish, not JSON
    code, lines = run(f"trainer.deepspeed.config_file={ds_json}", recipe="made_zero2.yaml")
    assert code == 1
    (fail,) = failures(lines)
    assert "trainer.deepspeed.config_file" in fail and str(ds_json) in fail and "not valid JSON" in fail


def test_deepspeed_config_file_zero_key_deepspeed_refuses(run, tmp_path):
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"reduce_bukcet_size": 5e7}}))
    code, lines = run(f"trainer.deepspeed.config_file={ds_json}", recipe="made_zero2.yaml")
    assert code == 1
    (fail,) = failures(lines)
    assert fail.startswith("FAIL  memory") and str(ds_json) in fail and "reduce_bukcet_size" in fail


def test_unwritable_run_dir(run, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a folder should be")
    code, lines = run(f"run.dir={blocker}/run")
    assert code == 1
    (fail,) = failures(lines)
    assert "run.dir" in fail and str(blocker) in fail and "is a file" in fail


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_run_dir_where_no_file_can_be_made(run):
    """As root every permission check says yes; /proc refuses new files even to root."""
    code, lines = run("run.dir=/proc/doctor-run")
    assert code == 1
    (fail,) = failures(lines)
    assert "run.dir" in fail and "cannot write in '/proc'" in fail


def test_unreadable_shard_is_named(run, digits_dir, tmp_path):
    train = tmp_path / "train"
    shutil.copytree(digits_dir / "train", train)
    bad = sorted(train.glob("*.tar"))[3]
    bad.unlink()
    bad.mkdir()  # still "exists" for resolve_shards, but cannot be read
    code, lines = run(f"data.train.urls={train}")
    assert code == 1
    (fail,) = failures(lines)
    assert "data.train.urls" in fail and str(bad) in fail


def test_missing_eval_shard_is_named(run, tmp_path):
    code, lines = run(f"data.val.urls={tmp_path}/val-{{0..1}}.tar")
    assert code == 1
    (fail,) = failures(lines)
    assert "data.val.urls" in fail and f"{tmp_path}/val-0.tar" in fail and "does not exist" in fail


def test_mixture_sources_are_counted_too(run, digits_dir):
    """launch.train's preflight counts data.train only; a mixture source with too few shards
    would fail later, inside the process group. The doctor names it."""
    val = digits_dir / "val"  # 2 shards
    code, lines = run("--procs-per-node", "4", f"data.mix=[{{urls: '{val}', weight: 1}}]")
    assert code == 1
    (fail,) = failures(lines)
    assert "data.mix.0.urls" in fail and "2 shard(s) cannot feed 4 rank(s)" in fail
    train = next(line for line in lines if "data.train.urls" in line)
    assert train.startswith("ok") and "at global batch 128" in train


def test_remote_shards_are_a_warning(run):
    code, lines = run("data.test.urls=https://example.invalid/test-{0..2}.tar")
    assert code == 0
    assert any(line.startswith("warn") and "data.test.urls: 3 remote shard(s)" in line for line in lines)


def test_not_enough_disk(run, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 500, 500))
    code, lines = run()
    assert code == 1
    (fail,) = failures(lines)
    assert "run.dir: not enough room" in fail
    assert re.search(r"= \d+\.\d MB; 500 bytes free", fail), fail


def fake_checkpoint(step: Path, size: int) -> None:
    """A complete checkpoint folder as trainer.checkpoint.latest accepts it: one file, checksummed."""
    from data_pipelines.shards import sha256_file
    from trainer.checkpoint import MARKER, write_json

    step.mkdir(parents=True)
    (step / "model.safetensors").write_bytes(b"\0" * size)
    write_json(
        step / MARKER,
        {"step": 7, "world_size": 1, "files": {"model.safetensors": sha256_file(step / "model.safetensors")}},
    )


def test_resume_uses_the_real_checkpoint_size(run, tmp_path):
    step = tmp_path / "run" / "checkpoints" / "step-7"
    fake_checkpoint(step, 3_000_000)
    code, lines = run("trainer.keep_last_k=2")
    assert code == 0
    assert any("continues from" in line and str(step) in line for line in lines)
    disk = next(line for line in lines if line.split()[1] == "disk")
    assert "2 new checkpoint(s) of ~3.0 MB" in disk  # keep 2, +1 while pruning, 1 already there


P = 1_000_000
SIZE = doctor.ModelSize(P, P, largest_layer=P // 2, numels=(P // 2, P // 2))  # two layers, none kept whole by ZeRO-3


def totals(parts):
    return tuple(sum(p.bytes for p in parts if p.place == place) for place in ("device", "host"))


@pytest.mark.parametrize(
    "recipe, device, host",
    [
        ("made.yaml", 16 * P + 4 * P, 0),  # DDP: everything on every rank, + its gradient buckets
        ("made_fsdp.yaml", 16 * P / 2, 0),
        ("made_zero1.yaml", 4 * P + (4 + 4 + 8) * P / 2, 0),  # + fp32 master partition; grads freed after backward
        ("made_zero2.yaml", 4 * P + (4 + 4 + 8) * P / 2, 0),
        # + gathered largest layer (weights and grads) and the reduce bucket (5e8 fp32, DeepSpeed's default)
        ("made_zero3.yaml", (4 + 4 + 4 + 8) * P / 2 + 8 * P // 2 + 4 * 5e8, 0),
        # zero3_offload.json: reduce_bucket_size 5e7; weights, master, grads and AdamW state on the host
        ("made_zero3_offload.yaml", 8 * P // 2 + 4 * 5e7, (4 + 4 + 4 + 8) * P / 2),
    ],
)
def test_memory_per_rank_on_two_ranks(recipe, device, host, monkeypatch):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from trainer.backends.deepspeed import deepspeed_config

    monkeypatch.chdir(ROOT)  # the offload recipe names its JSON relative to the repo
    cfg = load_recipe(RECIPES / recipe, ["run.dir=/tmp/unused"])
    zero = (
        DeepSpeedZeroConfig(**deepspeed_config(cfg.trainer, 32)["zero_optimization"])
        if cfg.trainer.backend == "deepspeed"
        else None
    )
    parts = doctor.memory_per_rank(cfg.trainer, SIZE, nodes=1, per_node=2, zero=zero)
    assert totals(parts) == pytest.approx((device, host))
    assert {p.by for p in parts} == {"ours"}  # fp32: DeepSpeed's estimators assume 16-bit weights


def test_sixteen_bit_zero_uses_deepspeeds_estimators():
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    for stage in (1, 2):
        cfg = load_recipe(RECIPES / f"made_zero{stage}.yaml", ["run.dir=/tmp/unused", "trainer.mixed_precision=bf16"])
        (part,) = doctor.memory_per_rank(cfg.trainer, SIZE, nodes=2, per_node=4)
        assert part.by == "DeepSpeed's estimate_zero2_model_states_mem_needs"
        theirs = stage_1_and_2.estimate_zero2_model_states_mem_needs(P, 4, 2, cpu_offload=False)[1]
        assert part.bytes == theirs == 2 * P + 18 * P // 8  # 16-bit weights + (2 + 4 + 4 + 8) / N
    cfg = load_recipe(RECIPES / "made_zero3.yaml", ["run.dir=/tmp/unused", "trainer.mixed_precision=bf16"])
    theirs, *ours = doctor.memory_per_rank(cfg.trainer, SIZE, nodes=2, per_node=4)
    assert theirs.by == "DeepSpeed's estimate_zero3_model_states_mem_needs"
    assert (
        theirs.bytes
        == stage3.estimate_zero3_model_states_mem_needs(
            P, P // 2, 4, 2, cpu_offload=False, cpu_offload_params=False, zero_init=False
        )[1]
    )
    assert [(p.what, p.bytes, p.by) for p in ours] == [
        ("reduce bucket", 2 * 5e8, "ours")
    ]  # bf16 bucket, DeepSpeed's size


def test_zero3_on_cpu_ranks_counts_the_bucket_pages_it_touches_and_small_params_whole():
    size = doctor.ModelSize(P, P, largest_layer=P - 1000, numels=(P - 1000, 1000))
    cfg = load_recipe(RECIPES / "made_zero3.yaml", ["run.dir=/tmp/unused"])
    parts = {p.what: p.bytes for p in doctor.memory_per_rank(cfg.trainer, size, nodes=1, per_node=2, cpu_ranks=True)}
    assert parts["reduce bucket"] == 4 * P  # the whole gradient passes through it, not 5e8 elements
    assert parts["whole small params"] == 4 * 1000  # under stage3_param_persistence_threshold, on every rank


def test_stage1_with_accumulation_keeps_whole_grads():
    cfg = load_recipe(RECIPES / "made_zero1.yaml", ["run.dir=/tmp/unused", "trainer.grad_accum_steps=4"])
    parts = {p.what: p.bytes for p in doctor.memory_per_rank(cfg.trainer, SIZE, nodes=1, per_node=2)}
    assert parts["whole grads between micro-steps"] == 4 * P and "fp32 grads" not in parts  # no second copy


def test_memory_line_says_what_it_leaves_out(run):
    params = 66_112  # made.yaml: 64 -> 512 -> 64 masked layers (weights and biases)
    code, lines = run("model.hidden=[512]", "--gpu-mem-gb", "0.001")  # 1 MB device: 16 x 66,112 bytes is over 80% of it
    memory = next(line for line in lines if line.split()[1] == "memory")
    assert code == 0 and memory.startswith("warn")
    assert f"{params:,} params" in memory and "~1.1 MB per rank" in memory and "activations not included" in memory
    assert "[by ours: fp32 weights, grads and AdamW state 1.1 MB]" in memory  # one rank: DDP is unwrapped, no buckets


def test_memory_line_names_each_estimator(run):
    code, lines = run("--procs-per-node", "2", "trainer.mixed_precision=bf16", recipe="made_zero3.yaml")
    memory = next(line for line in lines if line.split()[1] == "memory")
    assert code == 0 and "deepspeed zero-3, bf16 on 2 rank(s)" in memory
    assert (
        "by DeepSpeed's estimate_zero3_model_states_mem_needs: weights, fp32 master, 16-bit grads, fp32 grads, "
        "AdamW state, gathered largest layer"
    ) in memory
    assert "by ours: whole small params" in memory and "reduce bucket" in memory
    code, lines = run("--procs-per-node", "2")
    memory = next(line for line in lines if line.split()[1] == "memory")
    assert "by ours: fp32 weights, grads and AdamW state" in memory and "DDP gradient buckets" in memory


def test_usage_errors_exit_2(capsys):
    for argv in (
        ["--config", "x.yaml", "--nodes", "0"],
        ["--config", "x.yaml", "--gpus-per-node", "0"],
        ["--config", "x.yaml", "--gpus-per-node", "2", "--procs-per-node", "2"],
    ):
        with pytest.raises(SystemExit) as exc:
            doctor.main(argv)
        assert exc.value.code == 2
    assert "must be >= 1" in capsys.readouterr().err


def test_command_line_exit_code(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.doctor",
            "--config",
            str(RECIPES / "made.yaml"),
            f"run.dir={tmp_path}",
            "trainer.max_stepz=5",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert "trainer.max_stepz" in out.stdout and "verdict: 1 problem(s)" in out.stdout


def test_fresh_run_over_old_checkpoints_is_a_warning(run, tmp_path):
    fake_checkpoint(tmp_path / "run" / "checkpoints" / "step-7", 1000)
    code, lines = run("trainer.resume=never")
    assert code == 0
    (warn,) = [line for line in lines if line.startswith("warn")]
    assert "trainer.resume=never" in warn and "step-7" in warn


def test_model_that_does_not_build(run):
    """configs/sd/finetune_sd15.yaml points model.pretrained at a folder this machine lacks."""
    code, lines = run(recipe="../sd/finetune_sd15.yaml")
    assert code == 1
    (fail,) = failures(lines)
    assert fail.startswith("FAIL  model") and "model.pretrained" in fail
    assert any(line.startswith("warn  disk") for line in lines)  # no size: room not checked


def test_resume_of_another_model_and_a_busy_run_dir_fail(run, tmp_path):
    """The checkpoint's records (config.yaml, model.json) against the recipe, and run.dir's
    lock, as a launch would judge them."""
    import time

    import torch
    import yaml

    from launch.recipes import load_recipe
    from models.registry import build_workload
    from trainer.config import to_yaml

    step = tmp_path / "run" / "checkpoints" / "step-7"
    fake_checkpoint(step, 1000)
    cfg = load_recipe(RECIPES / "made.yaml", ["run.dir=x", "model.hidden=[96]"])
    with torch.device("meta"):
        shapes = {n: list(v.shape) for n, v in build_workload(cfg.model).build_model().state_dict().items()}
    (step / "config.yaml").write_text(to_yaml(cfg))
    (step / "model.json").write_text(json.dumps({"shapes": shapes}))
    assert yaml.safe_load((step / "config.yaml").read_text())["model"]["hidden"] == [96]

    code, lines = run("model.hidden=[96]", "model.mask_seed=3")  # shapes the same: a note
    assert code == 0
    assert any(line.startswith("warn  resume") and "model.mask_seed: 0 -> 3" in line for line in lines)
    code, lines = run("model.hidden=[64]")
    assert code == 1
    (fail,) = failures(lines)
    assert fail.startswith("FAIL  resume") and "model.hidden: the checkpoint has [96], this recipe [64]" in fail

    (tmp_path / "run" / "lock.json").write_text(
        json.dumps(
            {
                "host": "node-b",
                "pid": 1,
                "slurm_job": "9",
                "started": time.time(),
                "heartbeat": time.time(),
                "token": "t",
            }
        )
    )
    code, lines = run("model.hidden=[96]")
    assert code == 1
    (fail,) = failures(lines)
    assert fail.startswith("FAIL  run.dir") and "pid 1 on node-b, SLURM job 9" in fail

from pathlib import Path

import pytest

from launch.recipes import load_recipe
from trainer.config import ConfigError

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "autoregressive" / "made.yaml"


def test_recipe_loads_with_overrides():
    cfg = load_recipe(
        RECIPE, ["run.dir=/tmp/x", "trainer.max_steps=70", "model.hidden=[16,16]", "trainer.resume=never"]
    )
    assert cfg.trainer.max_steps == 70
    assert cfg.model.hidden == [16, 16]
    assert cfg.data.train.urls == "data/digits/train"


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.max_stpes=5", "trainer.max_stpes"),  # unknown key
        ("model.hiden=[3]", "model.hiden"),  # unknown key in the workload's section
        ("trainer.max_steps=many", "trainer.max_steps"),  # wrong type
        ("trainer.max_steps=0", "trainer.max_steps"),  # out of range
        ("optim.warmup_steps=5000", "optim.warmup_steps"),  # longer than the run
        ("trainer.mixed_precision=fp8", "trainer.mixed_precision"),
        ("trainer.checkpoint_every=30", "trainer.checkpoint_every"),  # not a multiple of log_every
        ("trainer.resume=/no/such/checkpoint", "trainer.resume"),
        ("model.name=gpt9", "model.name"),  # unknown workload
        ("data.train.urls=", "data.train.urls"),  # null: a type error
        ("data.train.urls=''", "data.train.urls"),  # empty: validate's "no training shards given"
        ("data.on_error=ignore", "data.on_error"),
        ("data.mix=[{urls: '/x/{0..3}.tar', weight: 0}]", "data.mix.0.weight"),
        ("data.mix=[{urls: '/x/{0..3}.tar', wieght: 1}]", "data.mix.0.wieght"),
        ("data.mix=[{urls: /x/{0..3}.tar}]", "data.mix"),  # unquoted braces: not YAML
        ("data.mix=5", "data.mix"),  # not a list
        ("data.mix=[{weight: 1}]", "data.mix.0.urls"),  # a source without shards
        ("trainer.max_steps", "trainer.max_steps"),  # not key=value
        ("trainer.max_time=-1", "trainer.max_time"),
        ("trainer.lock_stale_s=0", "trainer.lock_stale_s"),
        ("trainer.progress_every_s=0", "trainer.progress_every_s"),
        ("trainer.grad_accum_steps=0", "trainer.grad_accum_steps"),
        ("trainer.clip_grad_norm=-1", "trainer.clip_grad_norm"),
        ("trainer.log_every=0", "trainer.log_every"),
        ("trainer.eval_every=-1", "trainer.eval_every"),
        ("trainer.sample_every=-1", "trainer.sample_every"),
        ("trainer.checkpoint_every=-25", "trainer.checkpoint_every"),
        ("trainer.keep_last_k=0", "trainer.keep_last_k"),
        ("trainer.nonfinite=ignore", "trainer.nonfinite"),
        ("trainer.nonfinite_max_skips=0", "trainer.nonfinite_max_skips"),
        ("trainer.dist_timeout_s=0", "trainer.dist_timeout_s"),
        ("trainer.stop_check_every=-1", "trainer.stop_check_every"),
        ("trainer.end_margin_s=-1", "trainer.end_margin_s"),
        ("trainer.peak_tflops=-1", "trainer.peak_tflops"),
        ("trainer.profile_steps=[5]", "trainer.profile_steps"),
        ("trainer.profile_steps=[8,5]", "trainer.profile_steps"),
        ("optim.impl=apex", "optim.impl"),
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=-1", "optim.lr"),
        ("optim.schedule=linear", "optim.schedule"),
        ("optim.min_lr_ratio=2", "optim.min_lr_ratio"),
        ("optim.beta1=1.5", "optim.beta1"),
        ("optim.beta2=1.0", "optim.beta2"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.global_batch_size=-1", "data.global_batch_size"),
        ("data.eval_batch_size=0", "data.eval_batch_size"),
        ("data.num_workers=-1", "data.num_workers"),
        ("data.shuffle_buffer=0", "data.shuffle_buffer"),
        ("data.prefetch_factor=0", "data.prefetch_factor"),
        ("data.train.weight=0", "data.train.weight"),
    ],
)
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_recipe(RECIPE, [override])


def test_bad_recipe_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe file '.*no-such\.yaml' does not exist"):
        load_recipe(tmp_path / "no-such.yaml", [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: {max_steps: 5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml' is not valid YAML"):
        load_recipe(bad, [])


def test_missing_model_name_is_named(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run: {dir: x}\ndata: {train: {urls: x.tar}}\n")
    with pytest.raises(ConfigError, match=r"model\.name"):
        load_recipe(recipe, [])


def test_global_batch_derives_accumulation():
    from trainer.config import resolve_global_batch

    cfg = load_recipe(RECIPE, ["data.global_batch_size=256"])  # data.batch_size=32
    resolve_global_batch(cfg, 2)
    assert cfg.trainer.grad_accum_steps == 4
    cfg = load_recipe(RECIPE, ["data.global_batch_size=100"])
    with pytest.raises(
        ConfigError,
        match=r"data\.global_batch_size.*100 is not a multiple of "
        r"data\.batch_size=32 x 2 rank\(s\) = 64",
    ):
        resolve_global_batch(cfg, 2)
    cfg = load_recipe(RECIPE, ["data.global_batch_size=256", "trainer.grad_accum_steps=2"])
    with pytest.raises(ConfigError, match=r"trainer\.grad_accum_steps.*needs 4 on 2 rank"):
        resolve_global_batch(cfg, 2)


def test_mixture_config():
    cfg = load_recipe(RECIPE, ["data.mix=[{urls: '/other/{0..3}.tar', weight: 0.25}]"])
    assert cfg.data.mix[0].urls == "/other/{0..3}.tar" and cfg.data.mix[0].weight == 0.25
    assert cfg.data.train.weight == 1.0


def test_missing_run_dir_is_named(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: fvsbn}\ndata: {train: {urls: x.tar}}\n")
    with pytest.raises(ConfigError, match=r"run\.dir"):
        load_recipe(recipe, [])


def test_eval_without_val_shards_is_refused():
    with pytest.raises(ConfigError, match=r"data\.val\.urls': trainer.eval_every > 0 needs validation shards"):
        load_recipe(RECIPE, ["data.val.urls=", "trainer.eval_every=10"])


def test_an_empty_override_empties_the_split():
    """`data.val.urls=` is the empty string, as `data.val.urls=""` is (OmegaConf reads None)."""
    base = ["trainer.eval_every=0"]
    assert load_recipe(RECIPE, base).data.val.urls  # the recipe has a val split
    for empty in ("data.val.urls=", 'data.val.urls=""', "data.val.urls=''"):
        assert load_recipe(RECIPE, [*base, empty]).data.val.urls == ""


@pytest.mark.parametrize(
    "old, new",
    [
        ("model.compile=true", "trainer.compile"),
        ("model.gradient_checkpointing=true", "model.activation_checkpointing"),
        ("trainer.gradient_checkpointing=true", "model.activation_checkpointing"),
        ("trainer.activation_checkpointing=true", "model.activation_checkpointing"),
    ],
)
def test_a_second_name_for_a_switch_is_refused_with_the_name(old, new):
    with pytest.raises(ConfigError, match=f"config key '{old.split('=')[0]}' is not a key: it is called '{new}'"):
        load_recipe(RECIPE, [old])
    # switched off, as every config.yaml written before the rename lists it: read as absent
    load_recipe(RECIPE, [old.replace("=true", "=false")])


def test_empty_run_dir_and_resume_are_refused():
    with pytest.raises(ConfigError, match="config key 'run.dir': is empty"):
        load_recipe(RECIPE, ["run.dir="])
    with pytest.raises(ConfigError, match="config key 'trainer.resume': '' is neither"):
        load_recipe(RECIPE, ["trainer.resume="])


def test_fp16_on_cpu_is_refused():
    import torch

    if torch.cuda.is_available():
        pytest.skip("fp16 is valid where CUDA is present")
    with pytest.raises(ConfigError, match="fp16"):
        load_recipe(RECIPE, ["trainer.mixed_precision=fp16"])


def test_bad_config_fails_before_any_process_group(tmp_path, cpu_env):
    """launch.train exits 2 with the key, fast, and writes nothing."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.train",
            "--config",
            str(RECIPE),
            f"run.dir={tmp_path / 'run'}",
            "trainer.lr=0.1",
        ],
        cwd=root,
        env=cpu_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "trainer.lr" in out.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "recipe, backend, strategy, stage, offload",
    [
        ("made_fsdp", "accelerate", "fsdp", 2, False),
        ("made_zero1", "deepspeed", "ddp", 1, False),
        ("made_zero2", "deepspeed", "ddp", 2, False),
        ("made_zero3", "deepspeed", "ddp", 3, False),
        ("made_zero3_offload", "deepspeed", "ddp", 3, True),
    ],
)
def test_backend_recipes_build_on_the_base_recipe(recipe, backend, strategy, stage, offload):
    cfg = load_recipe(RECIPE.parent / f"{recipe}.yaml", [])
    t = cfg.trainer
    assert (t.backend, t.accelerate.strategy, t.deepspeed.zero_stage, t.deepspeed.offload_params) == (
        backend,
        strategy,
        stage,
        offload,
    )
    assert cfg.run.dir.endswith(recipe) and cfg.model.name == "made" and t.max_steps == 3000


def test_base_chain_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_recipe(tmp_path / "a.yaml", [])
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"'base'.*missing\.yaml"):
        load_recipe(tmp_path / "c.yaml", [])


@pytest.mark.parametrize(
    "overrides, key",
    [
        ("trainer.deepspeed.zero_stage=4", "trainer.deepspeed.zero_stage"),
        ("trainer.deepspeed.offload_params=true", "trainer.deepspeed.offload_params"),
        (
            "trainer.deepspeed.zero_stage=0 trainer.deepspeed.offload_optimizer=true",
            "trainer.deepspeed.offload_optimizer",
        ),
        ("trainer.deepspeed.via=mpi", "trainer.deepspeed.via"),
        ("trainer.backend=deepspeed trainer.nonfinite=skip", "trainer.nonfinite"),  # the engine steps itself
        ("trainer.deepspeed.config_file=/no/such/ds.json", "trainer.deepspeed.config_file"),
        ("trainer.accelerate.strategy=fsdp1", "trainer.accelerate.strategy"),
        ("trainer.backend=horovod", "trainer.backend"),
    ],
)
def test_backend_config_errors(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_recipe(RECIPE, overrides.split())


@pytest.mark.parametrize(
    "recipe", sorted(p.relative_to(RECIPE.parents[1]).as_posix() for p in RECIPE.parents[1].rglob("*.yaml"))
)
def test_every_shipped_recipe_loads(recipe, tmp_path):
    """Every recipe under configs/ names a registered workload and only known keys."""
    cfg = load_recipe(RECIPE.parents[1] / recipe, [f"run.dir={tmp_path}"])
    assert cfg.model.name and cfg.trainer.max_steps > 0


def test_preflight_counts_every_training_source(digits_dir, monkeypatch):
    """A mixture source with too few shards for ranks x workers fails before any process
    group, named by its own key; so does a DeepSpeed JSON that does not parse."""
    from data_pipelines.stream import DataError
    from launch.train import preflight

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_recipe(
        "configs/autoregressive/made.yaml",
        [
            f"data.train.urls={digits_dir}/train",
            "data.num_workers=2",
            f"data.mix=[{{urls: {digits_dir}/val, weight: 0.5}}]",
        ],
    )
    with pytest.raises(DataError, match=r"data\.mix\.0\.urls: 2 shard\(s\) cannot feed 2 rank\(s\) x 2"):
        preflight(cfg)


def test_deepspeed_json_that_does_not_parse_is_named(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text("{zero_optimization: {stage: 2}}")
    cfg = load_recipe("configs/autoregressive/made_zero2.yaml", [f"trainer.deepspeed.config_file={bad}"])
    from trainer.backends import check_launch_env

    with pytest.raises(ConfigError, match=r"'trainer\.deepspeed\.config_file': .*ds\.json is not valid JSON"):
        check_launch_env(cfg.trainer, cfg.data.batch_size)

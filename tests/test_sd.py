"""Latent diffusion on diffusers components: the tokenizer, the training targets against
their closed forms, EMA and caption dropout, precomputed latents, and a run that starts from
a local "pretrained" folder, is killed, resumes exactly (EMA included) and exports a
folder StableDiffusionPipeline loads. The from-scratch recipe reaching the colour target
is a drill."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import kill_past_checkpoint, scratch_workload

from trainer.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def test_tokenizer_round_trip(shapes_dir, tmp_path):
    from data_pipelines.sources.shapes import COLORS
    from models.sd import tokenizer

    tok = tokenizer.load(shapes_dir / "tokenizer", 16)
    caption = "a purple triangle at the bottom right"
    ids = tok(caption, padding="max_length", max_length=16, truncation=True).input_ids
    assert len(ids) == 16 and ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == caption
    colour_ids = {c: tok(c).input_ids[1:-1] for c in COLORS}
    assert all(len(v) == 1 for v in colour_ids.values())  # each colour is one token ...
    assert len({v[0] for v in colour_ids.values()}) == len(COLORS)  # ... of its own
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        tokenizer.load(tmp_path, 16)


def test_min_snr_weights_closed_form():
    from models.sd.workload import min_snr_weight

    snr = torch.tensor([0.1, 1.0, 5.0, 50.0])
    assert torch.allclose(min_snr_weight(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 1.0, 0.1]))
    assert torch.allclose(min_snr_weight(snr, 5.0, "v_prediction"), torch.tensor([0.1 / 1.1, 0.5, 5 / 6, 5 / 51]))


class Oracle(torch.nn.Module):
    """A 'UNet' that knows the clean latents and returns the exact epsilon or v target,
    computed from the noisy input by the closed form x_t = sqrt(ab) x0 + sqrt(1 - ab) eps."""

    def __init__(self, x0, sched):
        super().__init__()
        self.x0, self.sched = x0, sched
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, noisy, t, states):
        ab = self.sched.alphas_cumprod[t].double()[:, None, None, None]
        eps = (noisy.double() - ab.sqrt() * self.x0) / (1 - ab).sqrt()
        out = eps if self.sched.config.prediction_type == "epsilon" else ab.sqrt() * eps - (1 - ab).sqrt() * self.x0
        return type("Out", (), {"sample": out.float() + 0 * self.dummy})


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_loss_is_zero_for_the_exact_target(shapes_dir, tiny_vae, prediction):
    w = scratch_workload(shapes_dir, tiny_vae, prediction_type=prediction, snr_gamma=5.0, noise_offset=0.1)
    model = w.build_model()
    x0 = torch.randn(8, 4, 8, 8).double()
    model.unet = Oracle(x0, model.noise_scheduler)
    batch = {"latents": x0.float(), "input_ids": w.tokenize(["a red circle at the top"] * 8)}
    assert model(batch).item() < 1e-8
    model.unet = Oracle(x0 + 1, model.noise_scheduler)  # the wrong clean image: a clear loss
    assert model(batch).item() > 1e-2
    # the sampler is built from the training scheduler's config and must read the same
    # target (diffusers' from_config drops settings registered after construction)
    assert model.pipeline(w.tokenizer).scheduler.config.prediction_type == prediction


def test_step_trains_the_unet_only_and_ema_follows(shapes_dir, tiny_vae):
    w = scratch_workload(shapes_dir, tiny_vae, caption_dropout=0.5)
    model = w.build_model().train()
    ids = w.tokenize(["a blue square in the center"] * 32)
    seen = []
    encode = model.encode_text
    model.encode_text = lambda x: (seen.append(x.clone()), encode(x))[1]
    loss = model({"images": torch.rand(32, 3, 32, 32) * 2 - 1, "input_ids": ids})
    loss.backward()
    dropped = (seen[0] == model.empty_ids).all(1)
    assert 4 <= int(dropped.sum()) <= 28  # about half the captions became the empty prompt
    assert (seen[0][~dropped] == ids[~dropped]).all()
    assert all(p.grad is None for p in model.vae.parameters())
    assert all(p.grad is None for p in model.text_encoder.parameters())  # frozen by default
    assert all(p.grad is None for p in model.ema_unet.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.unet.parameters())

    before = [p.clone() for p in model.ema_unet.parameters()]
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(1.0)
    model.ema_update(step=100)  # decay min(0.9, 101/110) = 0.9: moves 10% of the way
    for old, new in zip(before, model.ema_unet.parameters()):
        assert torch.allclose(new, old + 0.1, atol=1e-5)


def test_precomputed_latents_and_text_states(shapes_dir, pretrained_dir, tmp_path):
    import webdataset as wds
    from diffusers import AutoencoderKL

    from data_pipelines.decode import image_tensor
    from data_pipelines.sources import latents
    from models.sd.workload import SDConfig, SDWorkload

    out = tmp_path / "latents"
    m = latents.precompute(
        str(shapes_dir / "val"), out, vae_dir="", pretrained=str(pretrained_dir), image_size=32, batch=16
    )
    assert m["total_samples"] == 40  # every sample, none dropped at a batch boundary
    first = next(iter(wds.WebDataset(str(out / m["shards"][0]["url"]), shardshuffle=False)))
    src = next(iter(wds.WebDataset(sorted(str(p) for p in (shapes_dir / "val").glob("*.tar")), shardshuffle=False)))
    assert first["__key__"] == src["__key__"] and first["txt"] == src["txt"]
    vae = AutoencoderKL.from_pretrained(pretrained_dir, subfolder="vae")
    with torch.no_grad():
        want = vae.encode(image_tensor(src, 32)[None]).latent_dist.mean[0] * vae.config.scaling_factor
    w = SDWorkload(SDConfig(pretrained=str(pretrained_dir), precomputed=True, color_match_samples=0))
    item = w.decode(first)
    assert set(item) == {"latents", "text_states"}
    assert torch.allclose(item["latents"], want, atol=1e-4)
    assert item["text_states"].shape == (16, 32)
    model = w.build_model()
    batch = w.collate([item, w.decode(first)])
    assert torch.isfinite(model(batch))
    with pytest.raises(KeyError, match="latent.npy"):
        w.decode(src)
    # the other way round: latents given to an image recipe name the key to set
    images = SDWorkload(SDConfig(pretrained=str(pretrained_dir), color_match_samples=0))
    with pytest.raises(KeyError, match="set model.precomputed=true"):
        images.decode(first)


def noise_png(width, height, seed):
    """Pixels with structure everywhere, so a crop one pixel off changes the latent."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_precomputed_latents_keep_their_bucket(shapes_dir, tiny_vae, tmp_path, capsys):
    """`make_shards latents --buckets`: each image's latent has the shape of the bucket the
    image stream picks (over the VAE factor 4), holds the encoding of the same center-cropped
    pixels, and the bucketed stream batches the latents one shape at a time."""
    import itertools

    from diffusers import AutoencoderKL
    from test_buckets import BUCKETS, SIZES

    from data_pipelines.buckets import image_size
    from data_pipelines.image_transforms import ImageTransforms, image_with_info
    from data_pipelines.sources.folder import folder_to_shards
    from data_pipelines.stream import ShardStream, iter_raw_samples, resolve_shards
    from launch import make_shards

    sizes = {**SIZES, "odd": (50, 22)}  # 16x16, 24x12, 12x24; odd: 27x12 after the resize, cropped to 24x12
    counts = {"sq": 7, "wide": 5, "tall": 3, "odd": 2}
    src = tmp_path / "images"
    src.mkdir()
    for kind, n in counts.items():
        for j in range(n):
            (src / f"{kind}{j}.png").write_bytes(noise_png(*sizes[kind], seed=len(kind) * 100 + j))
            (src / f"{kind}{j}.txt").write_text(f"a {kind} picture")
    for split in ("train", "val"):
        folder_to_shards(src, tmp_path / "shards" / split, min_shards=2)
    buckets = ",".join("{}x{}".format(*b) for b in BUCKETS.sizes)
    argv = ["latents", str(tmp_path / "shards"), "--vae", str(tiny_vae), "--out", str(tmp_path / "latents")]
    assert make_shards.main([*argv, "--batch", "4", "--buckets", buckets]) == 0
    assert "per bucket: " in capsys.readouterr().out
    out = tmp_path / "latents" / "train"
    for s in iter_raw_samples(resolve_shards(str(tmp_path / "latents" / "val")).urls):  # eval is not bucketed
        assert np.load(io.BytesIO(s["latent.npy"])).shape == (4, 8, 8) and "json" not in s

    source = {s["__key__"]: s for s in iter_raw_samples(resolve_shards(str(tmp_path / "shards" / "train")).urls)}
    shards = resolve_shards(str(out))
    written = list(iter_raw_samples(shards.urls))
    assert sorted(s["__key__"] for s in written) == sorted(source)
    for s in written:  # (a) the image path's bucket, over the VAE factor
        w, h = BUCKETS.nearest(*image_size(source[s["__key__"]]))
        assert np.load(io.BytesIO(s["latent.npy"])).shape == (4, h // 4, w // 4), s["__key__"]
        assert json.loads(s["json"])["latent"]["bucket"] == [w, h]
    # (b) the histogram of latent shapes is that of the image buckets (and the manifest's)
    images = BUCKETS.histogram(source.values())
    assert images == {"16x16": 7, "24x12": 7, "12x24": 3}
    assert BUCKETS.histogram(written) == {"latent:4x4x4": 7, "latent:4x3x6": 7, "latent:4x6x3": 3}  # (C, H/4, W/4)
    assert json.loads((out / "manifest.json").read_text())["buckets"] == images

    # (c) the latent of a cropped image is the VAE mean of the image stream's pixels
    vae = AutoencoderKL.from_pretrained(tiny_vae)
    for name in ("odd1", "tall2"):
        raw = next(s for k, s in source.items() if k.endswith(name))
        bucket = BUCKETS.nearest(*image_size(raw))
        pixels, info = image_with_info({**raw, "__bucket__": bucket, "__transforms__": ImageTransforms()}, 32)
        assert pixels.shape == (3, bucket[1], bucket[0])
        with torch.no_grad():
            expected = vae.encode(pixels[None]).latent_dist.mean[0] * vae.config.scaling_factor
        got = next(s for s in written if s["__key__"] == raw["__key__"])
        assert torch.allclose(torch.from_numpy(np.load(io.BytesIO(got["latent.npy"]))), expected, atol=1e-5)
        record = json.loads(got["json"])["latent"]
        assert (record["original_size"], record["crop_top_left"]) == (
            list(info.original_size),
            list(info.crop_top_left),
        )
    assert json.loads(next(s for s in written if s["__key__"].endswith("odd0"))["json"])["latent"] == {
        "bucket": [24, 12],
        "original_size": [22, 50],
        "crop_top_left": [0, 1],
    }

    # (d) the bucketed stream gives one-shape batches that the workload collates
    w = scratch_workload(shapes_dir, tiny_vae, precomputed=True)
    stream = ShardStream(
        shards,
        decode=w.decode,
        collate=w.collate,
        batch_size=2,
        seed=0,
        shuffle_buffer=4,
        rank=0,
        world_size=1,
        num_workers=1,
        buckets=BUCKETS,
        transforms=ImageTransforms(),
    )
    batches = [b.data for b in itertools.islice(iter(stream), 12)]
    shapes = [tuple(b["latents"].shape) for b in batches]
    assert set(shapes) == {(2, 4, 4, 4), (2, 4, 3, 6), (2, 4, 6, 3)}, shapes
    # how each latent was cropped comes with it, as from images
    assert all(b["original_size"].shape == (2, 2) and b["crop_top_left"].shape == (2, 2) for b in batches)
    # without data.buckets a batch would mix shapes: refused, naming the key
    mixed = [w.decode(s) for s in written[:8]]
    assert len({tuple(s["latents"].shape) for s in mixed}) > 1
    with pytest.raises(ValueError, match="need data.buckets set"):
        w.collate(mixed)

    # the same flags' mistakes are named by flag
    assert make_shards.main([*argv, "--buckets", "18x18"]) == 2
    assert "multiples of 4" in capsys.readouterr().err
    assert make_shards.main([*argv, "--bucket-area", "256", "--bucket-side", "16"]) == 2
    assert "--bucket-side: give area or side" in capsys.readouterr().err


def torchrun(run_dir, *overrides, nproc=2):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "launch.train",
        "--config",
        str(ROOT / "configs/sd/finetune_sd15.yaml"),
        f"run.dir={run_dir}",
        "trainer.progress_bar=false",
        *overrides,
    ]


def run(cmd, env):
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def tensorboard_texts(run_dir, tag) -> list[tuple[int, str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(f"{tag}/text_summary")]


def test_finetune_recipe_samples_its_own_prompts(tmp_path, shapes_dir, pretrained_dir, cpu_env):
    """configs/sd/finetune_sd15.yaml on the tiny local folder: the sample grid is of the
    recipe's prompts (logged beside it), and without model.sample_prompts of the val split's
    first captions; no colour check runs unless the recipe asks for one. perf/mfu is logged:
    the folder's FLOPs are counted on a meta model built from its config files."""
    short = [
        f"model.pretrained={pretrained_dir}",
        "model.image_size=32",
        "model.sample_steps=1",
        f"data.train.urls={shapes_dir}/train",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.shuffle_buffer=1",
        "trainer.max_steps=2",
        "trainer.grad_accum_steps=1",
        "trainer.mixed_precision=no",
        "trainer.sample_every=2",
        "trainer.num_samples=3",
        "trainer.checkpoint_every=0",
        "optim.warmup_steps=1",
    ]
    said = run(torchrun(tmp_path / "recipe", *short, nproc=1), cpu_env)
    assert "perf/mfu is not logged" not in said
    (logged_perf,) = [r for r in read_jsonl(tmp_path / "recipe" / "metrics.jsonl") if "train/samples_per_s" in r]
    assert logged_perf["perf/mfu"] > 0
    import yaml

    recipe = yaml.safe_load((ROOT / "configs/sd/finetune_sd15.yaml").read_text())["model"]["sample_prompts"]
    ((step, logged),) = tensorboard_texts(tmp_path / "recipe", "samples/prompts")
    assert step == 2 and logged.split("\n\n") == [recipe[i % len(recipe)] for i in range(3)]
    final = json.loads((tmp_path / "recipe" / "final_metrics.json").read_text())
    assert not any(k.startswith("color_match") for k in final)

    run(
        torchrun(tmp_path / "val", *short, "model.sample_prompts=null", f"data.val.urls={shapes_dir}/val", nproc=1),
        cpu_env,
    )
    from data_pipelines.stream import iter_raw_samples, resolve_shards

    captions = [s["txt"].decode() for _, s in zip(range(3), iter_raw_samples(resolve_shards(f"{shapes_dir}/val").urls))]
    ((_, logged),) = tensorboard_texts(tmp_path / "val", "samples/prompts")
    assert logged.split("\n\n") == captions


def test_sample_prompts_and_palette_keys_refuse_bad_values(shapes_dir, tiny_vae, tmp_path):
    with pytest.raises(FileNotFoundError, match="model.sample_prompts=.*no such file"):
        scratch_workload(shapes_dir, tiny_vae, sample_prompts=str(tmp_path / "none.txt"))
    with pytest.raises(ValueError, match="model.color_match_samples=4 needs model.color_palette"):
        scratch_workload(shapes_dir, tiny_vae, color_match_samples=4)
    with pytest.raises(ValueError, match="model.sample_prompts must be a list of strings or a file path, got 3"):
        scratch_workload(shapes_dir, tiny_vae, sample_prompts=3)
    w = scratch_workload(shapes_dir, tiny_vae, sample_prompts=["a dog", "a cat"])
    assert w.prompts(3) == ["a dog", "a cat", "a dog"]
    with pytest.raises(ValueError, match="no model.sample_prompts and no data split"):
        scratch_workload(shapes_dir, tiny_vae).prompts(2)


@pytest.mark.drill  # 37 s; make test trains the SD step in the tests above (CI time)
def test_finetune_from_local_folder_resumes_exactly_and_exports(tmp_path, shapes_dir, pretrained_dir, cpu_env):
    """The fine-tune recipe on a tiny local SD folder, 2 CPU ranks: SIGKILL after a
    checkpoint and resume gives the same losses and the same EMA UNet as an unbroken run;
    VAE and text encoder stay as loaded; the exported folder generates an image."""
    small = [
        f"model.pretrained={pretrained_dir}",
        "model.image_size=32",
        "model.activation_checkpointing=true",
        "model.ema_decay=0.9",
        "model.sample_steps=2",
        "model.color_match_samples=4",
        f"model.color_palette={shapes_dir}/palette.json",
        f"model.sample_prompts={shapes_dir}/prompts.txt",
        f"data.train.urls={shapes_dir}/train",
        "data.batch_size=4",
        "data.num_workers=1",
        "data.shuffle_buffer=20",
        "trainer.max_steps=12",
        "trainer.grad_accum_steps=1",
        "trainer.mixed_precision=no",
        "trainer.log_every=1",
        "trainer.sample_every=6",
        "trainer.num_samples=4",
        "trainer.checkpoint_every=4",
        "optim.lr=1e-3",
        "optim.warmup_steps=2",
    ]
    ref = tmp_path / "ref"
    run(torchrun(ref, *small), cpu_env)
    killed = tmp_path / "killed"
    kill_past_checkpoint(torchrun(killed, *small), cpu_env, killed, checkpoint=4, past=6)
    assert "resumed from" in run(torchrun(killed, *small), cpu_env)

    def series(d):
        return [(r["step"], r["train/loss"]) for r in read_jsonl(d / "metrics.jsonl") if "train/loss" in r]

    assert len(series(ref)) == 12 and series(killed) == series(ref)

    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    def weights(d, part):
        return load_file(str(next((d / part).glob("*.safetensors"))))

    for part in ("unet", "vae", "text_encoder"):
        a, b = weights(ref / "pipeline", part), weights(killed / "pipeline", part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    for part in ("vae", "text_encoder"):  # frozen
        a, b = weights(pretrained_dir, part), weights(ref / "pipeline", part)
        assert all(torch.equal(a[k], b[k]) for k in a), part
    start, ema = weights(pretrained_dir, "unet"), weights(ref / "pipeline", "unet")
    assert any(not torch.equal(start[k], ema[k]) for k in start)  # trained

    final = json.loads((ref / "final_metrics.json").read_text())
    assert 0 <= final["color_match_guided"] <= 1 and 0 <= final["color_match_unconditional"] <= 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(ref / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("samples")] == [6, 12]

    pipe = StableDiffusionPipeline.from_pretrained(ref / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red circle at the top left",
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_missing_vae_stage_is_named(shapes_dir, tmp_path):
    from models.sd.workload import SDConfig, SDWorkload

    with pytest.raises(FileNotFoundError, match="configs/sd/tiny_vae.yaml"):
        SDWorkload(SDConfig(vae=str(tmp_path / "nope"), tokenizer=str(shapes_dir / "tokenizer")))
    with pytest.raises(FileNotFoundError, match="lacks unet/"):
        SDWorkload(SDConfig(pretrained=str(tmp_path)))


@pytest.mark.drill
@pytest.mark.timeout(2400)
def test_tiny_recipe_from_scratch_reaches_the_colour_target(tmp_path, cpu_env):
    """Both stages of the default CPU recipe on 2 ranks: guided samples match their
    caption's colour at least 90% of the time, far above unconditional samples."""
    from data_pipelines.sources import shapes

    data = tmp_path / "shapes"
    shapes.build(data, size=32)
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "launch.train",
    ]
    common = ["trainer.progress_bar=false"]
    run(
        [
            *launch,
            "--config",
            str(ROOT / "configs/sd/tiny_vae.yaml"),
            f"run.dir={tmp_path}/vae",
            f"data.train.urls={data}/train",
            f"data.val.urls={data}/val",
            *common,
        ],
        cpu_env,
    )
    run(
        [
            sys.executable,
            "-m",
            "launch.make_shards",
            "latents",
            str(data),
            "--vae",
            f"{tmp_path}/vae/vae",
            "--out",
            str(tmp_path / "latents"),
        ],
        cpu_env,
    )
    run(
        [
            *launch,
            "--config",
            str(ROOT / "configs/sd/tiny.yaml"),
            f"run.dir={tmp_path}/sd",
            f"model.vae={tmp_path}/vae/vae",
            f"model.tokenizer={data}/tokenizer",
            f"model.sample_prompts={data}/prompts.txt",
            f"model.color_palette={data}/palette.json",
            f"data.train.urls={tmp_path}/latents/train",
            f"data.val.urls={tmp_path}/latents/val",
            *common,
        ],
        cpu_env,
    )
    final = json.loads((tmp_path / "sd/final_metrics.json").read_text())
    assert final["color_match_guided"] >= 0.9, final
    assert final["color_match_guided"] > final["color_match_unconditional"] + 0.4, final
    assert math.isfinite(final["val/loss"])

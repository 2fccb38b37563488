"""Score SDEs and SMLD against closed forms: perturbation kernels, the DSM loss at the true
score, and every sampler driven by the exact score of a Gaussian."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from models.score.sde import (
    SDES,
    VESDE,
    VPSDE,
    annealed_langevin,
    dsm_loss,
    euler_maruyama,
    geometric_sigmas,
    predictor_corrector,
    probability_flow,
    sliced_wasserstein,
    smld_loss,
)


@pytest.mark.parametrize("name", list(SDES))
def test_kernel_matches_the_moment_odes(name):
    """For a linear SDE the kernel's mean m and variance v solve m' = f(m), v' = 2 a v + g^2
    (f = a x): integrate them numerically and compare with the closed form."""
    sde = SDES[name]()

    def a_of(t):
        return 0.0 if isinstance(sde, VESDE) else -0.5 * float(sde.beta(torch.tensor(t)))

    def rhs(t, y):
        m, v = y
        g2 = float(sde.diffusion(torch.tensor(t, dtype=torch.float64))) ** 2
        return [a_of(t) * m, 2 * a_of(t) * v + g2]

    x0 = 1.7
    v0 = sde.sigma_min**2 if isinstance(sde, VESDE) else 0.0  # VE's kernel starts at sigma_min
    for t in (0.1, 0.5, 1.0):
        sol = solve_ivp(rhs, (0.0, t), [x0, v0], rtol=1e-10, atol=1e-12)
        mean, std = sde.marginal(torch.tensor([[x0]], dtype=torch.float64), torch.tensor([t], dtype=torch.float64))
        assert float(mean) == pytest.approx(sol.y[0, -1], rel=1e-6)
        assert float(std) ** 2 == pytest.approx(sol.y[1, -1], rel=1e-5, abs=1e-9)


def test_forward_simulation_matches_the_vp_kernel():
    sde, g = VPSDE(), torch.Generator().manual_seed(0)
    x = torch.full((20000, 1), 2.0, dtype=torch.float64)
    n, t_end = 2000, 0.3
    dt = t_end / n
    for i in range(n):
        t = torch.full((x.shape[0],), i * dt, dtype=torch.float64)
        x = (
            x
            + sde.drift(x, t) * dt
            + sde.diffusion(t)[:, None] * math.sqrt(dt) * torch.randn(x.shape, generator=g, dtype=torch.float64)
        )
    mean, std = sde.marginal(torch.tensor([[2.0]], dtype=torch.float64), torch.tensor([t_end], dtype=torch.float64))
    assert x.mean().item() == pytest.approx(float(mean), abs=0.02)
    assert x.std().item() == pytest.approx(float(std), rel=0.03)


@pytest.mark.parametrize("name", list(SDES))
def test_dsm_loss_is_zero_at_the_true_score_of_a_point(name):
    """Data = one point x0: the score of p_t is the kernel's, -(x - mean) / std^2, and the
    DSM loss is zero for it (and positive for a slightly wrong one)."""
    sde, x0 = SDES[name](), torch.randn(64, 3, dtype=torch.float64)

    def true_score(x, t):
        mean, std = sde.marginal(x0, t)
        return -(x - mean) / std[:, None] ** 2

    g = torch.Generator().manual_seed(1)
    assert dsm_loss(true_score, sde, x0, generator=g).item() == pytest.approx(0.0, abs=1e-12)
    assert dsm_loss(lambda x, t: 1.01 * true_score(x, t), sde, x0, generator=g).item() > 1e-4


def gaussian_score(sde, mu, s):
    """Exact score of p_t when the data is N(mu, s^2 I)."""

    def score(x, t):
        m, std = sde.marginal(mu.expand_as(x), t)
        scale = sde.marginal(torch.ones_like(x), t)[0]
        var = scale**2 * s**2 + std[:, None] ** 2
        return -(x - m) / var

    return score


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("sampler", ["euler_maruyama", "predictor_corrector", "probability_flow"])
def test_samplers_recover_a_gaussian_from_its_exact_score(name, sampler):
    sde, mu, s = SDES[name](), torch.tensor([1.0, -2.0]), 0.5
    g = torch.Generator().manual_seed(0)
    shape = (4000, 2)
    score = gaussian_score(sde, mu, s)
    if sampler == "probability_flow":
        x, calls = probability_flow(score, sde, shape, generator=g)
        assert calls > 10
    elif sampler == "euler_maruyama":
        x = euler_maruyama(score, sde, shape, steps=300, generator=g)
    else:
        x = predictor_corrector(score, sde, shape, steps=200, generator=g)
    assert x.shape == shape and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert x.mean(0).tolist() == pytest.approx(mu.tolist(), abs=0.06)
    assert x.std(0).tolist() == pytest.approx([s, s], abs=0.06)
    truth = mu + s * torch.randn(shape, generator=g)
    reference = sliced_wasserstein(mu + s * torch.randn(shape, generator=g), truth, generator=g)
    assert sliced_wasserstein(x, truth, generator=g) < 3 * reference + 0.03


def test_smld_loss_and_annealed_langevin_with_the_exact_score():
    mu, s = torch.tensor([0.5, 0.5]), 0.3
    sigmas = geometric_sigmas(3.0, 0.05, 10)  # step_lr / sigma_min^2 = 0.2: stable at every level

    def score(x, sigma):
        return -(x - mu) / (s**2 + sigma[:, None] ** 2)

    g = torch.Generator().manual_seed(0)
    x0 = mu + s * torch.randn(512, 2, generator=g)
    exact = smld_loss(score, x0, sigmas, generator=torch.Generator().manual_seed(3))
    worse = smld_loss(lambda x, sg: 0.8 * score(x, sg), x0, sigmas, generator=torch.Generator().manual_seed(3))
    assert exact < worse
    x = annealed_langevin(score, (4000, 2), sigmas, steps_per_level=100, step_lr=5e-4, generator=g)
    assert x.mean(0).tolist() == pytest.approx(mu.tolist(), abs=0.05)
    assert x.std(0).tolist() == pytest.approx([s, s], abs=0.05)


def test_sliced_wasserstein_of_a_shift():
    """A shift by d moves every 2-D projection by |d . u|: SW1 = |d| E|cos| = |d| 2 / pi."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5000, 2, generator=g)
    d = torch.tensor([3.0, 4.0])
    assert sliced_wasserstein(a, a) == 0.0
    got = sliced_wasserstein(a + d, a, projections=4000, generator=g)
    assert got == pytest.approx(5.0 * 2 / np.pi, rel=0.03)
    with pytest.raises(ValueError, match="differ in shape"):
        sliced_wasserstein(a, a[:10])


def digit_samples(digits_dir, split: str) -> list[dict]:
    """The samples of a digits shard folder, as the stream hands them to `decode`."""
    import tarfile

    samples: dict[str, dict] = {}
    for shard in sorted((digits_dir / split).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    return [samples[k] for k in sorted(samples)]


def bind_folders(wl, **folders):
    """Hand the workload its splits as the trainer does: raw samples of each shard folder, in order."""
    import functools

    from data_pipelines.stream import iter_samples, resolve_shards

    wl.bind_splits(
        {name: functools.partial(iter_samples, resolve_shards(str(folder)).urls) for name, folder in folders.items()}
    )
    return wl


def test_digits_decode_to_the_source_vectors_and_bad_input_fails_clearly(digits_dir):
    """The shards' PNGs decode to scikit-learn's binarized test digits as [-1, 1] vectors, in
    the same order, and the held-out points final_metrics measures against are exactly those."""
    import io

    from PIL import Image

    from data_pipelines.sources.digits import binarized_digits, split_indices
    from models.score.workload import ScoreConfig, ScoreWorkload

    images, _ = binarized_digits()
    expected = torch.from_numpy(images[split_indices()["test"]].reshape(-1, 64)).float() * 2 - 1
    wl = ScoreWorkload(ScoreConfig(data_kind="image", dims=64))
    decoded = torch.stack([wl.decode(s) for s in digit_samples(digits_dir, "test")])
    assert decoded.shape == (360, 64) and decoded.dtype == torch.float32
    assert set(decoded.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(decoded, expected)
    bind_folders(wl, train=digits_dir / "train", val=digits_dir / "val", test=digits_dir / "test")
    assert torch.equal(wl.held_out_points(), expected)

    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 9), np.uint8)).save(png, format="PNG")
    with pytest.raises(ValueError, match=r"image is \(8, 9\), model.dims 64 needs \(8, 8\)"):
        wl.decode({"__key__": "x", "png": png.getvalue()})
    with pytest.raises(KeyError, match="no 'png' field"):
        wl.decode({"__key__": "x", "json": b"{}"})
    with pytest.raises(ValueError, match="model.data_kind 'image' needs a square number of pixels as model.dims"):
        ScoreWorkload(ScoreConfig(data_kind="image", dims=63))
    with pytest.raises(ValueError, match="model.data_kind 'digits' is not one of points, image"):
        ScoreWorkload(ScoreConfig(data_kind="digits"))
    with pytest.raises(ValueError, match="model.eval_samples must be >= 0"):
        ScoreWorkload(ScoreConfig(eval_samples=-1))


def test_digits_final_metrics_and_sample_images_on_a_tiny_model(digits_dir):
    from models.score.workload import ScoreConfig, ScoreWorkload

    wl = ScoreWorkload(
        ScoreConfig(data_kind="image", dims=64, hidden=16, layers=1, eval_samples=50, sampler_steps=30)
    )  # at 10 steps an untrained corrector overflows
    bind_folders(wl, train=digits_dir / "train", test=digits_dir / "test")
    torch.manual_seed(0)
    model = wl.build_model().eval()
    final = wl.final_metrics(model, torch.Generator().manual_seed(0))
    assert set(final) == {"swd_reference", "swd_euler_maruyama", "swd_predictor_corrector", "swd_probability_flow"}
    assert all(math.isfinite(v) and v > 0 for v in final.values())
    assert final == wl.final_metrics(model, torch.Generator().manual_seed(0))
    assert final["swd_reference"] < 0.5  # two halves of the true digits are close; noise is not
    assert all(final[k] > 2 * final["swd_reference"] for k in final if k != "swd_reference")
    images = wl.sample_images(model, 6, torch.Generator().manual_seed(0))
    assert images.shape == (6, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    assert ScoreWorkload(ScoreConfig()).sample_images(model, 6, torch.Generator()) is None

    smld = ScoreWorkload(
        ScoreConfig(sde="smld", data_kind="image", dims=64, hidden=16, layers=1, eval_samples=50, langevin_steps=2)
    )
    bind_folders(smld, test=digits_dir / "test")
    assert set(smld.final_metrics(model, torch.Generator().manual_seed(0))) == {"swd_reference", "swd_langevin"}
    assert smld.sample_images(model, 3, torch.Generator().manual_seed(0)).shape == (3, 1, 8, 8)


@pytest.fixture(scope="module")
def mixture_dirs(tmp_path_factory):
    """Small mixture splits, and a test split of other points (a different seed)."""
    from data_pipelines.sources import points

    a, b = tmp_path_factory.mktemp("mixture-a"), tmp_path_factory.mktemp("mixture-b")
    points.build(a, counts={"train": (64, 0), "val": (40, 1), "test": (60, 2)})
    points.build(b, counts={"train": (64, 5), "test": (60, 6)})
    return a, b


def test_final_metrics_measure_against_the_held_out_split_and_nothing_else(mixture_dirs):
    """The reference is the run's test split (else its val split) as the workload decodes it:
    changing the train split changes nothing, changing the held-out split changes the numbers,
    and a val split stands in for a missing test split."""
    from models.score.workload import ScoreConfig, ScoreWorkload

    a, b = mixture_dirs

    def metrics(**folders):
        wl = bind_folders(ScoreWorkload(ScoreConfig(hidden=8, layers=1, sampler_steps=30)), **folders)
        torch.manual_seed(0)
        return wl.final_metrics(wl.build_model().eval(), torch.Generator().manual_seed(0))

    base = metrics(train=a / "train", val=a / "val", test=a / "test")
    assert base == metrics(train=b / "train", val=a / "val", test=a / "test")  # not the training data
    assert base == metrics(val=a / "test")  # val when there is no test split
    other = metrics(train=a / "train", val=a / "val", test=b / "test")
    assert all(other[k] != base[k] for k in base)
    assert metrics(train=a / "train", val=a / "val") != base  # val is a different held-out set

    wl = bind_folders(ScoreWorkload(ScoreConfig()), train=a / "train", val=a / "val", test=a / "test")
    held_out = wl.held_out_points()
    assert held_out.shape == (60, 2)
    truth, half_a, half_b = wl.truth_and_halves(held_out, torch.Generator().manual_seed(0))
    assert torch.equal(truth, held_out)  # eval_samples 0: all of it
    assert len(half_a) == len(half_b) == 30
    together = torch.cat([half_a, half_b])
    assert torch.equal(together[together[:, 0].argsort()], held_out[held_out[:, 0].argsort()])  # disjoint
    wl.cfg.eval_samples = 25
    truth = wl.truth_and_halves(held_out, torch.Generator().manual_seed(0))[0]
    assert truth.shape == (25, 2) and len({tuple(x) for x in truth.tolist()}) == 25  # no repeats
    wl.cfg.eval_samples = 61
    with pytest.raises(ValueError, match="model.eval_samples is 61, more than the 60 samples of the held-out"):
        wl.truth_and_halves(held_out, torch.Generator())
    with pytest.raises(ValueError, match=r"set data.test.urls or data.val.urls \(splits handed over: train\)"):
        bind_folders(ScoreWorkload(ScoreConfig()), train=a / "train").held_out_points()


def test_the_mixture_generator_lives_with_the_data_and_is_unchanged():
    """The mixture's points are what they were when the workload owned the generator (the same
    shards on every machine), and neither side imports the other's toy knowledge."""
    import ast
    import hashlib
    from pathlib import Path

    from data_pipelines.sources import points

    x = points.mixture2d(2000, torch.Generator().manual_seed(0))
    assert (
        hashlib.sha256(x.numpy().tobytes()).hexdigest()
        == "bb1b270aa2d37e99449ea64d52411204adbf91f365632945ef65095767077ae1"
    )
    root = Path(__file__).resolve().parents[1]

    def imports(path):  # every module a file imports, `from a import b` as a and a.b
        out = set()
        for node in ast.walk(ast.parse((root / path).read_text())):
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        return out

    assert not any(m.startswith("models") for m in imports("data_pipelines/sources/points.py"))
    for path in ("models/score/workload.py", "models/score/sde.py"):
        assert not any(m.startswith(("data_pipelines.sources", "trainer", "launch")) for m in imports(path)), path


def untrained_distances(data, sde_name: str, **overrides) -> dict:
    from models.score.workload import ScoreConfig, ScoreWorkload

    wl = bind_folders(ScoreWorkload(ScoreConfig(sde=sde_name, **overrides)), test=data / "test")
    torch.manual_seed(0)
    return wl.final_metrics(wl.build_model().eval(), torch.Generator().manual_seed(0))


@pytest.mark.drill
@pytest.mark.parametrize(
    "recipe", ["vp_mixture2d.yaml", "ve_mixture2d.yaml", "subvp_mixture2d.yaml", "smld_mixture2d.yaml"]
)
def test_score_recipe_trains_and_every_sampler_beats_an_untrained_model(tmp_path, cpu_env, recipe):
    """2 ranks through the trainer; each sampler's distance to the mixture ends far below an
    untrained model's and within a few times that of two true samples."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from data_pipelines.sources import points

    root = Path(__file__).resolve().parents[1]
    data = tmp_path / "mixture2d"
    points.build(data)
    fast = ["model.eval_samples=1000", "model.sampler_steps=200", "model.langevin_steps=50"]
    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "launch.train",
        "--config",
        str(root / "configs/score" / recipe),
        f"run.dir={tmp_path / 'run'}",
        f"data.train.urls={data}/train",
        f"data.val.urls={data}/val",
        f"data.test.urls={data}/test",
        "trainer.max_steps=800",
        "trainer.eval_every=0",
        "trainer.checkpoint_every=0",
        "trainer.progress_bar=false",
        *fast,
    ]
    out = subprocess.run(cmd, cwd=root, env=cpu_env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    final = json.loads((tmp_path / "run/final_metrics.json").read_text())
    swd = {k: v for k, v in final.items() if k.startswith("swd_") and k != "swd_reference"}
    assert len(swd) == (1 if "smld" in recipe else 3)
    from omegaconf import OmegaConf

    model_cfg = OmegaConf.to_container(OmegaConf.load(tmp_path / "run/config.yaml").model)
    model_cfg.pop("name")
    untrained = untrained_distances(data, **{"sde_name": model_cfg.pop("sde"), **model_cfg})
    for key, value in swd.items():
        assert value < 0.3 * untrained[key], (key, value, untrained[key])
        assert value < 8 * final["swd_reference"], (key, value, final["swd_reference"])


@pytest.mark.drill
def test_score_digits_recipe_trains_and_the_samplers_beat_an_untrained_model(tmp_path, cpu_env, digits_dir):
    """vp_digits.yaml, shortened, on 2 ranks: PF-ODE and Euler-Maruyama draw digits whose
    distance to the test split is far below an untrained model's and within a few times that
    between two halves of the test split."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[1]
    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "launch.train",
        "--config",
        str(root / "configs/score/vp_digits.yaml"),
        f"run.dir={tmp_path / 'run'}",
        f"data.train.urls={digits_dir}/train",
        f"data.val.urls={digits_dir}/val",
        f"data.test.urls={digits_dir}/test",
        "trainer.max_steps=1500",
        "trainer.eval_every=0",
        "trainer.checkpoint_every=0",
        "trainer.sample_every=0",
        "trainer.num_samples=16",
        "trainer.progress_bar=false",
        "model.sampler_steps=200",
    ]
    out = subprocess.run(cmd, cwd=root, env=cpu_env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    final = json.loads((tmp_path / "run/final_metrics.json").read_text())
    model_cfg = OmegaConf.to_container(OmegaConf.load(tmp_path / "run/config.yaml").model)
    model_cfg.pop("name")
    untrained = untrained_distances(digits_dir, **{"sde_name": model_cfg.pop("sde"), **model_cfg})
    assert set(final) >= set(untrained)
    for key in ("swd_probability_flow", "swd_euler_maruyama"):
        assert final[key] < 0.05 * untrained[key], (key, final[key], untrained[key])
        assert final[key] < 5 * final["swd_reference"], (key, final[key], final["swd_reference"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run/tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "samples" in events.Tags()["images"]  # the end-of-run grid of digits

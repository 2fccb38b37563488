import math

import pytest
import torch

from models.autoregressive.nets import FVSBN, MADE, NADE, Factorized, bernoulli_nll
from models.registry import build_workload, names


def test_factorized_nll_is_exact():
    """With known p, -log p(x) = -sum_i [x_i log p_i + (1 - x_i) log(1 - p_i)]."""
    p = torch.tensor([0.1, 0.5, 0.8, 0.999])
    net = Factorized(4)
    with torch.no_grad():
        net.bias.copy_(torch.log(p) - torch.log1p(-p))
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    expected = [
        -(math.log(0.1) + math.log(0.5) + math.log(0.8) + math.log(0.999)),
        -(math.log(0.9) + math.log(0.5) + math.log(0.2) + math.log(0.001)),
    ]
    got = bernoulli_nll(net(x), x)
    assert torch.allclose(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5)


def _nets(d=10):
    torch.manual_seed(0)
    nets = [FVSBN(d), NADE(d, 7), MADE(d, [23, 17], mask_seed=1), MADE(d, [19], direct=True)]
    for net in nets:  # random weights, so that every connection matters
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.5)
    return nets


@pytest.mark.parametrize("net", _nets(), ids=lambda n: type(n).__name__)
def test_autoregressive_property(net):
    """Logit i depends on x_<i only: flipping x_j changes no logit i <= j."""
    d = net.dims
    x = torch.bernoulli(torch.full((3, d), 0.5), generator=torch.Generator().manual_seed(1))
    base = net(x)
    for j in range(d):
        x2 = x.clone()
        x2[:, j] = 1 - x2[:, j]
        changed = (net(x2) - base).abs().amax(0) > 1e-6
        assert not changed[: j + 1].any(), f"logit <= {j} sees x_{j}"
        if j < d - 1:
            assert changed[j + 1 :].any(), f"x_{j} influences nothing after it"


@pytest.mark.parametrize("net", _nets(d=5), ids=lambda n: type(n).__name__)
def test_likelihood_normalizes(net):
    """Summing p(x) over all 2^D binary vectors gives 1: the NLL is an exact likelihood."""
    d = net.dims
    xs = torch.tensor([[(k >> i) & 1 for i in range(d)] for k in range(2**d)], dtype=torch.float32)
    total = torch.exp(-bernoulli_nll(net(xs), xs).double()).sum()
    assert abs(total.item() - 1) < 1e-5


def test_sampling_shapes_and_values():
    net = _nets(d=6)[2]
    x = net.sample(11, torch.Generator().manual_seed(0))
    assert x.shape == (11, 6) and set(x.unique().tolist()) <= {0.0, 1.0}


def test_registry_knows_the_smoke_models():
    assert {"factorized", "fvsbn", "nade", "made"} <= set(names())
    from models.autoregressive import MADEConfig

    wl = build_workload(MADEConfig(hidden=[8]))
    assert wl.build_model()(torch.zeros(2, 64)).shape == (2, 64)

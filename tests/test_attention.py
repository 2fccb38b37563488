import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models.lm.layers import (
    ATTENTION_KINDS,
    FlashBlock,
    Rotary,
    attention_flops_per_token,
    linear_attention,
    make_block,
    mixed_chunk_attention,
    naive_causal_linear_attention,
)

DIM, HEADS, QK_DIM, CHUNK = 32, 4, 16, 8


def block(kind, causal, dtype=torch.float64, chunk_size=CHUNK, seed=0):
    """A small block in eval mode; FLASH's gamma is widened from the paper's 0.02 init so that
    attention carries enough signal for "does change" checks to mean something."""
    torch.manual_seed(seed)
    b = make_block(kind, dim=DIM, heads=HEADS, causal=causal, chunk_size=chunk_size, qk_dim=QK_DIM)
    if isinstance(b, FlashBlock):
        with torch.no_grad():
            b.qk.gamma.normal_()
            b.qk.beta.normal_(std=0.1)
    return b.to(dtype).eval()


def test_rotary_scores_depend_on_relative_position_only():
    torch.manual_seed(0)
    rotary = Rotary(8)
    q, k = torch.randn(2, 1, 8, dtype=torch.float64).unbind(0)

    def score(m, n):
        return (rotary(q, offset=m) * rotary(k, offset=n)).sum().item()

    assert math.isclose(score(3, 1), score(40, 38), rel_tol=1e-9)
    assert not math.isclose(score(3, 1), score(3, 2), rel_tol=1e-3)
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    torch.testing.assert_close(rotary(x)[:, 4:], rotary(x[:, 4:], offset=4), rtol=0, atol=1e-12)


def phi(x):
    return torch.nn.functional.elu(x) + 1


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
@pytest.mark.parametrize("n", [1, 13, 64, 100])
def test_chunked_causal_linear_attention_matches_naive(n, chunk_size):
    torch.manual_seed(n * 100 + chunk_size)
    q, k, v = torch.randn(3, 2, 3, n, 8, dtype=torch.float64).unbind(0)
    got = linear_attention(q, k, v, causal=True, chunk_size=chunk_size)
    torch.testing.assert_close(got, naive_causal_linear_attention(q, k, v), rtol=1e-10, atol=1e-10)


def test_bidirectional_linear_attention_matches_formula():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 37, 8, dtype=torch.float64).unbind(0)
    S = torch.einsum("bhjd,bhje->bhde", phi(k), v)
    z = phi(k).sum(-2)
    want = torch.einsum("bhid,bhde->bhie", phi(q), S) / (torch.einsum("bhid,bhd->bhi", phi(q), z)[..., None] + 1e-6)
    torch.testing.assert_close(linear_attention(q, k, v, causal=False), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_linear_block_step_matches_parallel_forward(dtype, tol):
    b = block("linear", causal=True, dtype=dtype, chunk_size=5)
    x = torch.randn(2, 13, DIM, dtype=dtype)
    with torch.no_grad():
        want = b(x)
        state = b.init_state(2, device=x.device, dtype=dtype)
        steps = []
        for t in range(x.shape[1]):
            y, state = b.step(x[:, t], state)
            steps.append(y)
    assert state["pos"] == 13
    torch.testing.assert_close(torch.stack(steps, 1), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("t", [11, 8], ids=["inside-chunk", "chunk-boundary"])
@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_causal_blocks_do_not_see_the_future(kind, t):
    b = block(kind, causal=True)
    x = torch.randn(2, 24, DIM, dtype=torch.float64)
    x2 = x.clone()
    x2[:, t] += torch.randn(2, DIM, dtype=torch.float64)
    with torch.no_grad():
        y, y2 = b(x), b(x2)
    torch.testing.assert_close(y2[:, :t], y[:, :t], rtol=0, atol=1e-12)
    change = (y2 - y).abs().amax(dim=(0, 2))
    # t itself, later positions in its chunk, and those in the next chunk all see the change.
    assert change[t] > 1e-3 and change[t + 1 : 16].max() > 1e-6 and change[16:].max() > 1e-6, change


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_causal_prefix_outputs_ignore_appended_tokens(kind):
    """20 tokens pad the last chunk of 8; the same prefix with 7 real tokens after it must give
    the same outputs, so padding (and its masking) changes nothing."""
    b = block(kind, causal=True)
    x = torch.randn(2, 27, DIM, dtype=torch.float64)
    with torch.no_grad():
        short, full = b(x[:, :20]), b(x)
    assert torch.isfinite(short).all()
    torch.testing.assert_close(short, full[:, :20], rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_mixed_chunk_attention_matches_explicit_sums(causal):
    torch.manual_seed(1)
    n, C, s, e = 10, 4, 3, 5  # three chunks, the last one padded
    qq, qk, lq, lk = torch.randn(4, 2, n, s, dtype=torch.float64).unbind(0)
    v = torch.randn(2, n, e, dtype=torch.float64)
    want = torch.zeros(2, n, e, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            same, earlier = i // C == j // C, j // C < i // C
            if same and (j <= i or not causal):
                w = torch.relu((qq[:, i] * qk[:, j]).sum(-1) / C) ** 2
                want[:, i] += w[:, None] * v[:, j]
            if earlier or not causal:
                want[:, i] += ((lq[:, i] * lk[:, j]).sum(-1) / C)[:, None] * v[:, j]
    got = mixed_chunk_attention(qq, qk, lq, lk, v, causal=causal, chunk_size=C)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_flash_bidirectional_batch_equivariance_and_gradients():
    b = block("flash", causal=False)
    x = torch.randn(3, 20, DIM, dtype=torch.float64)
    perm = torch.tensor([2, 0, 1])
    y = b(x)
    torch.testing.assert_close(b(x[perm]), y[perm], rtol=1e-12, atol=1e-12)
    y.square().sum().backward()
    for name, p in b.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_blocks_train_under_bf16_autocast(kind, causal):
    torch.manual_seed(0)
    b = make_block(kind, dim=DIM, heads=HEADS, causal=causal, chunk_size=CHUNK, qk_dim=QK_DIM)
    x = torch.randn(2, 20, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = b(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.float().square().mean().backward()
    for name, p in b.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_rotary_cache_is_not_saved():
    b = block("softmax", causal=True)
    b(torch.randn(1, 5, DIM, dtype=torch.float64))
    assert not any("rotary" in key for key in b.state_dict())


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_flops_formula_matches_counted_matmuls(kind):
    """Bidirectional, so masked quadratic terms are neither halved in the formula nor skipped by
    the kernels; N a multiple of the chunk so no padding is computed."""
    n = 32
    b = block(kind, causal=False, dtype=torch.float32)
    # The math backend, because the counter does not see inside CPU's fused SDPA kernel.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        b(torch.randn(1, n, DIM))
    want = attention_flops_per_token(
        kind, dim=DIM, heads=HEADS, tokens=n, chunk_size=CHUNK, expansion=2, qk_dim=QK_DIM, mlp_ratio=4, causal=False
    )
    assert math.isclose(counter.get_total_flops() / n, want, rel_tol=1e-9)


def test_make_block_rejects_unknown_kind():
    with pytest.raises(ValueError, match="'performer'"):
        make_block("performer", dim=DIM, heads=HEADS, causal=True)

"""The demo's QAT simulations (docs/v4-spec.md §3.4, §3.5), used when the reference runs with sims=True."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from corruptcheck.reference.quant import fp4_sim, fp8_sim, hadamard_matrix, rotate


def test_fp4_grid_and_scale():
    x = torch.tensor([[0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0] * 4])
    assert torch.equal(fp4_sim(x), x)  # amax 6 -> scale 1: grid values are exact
    y = torch.tensor([[0.2, 0.26, 1.24, 1.26, 2.4, 2.6, 5.1, 12.0] + [0.0] * 24])
    # amax 12 -> scale 2: y/2 = .1 .13 .62 .63 1.2 1.3 2.55 6 -> 0 .0 .5 .5 1 1.5 3 6 (x2)
    assert fp4_sim(y)[0, :8].tolist() == [0.0, 0.0, 1.0, 1.0, 2.0, 3.0, 6.0, 12.0]


def test_fp8_sim_is_e4m3_with_pow2_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 448, generator=g)
    y = fp8_sim(x, 64)
    xb, yb = x.view(16, 7, 64), y.view(16, 7, 64)
    scale = torch.exp2(torch.ceil(torch.log2(xb.abs().amax(-1, keepdim=True) / 448)))
    assert torch.equal(yb, (xb / scale).to(torch.float8_e4m3fn).float() * scale)
    rel = ((y - x).norm() / x.norm()).item()
    assert 1e-3 < rel < 5e-2


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([4, 8, 32, 128]), st.integers(0, 2**31 - 1))
def test_hadamard_is_orthogonal_and_sylvester(n, seed):
    h = hadamard_matrix(n)
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=h.dtype))
    assert torch.equal(h[1], torch.tensor([1.0, -1.0] * (n // 2), dtype=h.dtype))  # natural order
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert torch.allclose(rotate(rotate(x)), x, atol=1e-12)  # H/sqrt(n) is an involution
    assert torch.allclose(rotate(x).norm(dim=-1), x.norm(dim=-1), rtol=1e-12)

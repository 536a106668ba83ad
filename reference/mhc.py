"""Manifold-constrained hyper-connections (docs/v4-spec.md §4). Everything here runs in the `acc` dtype."""
from __future__ import annotations

import torch


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """docs/v4-spec.md §4.3: row softmax + eps, column normalise, then (iters-1) x (row, column), with eps
    in every denominator. `logits[..., j, k]`; returns M with columns summing to ~1."""
    m = torch.softmax(logits, dim=-1) + eps
    m = m / (m.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
    return m


def _mix_logits(x: torch.Tensor, fn: torch.Tensor, norm_eps: float, acc: torch.dtype, lanes: int = 0) -> torch.Tensor:
    # mu = (fn @ flat(X)) * rsqrt(mean(flat(X)^2) + eps): an unweighted RMS over all n*D channels
    xf = x.to(acc).flatten(-2)
    rho = torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)
    w = fn.to(acc)
    k = xf.shape[-1]
    if not lanes or k % lanes:
        return (xf @ w.T) * rho
    # `lanes` (an honest variant, Policy.hc_mix_lanes): normalize first, then each of the
    # (2+n)n dot products of length n*D summed in `lanes` accumulators, each adding every
    # lanes-th product in order, then the lanes pairwise, as ggml's F32 mul_mat kernels do
    # (llama.cpp; docs/engines.md): a long sequential reduction a blocked sgemm does not make
    xr = (xf * rho).reshape(*xf.shape[:-1], 1, k // lanes, lanes)
    wr = w.reshape(w.shape[0], k // lanes, lanes)
    sums = torch.zeros(*xf.shape[:-1], w.shape[0], lanes, dtype=acc)
    for i in range(k // lanes):
        sums = sums + xr[..., i, :] * wr[:, i, :]
    while sums.shape[-1] > 1:
        sums = sums[..., 0::2] + sums[..., 1::2] if sums.shape[-1] % 2 == 0 else sums.sum(-1, keepdim=True)
    return sums[..., 0]


def hc_coefficients(x, fn, scale, base, *, n: int, iters: int, hc_eps: float, norm_eps: float, acc, lanes: int = 0):
    """x [S, n, D] -> pre [S, n], post [S, n], M [S, n, n]  (rows 0..n-1 pre, n..2n-1 post,
    then comb in row-major (j, k) order)."""
    mu = _mix_logits(x, fn, norm_eps, acc, lanes)
    scale, base = scale.to(acc), base.to(acc)
    pre = torch.sigmoid(mu[..., :n] * scale[0] + base[:n]) + hc_eps
    post = 2 * torch.sigmoid(mu[..., n:2 * n] * scale[1] + base[n:2 * n])
    comb = (mu[..., 2 * n:] * scale[2] + base[2 * n:]).reshape(*mu.shape[:-1], n, n)
    return pre, post, sinkhorn(comb, iters, hc_eps)


def collapse(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """u = sum_j w_j X_j in acc, cast to the stream dtype."""
    return (weights[..., None] * x.to(weights.dtype)).sum(-2).to(x.dtype)


def hc_pre(x, fn, scale, base, *, n: int, iters: int, hc_eps: float, norm_eps: float, acc, lanes: int = 0):
    """mHC pre (docs/v4-spec.md §4.2-4.4): streams x [S, n, D] -> (sublayer input u [S, D], post [S, n],
    comb M [S, n, n]); u collapses the streams with the pre weights."""
    pre, post, comb = hc_coefficients(x, fn, scale, base, n=n, iters=iters, hc_eps=hc_eps, norm_eps=norm_eps, acc=acc,
                                      lanes=lanes)
    return collapse(x, pre), post, comb


def hc_post(f: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """mHC post: X'_k = post_k F + sum_j M[j, k] X_j (output stream k gathers column k, docs/v4-spec.md
    §4.4), in post's dtype, cast to F's. f [S, D], x [S, n, D] -> [S, n, D]."""
    acc = post.dtype
    y = post[..., None] * f.to(acc)[..., None, :] + torch.einsum("sjk,sjd->skd", comb, x.to(acc))
    return y.to(f.dtype)


def hc_head_weights(x, fn, scale, base, *, hc_eps: float, norm_eps: float, acc, lanes: int = 0) -> torch.Tensor:
    """Final contraction weights (docs/v4-spec.md §4.5): sigmoid(mu * s + b) + eps, no Sinkhorn."""
    mu = _mix_logits(x, fn, norm_eps, acc, lanes)
    return torch.sigmoid(mu * scale.to(acc)[0] + base.to(acc)) + hc_eps

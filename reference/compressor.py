"""KV compressors of CSA (m=4, overlapping) and HCA (m=case value, disjoint), docs/v4-spec.md §5.5.

The full-sequence form (`compress`) is the definition; `IncrementalCompressor` reproduces it
for arbitrary chunking (prefill + decode) and exists to prove that the definition does not
depend on how the sequence was fed (docs/v4-spec.md §12.3).
"""
from __future__ import annotations

import torch

from .precision import Precision
from .primitives import apply_rope, gemm, rms_norm, rope_angles
from .quant import fp4_sim, fp8_sim, rotate


def project(x, wkv, wgate, ape, positions, prec: Precision):
    """A = x Wkv^T, Z = x Wgate^T + ape[pos mod m], placed by `policy.compressor` (the demo:
    both in fp32 = acc); Z ends in acc with the fp32 ape. x [S, D] -> A, Z [S, c*dc]."""
    place = prec.policy.compressor
    a = gemm(x, wkv, place)
    z = gemm(x, wgate, place).to(prec.acc) + ape.to(prec.acc)[positions % ape.shape[0]]
    return a, z


def pool(a, z, overlap: bool, prev_a=None, prev_z=None):
    """Per-channel softmax pooling over the tokens of each block (docs/v4-spec.md §5.5).

    a, z: [n, m, c*dc] (c = 2 with overlap). With overlap, entry i pools the previous block's
    "a" half (first dc channels) and block i's "b" half (last dc channels); the previous half
    of entry 0 comes from `prev_a/prev_z` or is value 0 / logit -inf (weight exactly 0).
    """
    if overlap:
        dc = a.shape[-1] // 2
        m = a.shape[1]
        if prev_a is None:
            prev_a = a.new_zeros(m, dc)
            prev_z = z.new_full((m, dc), float("-inf"))
        a_prev = torch.cat([prev_a[None], a[:-1, :, :dc]], 0)
        z_prev = torch.cat([prev_z[None], z[:-1, :, :dc]], 0)
        a = torch.cat([a_prev, a[:, :, dc:]], 1)  # [n, 2m, dc]
        z = torch.cat([z_prev, z[:, :, dc:]], 1)
    # softmax in acc; the weighted sum runs in A's dtype (acc in the demo)
    return (a * torch.softmax(z, dim=1).to(a.dtype)).sum(1)


def finish(pooled, first_block: int, ratio: int, norm_w, freqs, rope_dim: int, prec: Precision,
           eps: float, sims: str | None = None):
    """Cast to the activation dtype, weighted RMSNorm, RoPE at the block start i*m, then the
    demo's QAT sim: 'fp8' (main compressor, nope dims, block 64) or 'fp4' (indexer: Hadamard,
    FP4 in blocks of 32 over all dims); or an FP8 serving engine's indexer cache, 'fp8-index'
    (all dims in e4m3, one scale per key)."""
    e = rms_norm(pooled.to(prec.act), norm_w, eps, prec.acc)
    pos = (torch.arange(pooled.shape[0]) + first_block) * ratio
    e = apply_rope(e, rope_angles(pos, freqs, prec.policy.rope_iterated), rope_dim, acc=prec.acc, trig=prec.policy.rope_table)
    if sims == "fp8":
        e = torch.cat([fp8_sim(e[..., :-rope_dim], 64), e[..., -rope_dim:]], -1)
    elif sims == "fp4":
        e = fp4_sim(rotate(e), 32)
    elif sims == "fp8-index":
        e = fp8_sim(e, e.shape[-1])
    return e


def compress(x, p: dict, *, ratio: int, overlap: bool, norm_eps: float, freqs, rope_dim: int,
             prec: Precision, sims: str | None = None) -> torch.Tensor:
    """Full-sequence compressed entries [floor(S/m), dc] of x [S, D] (positions 0..S-1)."""
    s = x.shape[0]
    n = s // ratio
    dc = p["norm.weight"].shape[0]
    if n == 0:
        return x.new_zeros(0, dc)
    a, z = project(x[: n * ratio], p["wkv.weight"], p["wgate.weight"], p["ape"], torch.arange(n * ratio), prec)
    pooled = pool(a.reshape(n, ratio, -1), z.reshape(n, ratio, -1), overlap)
    return finish(pooled, 0, ratio, p["norm.weight"], freqs, rope_dim, prec, norm_eps, sims)


class IncrementalCompressor:
    """Chunked/decode form of `compress`: feed tokens in any chunk sizes, get the entries that
    close. Keeps the window-unaligned tail and the last closed block's "a" half (docs/v4-spec.md §5.5)."""

    def __init__(self, p: dict, *, ratio: int, overlap: bool, norm_eps: float, freqs, rope_dim: int,
                 prec: Precision, sims: str | None = None):
        self.p, self.ratio, self.overlap = p, ratio, overlap
        self.kw = dict(norm_eps=norm_eps, freqs=freqs, rope_dim=rope_dim, prec=prec, sims=sims)
        self.pos = 0
        self.entries = 0
        self.tail_a = self.tail_z = None
        self.prev_a = self.prev_z = None

    def feed(self, x: torch.Tensor) -> torch.Tensor:
        prec = self.kw["prec"]
        positions = torch.arange(self.pos, self.pos + x.shape[0])
        self.pos += x.shape[0]
        a, z = project(x, self.p["wkv.weight"], self.p["wgate.weight"], self.p["ape"], positions, prec)
        if self.tail_a is not None:
            a, z = torch.cat([self.tail_a, a]), torch.cat([self.tail_z, z])
        n = a.shape[0] // self.ratio
        self.tail_a, self.tail_z = a[n * self.ratio:], z[n * self.ratio:]
        dc = self.p["norm.weight"].shape[0]
        if n == 0:
            return x.new_zeros(0, dc).to(prec.act)
        a = a[: n * self.ratio].reshape(n, self.ratio, -1)
        z = z[: n * self.ratio].reshape(n, self.ratio, -1)
        pooled = pool(a, z, self.overlap, self.prev_a, self.prev_z)
        if self.overlap:
            self.prev_a, self.prev_z = a[-1, :, :dc], z[-1, :, :dc]
        out = finish(pooled, self.entries, self.ratio, self.p["norm.weight"], self.kw["freqs"],
                     self.kw["rope_dim"], prec, self.kw["norm_eps"], self.kw["sims"])
        self.entries += n
        return out

"""Faults in the manifold hyper-connections (mHC) and the block-input norm fused into mHC pre:
a kernel compiled for one width (A1), a norm over half the lanes (A7), a short Sinkhorn (A5), a
transposed mixing matrix (A3). The mechanism is in `corruptcheck.faults.base`."""
from __future__ import annotations

import torch

from corruptcheck.engines.patching import lerp, mapped, under
from corruptcheck.faults.base import Fault, hf_module
from corruptcheck.points import block
from corruptcheck.reference import mhc as r_mhc
from corruptcheck.reference import model as r_model


class MhcPreHiddenGuard(Fault):
    """V4-01 (class A1, static shape guard): TensorRT-LLM#13611 removed the runtime check
    `hidden_size == FHC_HIDDEN` of the fused mHC kernel, whose SHAPE_K, TMA descriptors and MMA
    instances were compiled for hidden 4096 only; V4-Pro (7168) then ran without error and
    corrupted hidden states (fixed by #13710).

    Re-enacted as the catalog's variant A: the mHC pre coefficient GEMM (`fn` times the
    flattened streams) and its RMS square-sum cover only the first 4096 channels of each of the
    hc_mult streams, as a kernel compiled for 4096 reads them. Strikes the mHC pre outputs of
    the first layer: `layers.0.attn_hc.post` (then `.comb` and `.collapsed`, same kernel).
    Trigger: hidden_size > 4096 (the compiled width); V4-Flash (4096) is unaffected, and any
    wider model (5120, 6144, 7168) is hit.
    """
    name = "mhc-pre-hidden-guard"
    catalog = "V4-01"
    klass = "A1"
    summary = "mHC pre GEMM + RMS square-sum reduce over 4096 of hidden channels per stream"
    trigger = "hidden_size > 4096 (kernel compiled for 4096)"
    points = ("attn_hc.post", "attn_hc.comb", "attn_hc.collapsed")
    knob = "mHC pre's outputs blended: clean + m·(4096-channel kernel − clean)"
    compiled_hidden = 4096

    def triggered(self, cfg, seq_lens, engine):
        return cfg.hidden_size > self.compiled_hidden

    def hf(self, p, state, cfg):
        k = self.compiled_hidden

        def install(p2, self_hc, hidden_streams):
            d = hidden_streams.shape[-1]
            if d <= k:
                return
            n, eps = self_hc.hc_mult, self_hc.input_norm.eps

            def input_norm(flat):  # [B, S, n*D] -> only the first k channels of each stream
                x = flat.view(*flat.shape[:-1], n, d)
                head = x[..., :k]
                rho = torch.rsqrt(head.float().square().mean((-1, -2), keepdim=True) + eps).to(x.dtype)
                return torch.cat([head * rho, torch.zeros_like(x[..., k:])], -1).reshape(flat.shape)
            state.hit()
            p2.set(self_hc.input_norm, "forward", input_norm)
        p.blend(hf_module().DeepseekV4HyperConnection, "forward", self.magnitude, under(install))

    def reference(self, p, state, cfg):
        k = self.compiled_hidden

        def narrow(x, fn, scale, base, **kw):
            d = x.shape[-1]
            if d <= k:
                return (x, fn, scale, base), kw
            n = x.shape[-2]
            state.hit()
            fn_k = fn.view(fn.shape[0], n, d)[..., :k].reshape(fn.shape[0], n * k)
            return (x[..., :k], fn_k, scale, base), kw
        p.blend(r_mhc, "hc_coefficients", self.magnitude, mapped(narrow))


class MhcNormSqrt2(Fault):
    """V4-04 (class A7, hardware width): vLLM ROCm's TileLang mHC pre kernel split a 64-lane
    wavefront with a warp-specialized `tid < 32` branch, so the fused RMSNorm's sum of squares
    covered half the lanes: every layer input came out sqrt(2) too large (measured 1.41443;
    GSM8K 91.1% -> 23.7%; vllm-project/vllm#56342).

    Re-enacted in the block-input RMSNorm fused into mHC pre (attn_norm and ffn_norm of every
    layer): the mean of squares sums the first half of the channels but divides by the full
    count. Strikes `layers.0.attn_norm`. Trigger: always (any width).
    """
    name = "mhc-norm-sqrt2"
    catalog = "V4-04"
    klass = "A7"
    summary = "block-input RMSNorm sums squares over half the lanes, divides by all: x sqrt(2)"
    points = ("attn_norm",)
    knob = "the norm's scale error times m: output clean + m·(half-lane − clean)"

    @staticmethod
    def _half_lane_rsqrt(xf, eps):
        d = xf.shape[-1]
        return torch.rsqrt(xf[..., : d // 2].square().sum(-1, keepdim=True) / d + eps)

    def hf(self, p, state, cfg):
        fault, m = self, self.magnitude

        def norm_forward(mod):
            def forward(hidden_states):
                state.hit()
                xf = hidden_states.to(torch.float32)
                xf = xf * fault._half_lane_rsqrt(xf, mod.variance_epsilon)
                out = (mod.weight * xf).to(hidden_states.dtype)
                return out if m == 1 else lerp(type(mod).forward(mod, hidden_states), out, m)
            return forward

        def install(p2, self_l, *args, **kwargs):
            p2.set(self_l.input_layernorm, "forward", norm_forward(self_l.input_layernorm))
            p2.set(self_l.post_attention_layernorm, "forward", norm_forward(self_l.post_attention_layernorm))
        p.during(hf_module().DeepseekV4DecoderLayer, "forward", install)

    def reference(self, p, state, cfg):
        m = self.magnitude

        def half_lane(orig):
            def rms_norm(x, weight, eps, acc):
                state.hit()
                xf = x.to(acc)
                xf = xf * self._half_lane_rsqrt(xf, eps)
                out = (weight.to(acc) * xf).to(x.dtype)
                return out if m == 1 else lerp(orig(x, weight, eps, acc), out, m)
            return rms_norm

        def install(p2, *args, **kwargs):  # inside the sub-layer functions, model.rms_norm is the block-input norm
            p2.wrap(r_model, "rms_norm", half_lane)
        p.during(r_model, "attention_sublayer", install)
        p.during(r_model, "ffn_sublayer", install)


class SinkhornShort(Fault):
    """V4-20 (class A5, precision / schedule): Sinkhorn implementations disagree on the
    iteration count and eps placement (NVIDIA/Megatron-LM#5106, AI-Hypercomputer/maxtext#4337
    adjusted the loop count to reach logit parity; mlx-lm#1189's Metal kernel).

    Re-enacted: the mHC comb projection runs 19 instead of 20 Sinkhorn iterations. Strikes
    `layers.0.attn_hc.comb`. Trigger: always.
    """
    name = "sinkhorn-19-iters"
    catalog = "V4-20"
    klass = "A5"
    summary = "mHC Sinkhorn runs 19 instead of 20 iterations"
    points = ("attn_hc.comb",)
    knob = "the Sinkhorn matrix blended: 20 iterations + m·(19 iterations − 20)"

    def triggered(self, cfg, seq_lens, engine):
        return cfg.hc_sinkhorn_iters > 1

    def hf(self, p, state, cfg):
        def install(p2, self_hc, hidden_streams):
            state.hit()
            p2.set(self_hc, "hc_sinkhorn_iters", self_hc.hc_sinkhorn_iters - 1)
        p.blend(hf_module().DeepseekV4HyperConnection, "forward", self.magnitude, under(install))

    def reference(self, p, state, cfg):
        def one_fewer(logits, iters, eps):
            state.hit()
            return (logits, iters - 1, eps), {}
        p.blend(r_mhc, "sinkhorn", self.magnitude, mapped(one_fewer))


class MhcCombTransposed(Fault):
    """Catalog class A3's "transposed mixing matrix" (docs/v4-spec.md §10.8): the mHC post
    mix must gather column k of the Sinkhorn matrix for output stream k (X'_k = post_k F +
    sum_j M[j,k] X_j); M is doubly stochastic but not symmetric, so consuming it by rows is
    silently wrong (transformers documents the orientation for this reason).

    Re-enacted: the mHC post mixes with M^T (rows). Strikes the first mHC post whose input
    streams differ: layer 0's attention post (`layers.0.ffn_hc.in`) sees four identical copies
    of the embedding, where rows and columns of M both sum to ~1, so the error there is only
    Sinkhorn's residual; the FFN post (`layers.0.out`) is the first strike in full. Expected:
    `layers.0.ffn_hc.in` or, equivalently, `layers.0.out`. Trigger: always.
    """
    name = "mhc-comb-transposed"
    catalog = "§10.8"
    klass = "A3"
    summary = "mHC post mixes streams with the transposed Sinkhorn matrix"
    points = ("ffn_hc.in",)
    also = ("out",)
    knob = "the mixing matrix blended: M + m·(Mᵀ − M)"

    def _mix(self, comb):
        """The matrix the post mix is handed, where it reads M[j, k] for output stream k: M + m·(Mᵀ − M)."""
        return lerp(comb, comb.transpose(-1, -2), self.magnitude)

    def hf(self, p, state, cfg):
        M = hf_module()

        def forward(self_l, hidden_states, input_ids=None, **kwargs):  # transformers' layer, M not M^T
            state.layer = block(self_l.layer_idx)
            state.hit()
            dtype = hidden_states.dtype
            post, comb, collapsed = self_l.attn_hc(hidden_states)
            attn_output, _ = self_l.self_attn(self_l.input_layernorm(collapsed), **kwargs)
            hidden_states = post.to(dtype).unsqueeze(-1) * attn_output.unsqueeze(-2) + torch.matmul(
                self._mix(comb).transpose(-1, -2).to(dtype), hidden_states)
            post, comb, collapsed = self_l.ffn_hc(hidden_states)
            mlp_output = self_l.mlp(self_l.post_attention_layernorm(collapsed), input_ids=input_ids)
            return post.to(dtype).unsqueeze(-1) * mlp_output.unsqueeze(-2) + torch.matmul(
                self._mix(comb).transpose(-1, -2).to(dtype), hidden_states)
        p.set(M.DeepseekV4DecoderLayer, "forward", forward)

    def reference(self, p, state, cfg):
        def transpose(f, x, post, comb):
            state.hit()
            return (f, x, post, self._mix(comb)), {}
        p.map_args(r_model, "hc_post", transpose)

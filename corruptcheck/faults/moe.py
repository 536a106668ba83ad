"""Faults in the mixture of experts: the router GEMM's split-K tail (A2), the shared expert's
missing clamp (A12), routing weights from the biased scores (A9). The mechanism is in
`corruptcheck.faults.base`."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from corruptcheck.engines.patching import lerp
from corruptcheck.faults.base import Fault, hf_module
from corruptcheck.reference import model as r_model
from corruptcheck.reference import moe as r_moe


class RouterSplitKTail(Fault):
    """G-02 / V4-01's split-count constraint (class A2, tiling remainder): a split-K GEMM whose
    split count does not divide the number of K tiles drops the remainder tiles (CUTLASS#3536
    skips the K tail when floor(K/tile) is a multiple of the stage count; TensorRT-LLM#12835
    floors the tile count; V4-01 notes that with BLOCK_K = 64, hidden 7168 gives 112 tiles, so
    32 splits are invalid and the catalog's injection drops the last `112 mod splits` tiles).

    Re-enacted on the MoE router GEMM (logits = x W^T, K = hidden, a skinny GEMM engines run
    split-K): 32 splits of BLOCK_K = 64 tiles, each split takes floor(tiles / 32) tiles, the
    remaining `tiles mod 32` tiles (the last 1024 channels at 7168) never enter the sum.
    Strikes `layers.0.moe.router_logits`. Trigger: hidden/64 >= 32 and not a multiple of 32
    (5120 and 7168 fire; 4096 and 6144 do not; small widths never take the split-K path).
    """
    name = "router-split-k-tail"
    catalog = "G-02, V4-01"
    klass = "A2"
    summary = "router GEMM split 32 ways over 64-wide K tiles drops the tiles % 32 remainder"
    trigger = "hidden/64 tiles >= 32 and not a multiple of 32 (e.g. 7168: 112 tiles, 16 dropped)"
    points = ("moe.router_logits",)
    knob = "the dropped K tail restored by (1−m): its channels × (1−m) in the router GEMM"
    block_k, splits = 64, 32

    def kept(self, k: int) -> int:
        tiles = k // self.block_k
        if tiles < self.splits:
            return k
        return (tiles // self.splits) * self.splits * self.block_k

    def triggered(self, cfg, seq_lens, engine):
        return self.kept(cfg.hidden_size) < cfg.hidden_size

    def _drop(self, x, state):
        keep = self.kept(x.shape[-1])
        if keep == x.shape[-1]:
            return x
        state.hit()
        m = self.magnitude
        tail = torch.zeros_like(x[..., keep:]) if m == 1 else x[..., keep:] * (1 - m)
        return torch.cat([x[..., :keep], tail], -1)

    def hf(self, p, state, cfg):
        M = hf_module()

        def drop(self_r, hidden_states, *args, **kwargs):
            return (self_r, self._drop(hidden_states, state)) + args, kwargs
        p.map_args(M.DeepseekV4TopKRouter, "forward", drop)
        p.map_args(M.DeepseekV4HashRouter, "forward", drop)

    def reference(self, p, state, cfg):
        def drop(y, *args, **kwargs):  # y feeds only the router GEMM
            return (self._drop(y, state),) + args, kwargs
        p.map_args(r_moe, "route", drop)


class SharedExpertNoClamp(Fault):
    """V4-07 (class A12, config not propagated): SGLang's shared-expert / dense MLP path used a
    generic MLP that never received `swiglu_limit` and called bare SiLU-and-mul, while the
    routed experts were clamped (sgl-project/sglang#23776; VeOmni#917 found the same omission);
    symptom: deterministic spurious tokens at temperature 0.

    Re-enacted: the shared expert computes silu(gate) * up without min(gate, 10) and
    clamp(up, +-10). Strikes `layers.L.moe.out` of the first layer L whose shared expert has a
    pre-activation beyond the limit. Trigger: such a pre-activation exists (activation
    dependent; the built-in cases all clip).
    """
    name = "shared-expert-no-clamp"
    catalog = "V4-07"
    klass = "A12"
    summary = "shared expert SwiGLU runs without swiglu_limit (no clamp)"
    trigger = "a shared-expert gate/up pre-activation exceeds swiglu_limit"
    points = ("moe.out",)
    knob = "the clamped-away part restored by m: gate min(g, L) + m·(g − min(g, L)), up likewise"

    shared = True  # which experts' SwiGLU loses the clamp: the shared expert (False: the routed ones)

    def triggered(self, cfg, seq_lens, engine):
        return None if cfg.swiglu_limit > 0 else False

    def _unclamp(self, gate, up, limit):
        """gate and up as the shared expert consumes them: unclamped at m = 1, clamped at 0."""
        m = self.magnitude
        if m == 1:
            return gate, up
        return lerp(gate.clamp(max=limit), gate, m), lerp(up.clamp(min=-limit, max=limit), up, m)

    def hf(self, p, state, cfg):
        M = hf_module()

        def forward(self_m, x):  # DeepseekV4MLP is V4's shared expert
            gate, up = self_m.gate_proj(x), self_m.up_proj(x)
            state.hit(int((gate > self_m.limit).sum() + (up.abs() > self_m.limit).sum()))
            gate, up = self._unclamp(gate, up, self_m.limit)
            return self_m.down_proj(self_m.act_fn(gate) * up)
        p.set(M.DeepseekV4MLP, "forward", forward)

    def reference(self, p, state, cfg):
        def make_moe(orig):
            def moe(y, ids, params, *args, **kwargs):
                state.scratch["shared_w1"] = params["shared_experts.w1.weight"]
                try:
                    return orig(y, ids, params, *args, **kwargs)
                finally:
                    state.scratch.pop("shared_w1", None)
            return moe

        def make_swiglu(orig):
            def swiglu_hidden(y, w1, w3, limit, acc, split_k=1, round_in=None):
                if (w1 is state.scratch.get("shared_w1")) != self.shared:
                    return orig(y, w1, w3, limit, acc, split_k, round_in)
                _, hits = orig(y, w1, w3, limit, acc, split_k, round_in)
                state.hit(int(hits.sum()))
                g = r_moe.linear(y, w1, split_k, round_in).to(acc)
                u = r_moe.linear(y, w3, split_k, round_in).to(acc)
                g, u = self._unclamp(g, u, limit)
                return F.silu(g) * u, hits
            return swiglu_hidden
        p.wrap(r_model, "moe", make_moe)
        p.wrap(r_moe, "swiglu_hidden", make_swiglu)


class RoutedExpertsNoClamp(SharedExpertNoClamp):
    """The same omission on the routed experts (class A12): their SwiGLU runs without
    `swiglu_limit` while the shared expert keeps it, as vLLM 0.32.0's CPU MoE kernels do
    (docs/engines.md: the shipped engine ignores the routed experts' clamp). Reference only: a
    hypothesis of the diagnosis (judge/hypotheses.py), not a self-test fault (the vllm engine's
    rows run with it fixed, `ENGINE_OPTIONS`)."""
    name = "routed-experts-no-clamp"
    catalog = "V4-07 (routed), docs/engines.md"
    summary = "routed experts' SwiGLU runs without swiglu_limit (no clamp)"
    trigger = "a routed expert's gate/up pre-activation exceeds swiglu_limit"
    engines = ("reference",)
    shared = False


class RoutingWeightsBiased(Fault):
    """V3-01 (class A9, routing): vLLM took the gating weights from the bias-corrected scores
    (vllm-project/vllm#12002); transformers regressed the same way (#41647). The correction
    bias must only steer the selection; weights come from the un-biased scores.

    Re-enacted in the learned (non-hash) router: weights = normalised (score + bias) of the
    selected experts. Strikes `layers.L.moe.weights` of the first learned-routing layer L.
    Trigger: a learned-routing layer with a non-zero bias.
    """
    name = "routing-weights-biased"
    catalog = "V3-01"
    klass = "A9"
    summary = "routing weights gathered from the bias-corrected selection scores"
    trigger = "a learned-routing (non-hash) layer"
    points = ("moe.weights",)
    knob = "routing weights blended: clean + m·(from the biased scores − clean)"

    def triggered(self, cfg, seq_lens, engine):
        return any(not cfg.is_hash_layer(i) for i in range(cfg.num_layers)) or (
            engine == "reference" and cfg.num_mtp_layers > 0)

    def hf(self, p, state, cfg):
        m = self.magnitude

        def biased_weights(out, self_r, hidden_states):
            logits, weights, indices = out
            biased = (self_r.score_fn(logits) + self_r.e_score_correction_bias).gather(1, indices)
            state.hit()
            biased = biased / (biased.sum(-1, keepdim=True) + 1e-20)
            return logits, lerp(weights, (biased * self_r.routed_scaling_factor).to(weights.dtype), m), indices
        p.map_output(hf_module().DeepseekV4TopKRouter, "forward", biased_weights)

    def reference(self, p, state, cfg):
        def make(orig):
            def route(y, ids, params, layer, c, prec, rec):
                if c.is_hash_layer(layer):
                    return orig(y, ids, params, layer, c, prec, rec)
                seen = {}

                def rec2(name, t):
                    seen[name] = t
                    rec(name, t)
                idx, w = orig(y, ids, params, layer, c, prec, rec2)
                state.hit()
                wb = seen["selection_scores"].gather(1, idx)
                return idx, lerp(w, (wb / wb.sum(-1, keepdim=True) * c.route_scale).to(w.dtype), self.magnitude)
            return route

        def make_given(orig):  # teacher forcing on given expert ids: their weights from the biased scores too
            def given_choices(y, idx, w, given, params, layer, c, prec):
                chosen, out = orig(y, idx, w, given, params, layer, c, prec)
                if out is w:
                    return chosen, out
                scores = F.softplus(r_moe.gemm(y, params["gate.weight"], prec.policy.router)).sqrt()
                wb = (scores.to(prec.acc) + params["gate.bias"].to(prec.acc)).gather(1, chosen)
                # given_choices recomputed every row's weights (unbiased): all of them from the biased scores
                return chosen, lerp(out, (wb / wb.sum(-1, keepdim=True) * c.route_scale).to(out.dtype), self.magnitude)
            return given_choices
        p.wrap(r_moe, "route", make)
        p.wrap(r_moe, "given_choices", make_given)

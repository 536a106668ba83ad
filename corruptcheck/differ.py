"""Point-by-point comparison of an engine capture against the reference (DESIGN.md §6).

This is the first, fixed-tolerance differ: relative L2 and the norm ratio against a fixed
bound per declared precision, tie-aware set comparison for discrete choices. The JSON it feeds
is the stable schema later differs extend.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from corruptcheck.coverage import exercised
from corruptcheck.errors import BadInput
from corruptcheck.metrics import float_metrics, set_disagreements
from corruptcheck.points import PointSpec, tie_scores_name

# Fixed bounds on rel_l2 and |norm_ratio - 1|. transformers computes in fp32 inside several
# modules even in a float64 model, so float32-level agreement is the bound for both.
FIXED_TOLERANCE = {"float64": 1e-5, "float32": 1e-5, "bfloat16": 5e-2}
# A differing discrete choice is a near-tie when the reference's margin is below this
# (relative to the row's score scale): roughly the precision's rounding noise.
TIE_MARGIN = {"float64": 1e-6, "float32": 1e-5, "bfloat16": 2e-2}


@dataclass
class PointResult:
    name: str
    verdict: str  # pass | fail | missing | not-exercised | skipped
    layer: int | None
    kind: str
    metrics: dict = field(default_factory=dict)
    tolerance: dict | None = None
    reason: str = ""


@dataclass
class Comparison:
    points: list
    precision: str

    @property
    def compared(self) -> int:
        return sum(p.verdict in ("pass", "fail", "not-exercised") for p in self.points)

    @property
    def failed(self) -> list:
        return [p for p in self.points if p.verdict == "fail"]

    @property
    def missing(self) -> list:
        return [p for p in self.points if p.verdict == "missing"]

    @property
    def verdict(self) -> str:
        if self.compared == 0:
            return "error"
        return "fail" if self.failed else "pass"

    @property
    def first_divergence(self) -> dict | None:
        f = self.failed
        return {"name": f[0].name, "layer": f[0].layer} if f else None


def _layer_key(spec: PointSpec) -> str:
    return spec.name.rsplit(".", 2)[0] if spec.name.startswith("mtp.") else f"layers.{spec.layer}"


def _check_shape(name, e: torch.Tensor, r: torch.Tensor):
    if tuple(e.shape) != tuple(r.shape):
        raise BadInput(f"point {name}: engine shape {tuple(e.shape)} does not match the case's {tuple(r.shape)}")
    if e.is_floating_point() != r.is_floating_point():
        raise BadInput(f"point {name}: engine dtype {e.dtype} where the case has {r.dtype}")


def compare_points(specs: list, ref: dict, engine: dict, precision: str, coverage: dict) -> Comparison:
    tol = FIXED_TOLERANCE[precision]
    tie = TIE_MARGIN[precision]
    known = {s.name for s in specs}
    results = []
    for spec in specs:
        if spec.name not in ref:
            continue  # the case has no such point (e.g. MTP disabled)
        if spec.name not in engine:
            if spec.required:
                results.append(PointResult(spec.name, "missing", spec.layer, spec.kind,
                                           reason="engine did not capture this point"))
            else:
                results.append(PointResult(spec.name, "skipped", spec.layer, spec.kind,
                                           reason="finer point the engine does not expose"))
            continue
        e, r = engine[spec.name], ref[spec.name]
        _check_shape(spec.name, e, r)
        if spec.kind == "index":
            res = _compare_index(spec, e, r, ref, tie)
        elif spec.name.endswith("moe.weights"):
            res = _compare_weights(spec, e, r, engine, ref, tol)
        else:
            res = _compare_float(spec, e, r, tol)
        if res.verdict == "pass" and spec.layer is not None and not exercised(coverage, _layer_key(spec), spec.mechanism):
            res.verdict = "not-exercised"
            res.reason = f"the case did not exercise {spec.mechanism} here"
        results.append(res)
    unknown = sorted(set(engine) - known - set(ref))
    if unknown:
        raise BadInput(f"engine produced unknown point name(s): {', '.join(unknown[:5])}")
    return Comparison(results, precision)


def _tolerance(tol: float) -> dict:
    return {"metric": "rel_l2", "value": tol, "norm_ratio_band": tol,
            "derivation": "fixed bound for the declared precision (first differ)"}


def _compare_float(spec, e, r, tol) -> PointResult:
    m = float_metrics(e, r)
    verdict, reason = "pass", ""
    if m["nonfinite_new"]:
        verdict, reason = "fail", f"{m['nonfinite_new']} NaN/Inf values the reference does not have"
    elif not m["rel_l2"] <= tol:
        verdict, reason = "fail", f"rel_l2 {m['rel_l2']:.3g} > {tol:.3g}"
    elif not abs(m["norm_ratio"] - 1) <= tol:
        verdict, reason = "fail", f"norm ratio {m['norm_ratio']:.6g} outside 1 +/- {tol:.3g}"
    return PointResult(spec.name, verdict, spec.layer, spec.kind, _clean(m), _tolerance(tol), reason)


def _compare_index(spec, e, r, ref, tie) -> PointResult:
    scores_name = tie_scores_name(spec.name)
    scores = ref.get(scores_name) if scores_name else None
    d = set_disagreements(e, r, scores, tie)
    verdict = "fail" if d["genuine"] else "pass"
    reason = (f"{d['genuine']} token(s) choose differently beyond a near-tie (first: token {d['first_genuine_token']})"
              if d["genuine"] else (f"{d['tie_explained']} near-tie difference(s)" if d["tie_explained"] else ""))
    tolerance = {"metric": "genuine_disagreements", "value": 0, "tie_margin_rel": tie,
                 "derivation": "set comparison per token; a swap whose reference score margin is within "
                               "the tie margin is a near-tie, not an error"}
    return PointResult(spec.name, verdict, spec.layer, spec.kind, d, tolerance, reason)


def _compare_weights(spec, e, r, engine, ref, tol) -> PointResult:
    experts = spec.name[: -len("weights")] + "experts"
    if experts in engine and experts in ref:
        same = (engine[experts] == ref[experts]).all(-1)
        e, r = e[same], r[same]
    res = _compare_float(spec, e, r, tol)
    res.metrics["rows_compared"] = int(e.shape[0])
    return res


def _clean(m: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in m.items()}

"""Point-by-point comparison of an engine capture against the reference (docs/design.md §6, §7).

Float points: relative L2 and the norm ratio against tolerances derived from the noise model
(`tolerance.py`), NaN/Inf parity, the worst token. Discrete points (indexer top-k, expert ids):
per-token set comparison where a different choice is an error only beyond a near-tie. Each
point carries `ratio` = error / tolerance (> 1 fails).
"""
from __future__ import annotations

from fnmatch import fnmatch

import math
from dataclasses import dataclass, field

import torch

from corruptcheck.judge.coverage import exercised
from corruptcheck.errors import BadInput
from corruptcheck.finite import finite_values
from corruptcheck.storage.lazy_points import shape_of, source_of
from corruptcheck.judge.metrics import float_metrics, set_disagreements
from corruptcheck.judge.results import Point
from corruptcheck.points import PointSpec, agreeing_rows, experts_of, parse, tie_scores_name
from corruptcheck.reference.model import ENTRY_POINTS  # rows are compressed entries, not tokens
from corruptcheck.judge.tolerance import float_tolerance, tie_margin
from corruptcheck.verdicts import JUDGED, NOT_COMPARED, Verdict


@dataclass
class Comparison:
    """The differ's judgment of every point (localize and phases refine it in place); its points
    are the report's (results.Report.judged)."""
    points: list  # [results.Point]
    precision: str
    unknown: list = field(default_factory=list)  # engine keys that name no capture point (bad input)

    @property
    def compared(self) -> int:
        return sum(p.verdict in JUDGED for p in self.points)

    @property
    def failed(self) -> list:
        return [p for p in self.points if p.verdict == Verdict.FAIL]

    @property
    def missing(self) -> list:
        """Points not compared that should have been: missing from the engine, or `unchecked`
        (their unit of `corruptcheck check` could not run)."""
        return [p for p in self.points if p.verdict in NOT_COMPARED]

    @property
    def verdict(self) -> str:
        """error: bad input or nothing compared; fail: a point fails; incomplete: nothing fails
        but required points are missing (never a pass); else pass."""
        if self.compared == 0 or self.unknown:
            return Verdict.ERROR
        if self.failed:
            return Verdict.FAIL
        return Verdict.INCOMPLETE if self.missing else Verdict.PASS

    @property
    def first_divergence(self) -> dict | None:
        f = self.failed
        return {"name": f[0].name, "layer": f[0].layer} if f else None


def layer_key(spec: PointSpec) -> str:
    """The block ("layers.<i>" / "mtp.0") whose coverage entry decides a point's mechanism."""
    return parse(spec.name)[0]


def _entry_count_differs(name: str, e: torch.Tensor, r: torch.Tensor) -> bool:
    """Rows of compressed-entry points count closed blocks; only their width is a format."""
    return (name.rsplit(".", 1)[-1] in ENTRY_POINTS and e.dim() == r.dim() == 2 and e.shape[1] == r.shape[1]
            and e.shape[0] != r.shape[0] and e.is_floating_point() == r.is_floating_point())


def _check_shape(name, e: torch.Tensor, r: torch.Tensor):
    if tuple(e.shape) != tuple(r.shape):
        raise BadInput(f"point {name}: engine shape {tuple(e.shape)} does not match the case's {tuple(r.shape)}")
    if e.is_floating_point() != r.is_floating_point():
        raise BadInput(f"point {name}: engine dtype {e.dtype} where the case has {r.dtype}")


def compare_points(specs: list, ref: dict, engine: dict, precision: str, coverage: dict,
                   noise: dict | None = None, declared_skips: dict | None = None) -> Comparison:
    """`noise`: the noise model for `precision` ({"free": {point: ...}, ...}); without it every
    tolerance is the precision's floor. `declared_skips`: {fnmatch pattern: reason} from the
    engine, for points its tree computes but does not expose (reported skipped, not missing)."""
    free = (noise or {}).get("free", {})
    known = {s.name for s in specs}
    results = []
    for spec in specs:
        if spec.name not in ref:
            continue  # the case has no such point (e.g. MTP disabled)
        if spec.name not in engine:
            declared = next((why for pat, why in (declared_skips or {}).items() if fnmatch(spec.name, pat)), None)
            if declared:
                results.append(Point(spec.name, Verdict.SKIPPED, spec.layer, spec.kind, reason=declared))
            elif spec.required:
                results.append(Point(spec.name, Verdict.MISSING, spec.layer, spec.kind,
                                     reason="engine did not capture this point"))
            else:
                results.append(Point(spec.name, Verdict.SKIPPED, spec.layer, spec.kind,
                                     reason="finer point the engine does not expose"))
            continue
        e, r = shape_of(engine, spec.name), shape_of(ref, spec.name)  # shapes and dtypes: no data read
        if _entry_count_differs(spec.name, e, r):  # a compressor that closed other blocks: wrong, not malformed
            results.append(Point(spec.name, Verdict.FAIL, spec.layer, spec.kind, {"entries": int(e.shape[0])},
                                 reason=f"engine has {e.shape[0]} compressed entries, the reference {r.shape[0]}",
                                 ratio=math.inf))
            continue
        _check_shape(spec.name, e, r)
        res = judge_point(spec, engine, ref, precision, free, "free")
        if spec.kind != "index":
            res = _weights_without_rows(res, results)
        if (res.verdict == Verdict.PASS and spec.layer is not None
                and not exercised(coverage, layer_key(spec), spec.mechanism)):
            res.verdict = Verdict.NOT_EXERCISED
            res.reason = f"the case did not exercise {spec.mechanism} here"
        results.append(res)
    # names that are no capture point: bad input. The comparison of everything else is still
    # reported (so a renamed key shows up as its point `missing`), but the verdict is `error`.
    unknown = sorted(set(engine) - known - set(ref))
    return Comparison(results, precision, unknown)


def judge_point(spec: PointSpec, engine: dict, ref: dict, precision: str, noise: dict, scope: str) -> Point:
    """One point of `engine` against `ref` (dicts holding it): discrete choices by set
    comparison with the tie margin of their scores, float points against the `scope` ("free" or
    "local") tolerance from `noise` ({point: measured noise})."""
    if spec.kind == "index":
        scores_name = tie_scores_name(spec.name)
        return compare_index(spec, engine[spec.name], ref[spec.name], ref.get(scores_name), precision,
                             noise.get(scores_name, {}).get("score_noise") if scores_name else None)
    # float points are streamed from their files when they can be (lazy_points.RowSource)
    return compare_float(spec, source_of(engine, spec.name), source_of(ref, spec.name),
                         float_tolerance(noise.get(spec.name), precision, scope), engine, ref)


def _weights_without_rows(res: Point, earlier: list) -> Point:
    """moe.weights with no token on the reference's experts fails — unless every differing
    expert choice was a near-tie (the ids point passed): then there is honestly nothing to
    compare the weights on, which is reported, not passed (e.g. a decode step of three tokens
    whose routing sits on ties)."""
    ids = experts_of(res.name)
    if res.metrics.get("rows_compared") != 0 or ids is None:
        return res
    experts = next((p for p in earlier if p.name == ids), None)
    if experts is None or experts.verdict not in (Verdict.PASS, Verdict.NOT_EXERCISED) or not experts.metrics.get("tokens"):
        return res
    res.verdict, res.ratio = Verdict.NOT_EXERCISED, None
    res.reason = (f"no token chose the reference's experts, and every differing choice is a near-tie "
                  f"({experts.metrics.get('tie_explained')} of {experts.metrics.get('tokens')}): nothing to compare")
    return res


def _whole(x) -> torch.Tensor:
    """A point as one tensor (a row source is read whole)."""
    return x.rows(0, x.shape[0]) if hasattr(x, "rows") else x


def compare_float(spec, e, r, tol: dict, engine: dict, ref: dict) -> Point:
    """Every outcome is a verdict: a point that cannot be compared numerically (no rows, no
    value finite on both sides) fails with the reason, it never passes."""
    rows = agreeing_rows(spec.name, engine, ref)
    total_rows = r.shape[0] if len(r.shape) else 1
    if rows is not None:
        e, r = _whole(e)[rows], _whole(r)[rows]
    m = finite_values(float_metrics(e, r))
    if rows is not None:
        m["rows_compared"] = int(rows.sum())
    rel, band = tol["value"], tol["norm_ratio_band"]
    nr = m["norm_ratio"] if m["norm_ratio"] is not None else math.inf
    rl2 = m["rel_l2"] if m["rel_l2"] is not None else math.inf
    tok = m.get("worst_token_rel")
    tok_ratio = tok / tol["token_value"] if tol.get("token_value") and tok is not None and tok >= 0 else 0.0
    ratio = max(rl2 / rel, abs(nr - 1) / band, tok_ratio)
    verdict, reason = Verdict.PASS, ""
    parity = m["nonfinite_new"] + m["nonfinite_lost"] + m["nonfinite_kind"]
    if parity:
        verdict, ratio = Verdict.FAIL, math.inf
        reason = (f"NaN/Inf parity: {m['nonfinite_new']} non-finite value(s) where the reference is finite, "
                  f"{m['nonfinite_lost']} finite where it is not, {m['nonfinite_kind']} of another kind "
                  f"(first token {m['first_nonfinite_token']})")
    elif rows is not None and m["rows_compared"] == 0:
        verdict, ratio = Verdict.FAIL, math.inf
        reason = f"no token chose the reference's experts (0 of {total_rows} rows agree), nothing to compare"
    elif m["compared_values"] == 0:
        verdict, ratio = Verdict.FAIL, math.inf
        reason = ("no values to compare (empty tensor)" if not math.prod(e.shape)
                  else "no value is finite in both the engine and the reference")
    elif rl2 > rel:
        verdict, reason = Verdict.FAIL, f"rel_l2 {rl2:.3g} > tolerance {rel:.3g} (worst token {m['worst_token']})"
    elif abs(nr - 1) > band:
        verdict, reason = Verdict.FAIL, f"norm ratio {nr:.5g}: scale off by {nr - 1:+.3g}, band {band:.3g}"
    elif tok_ratio > 1:
        verdict, reason = Verdict.FAIL, (f"token {m['worst_token']}: rel error {tok:.3g} > per-token tolerance "
                                   f"{tol['token_value']:.3g}")
    return Point(spec.name, verdict, spec.layer, spec.kind, m, tol, ratio, reason)


def compare_index(spec, e, r, scores, precision: str, score_noise) -> Point:
    margin, how = tie_margin(score_noise, precision)
    d = set_disagreements(e, r, scores, margin)
    verdict = Verdict.FAIL if d["genuine"] or not d["tokens"] else Verdict.PASS
    ratio = 1.0 + d["genuine"] if d["genuine"] else (d["worst_margin_rel"] / margin if d["tokens"] else math.inf)
    oor = f", {d['out_of_range']} naming no valid choice" if d["out_of_range"] else ""
    reason = (f"{d['genuine']} token(s) choose differently beyond a near-tie{oor} (first: token {d['first_genuine_token']})"
              if d["genuine"] else (f"{d['tie_explained']} near-tie difference(s)" if d["tie_explained"] else ""))
    if not d["tokens"]:
        reason = "no tokens to compare (empty tensor)"
    tolerance = {"metric": "genuine_disagreements", "value": 0, "tie_margin_rel": margin,
                 "derivation": "set comparison per token; a swap is a near-tie when the reference's score margin "
                               "is within the tie margin = " + how}
    return Point(spec.name, verdict, spec.layer, spec.kind, d, tolerance, ratio, reason)

"""The noise model: how far an *honest* implementation at a given precision lands from the
float64 reference, at every capture point (docs/design.md §7,
docs/tolerances.md).

For each declared precision the reference itself is run several honest ways (different
rounding placements and reduction orders: `Precision.variant`) and compared with float64:

* free-running: the whole model at that precision — the drift an engine accumulates;
* local (teacher-forced): each sub-block (attention, FFN, head) fed the float64 input of that
  sub-block — the error one sub-block adds on its own, which is what localization tests.

Per point we keep the worst over the variants of: relative L2, |norm ratio - 1|, and (for the
score tensors behind discrete choices) the 99th-percentile per-token score perturbation
relative to the row's scale. Tolerances are derived from these numbers (`tolerance.py`).
"""
from __future__ import annotations

import math

import torch

from corruptcheck.cases import Case
from corruptcheck.judge.metrics import float_metrics
from corruptcheck.points import agreeing_rows, experts_of
from corruptcheck.reference import Precision, run
from corruptcheck.judge.teacher_forcing import choice_dependent, local_points, sub_blocks

NOISE_FORMAT = 2  # 2: local noise on the reference's expert choices, + local_own_choice, groups_local


def variants(precision: str) -> list[Precision]:
    base = Precision.of(precision)
    if base.act == torch.bfloat16:
        return [base, base.variant(alt_placement=True), base.variant(split_k=2)]
    # float32 and its engine-matched profiles (ggml-float32 keeps its own RoPE and mHC placement
    # in every variant): other reduction orders, as split-K and blocked GEMM kernels sum
    return [base, base.variant(split_k=2), base.variant(split_k=3)]


def _score_noise(new: torch.Tensor, ref: torch.Tensor) -> float:
    """99th percentile over tokens of max |d score| / max |score| (finite entries)."""
    fin = torch.isfinite(ref) & torch.isfinite(new)
    d = torch.where(fin, (new.double() - ref.double()).abs(), 0.0).amax(-1)
    scale = torch.where(fin, ref.double().abs(), 0.0).amax(-1).clamp_min(1e-300)
    r = d / scale
    return float(torch.quantile(r, 0.99)) if r.numel() else 0.0


def _point_noise(name: str, new: torch.Tensor, ref: torch.Tensor, new_all: dict, ref_all: dict) -> dict | None:
    if not ref.is_floating_point():
        disagree = sum(set(a.tolist()) != set(b.tolist()) for a, b in zip(new, ref))
        return {"disagree_rate": disagree / max(ref.shape[0], 1)}
    if name.endswith(("indexer_scores", "selection_scores")):
        return {"score_noise": _score_noise(new, ref)}
    if new.shape != ref.shape:
        return None
    rows = agreeing_rows(name, new_all, ref_all)
    if rows is not None:
        new, ref = new[rows], ref[rows]
    m = float_metrics(new, ref)
    return {"rel_l2": m["rel_l2"], "norm_dev": abs(m["norm_ratio"] - 1.0),
            # per-token worst cases: they bound the error of any subset of tokens (phases.py)
            "token_rel": max(m["worst_token_rel"], 0.0), "token_norm_dev": m["worst_token_norm_dev"]}


def _merge(into: dict, name: str, noise: dict | None) -> None:
    if noise is None:
        return
    cur = into.setdefault(name, {})
    for k, v in noise.items():
        v = 0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else v
        cur[k] = max(cur.get(k, 0.0), v)


def merge_point_noise(into: dict, name: str, new, ref, new_all: dict, ref_all: dict) -> None:
    """Fold one honest run's error at a point (new vs the float64 ref) into `into`'s worst case."""
    _merge(into, name, _point_noise(name, new, ref, new_all, ref_all))


def _merge_rows(into: dict, rows_of: dict, pts: dict, ref_points: dict) -> None:
    """Fold one honest run's error on a group's rows ({point: row indices}) into `into`."""
    for name, rows in rows_of.items():
        if name in pts and name in ref_points and ref_points[name].is_floating_point():
            pair = (name, experts_of(name) or name)  # moe.weights with the expert ids it is judged by
            sub = {n: pts[n][rows] for n in pair if n in pts}
            sub_ref = {n: ref_points[n][rows] for n in pair if n in ref_points}
            merge_point_noise(into, name, sub[name], sub_ref[name], sub, sub_ref)


def measure(case: Case, ref_points: dict, precision: str, groups: dict | None = None) -> dict:
    """Noise of honest `precision` implementations at every point (see module docstring).

    Local runs of an FFN sub-block run the float64 reference's own expert choices
    (`local`: what teacher forcing on an engine's own choices is judged against); where the
    choice is learned they are also measured on their own choices (`local_own_choice`: for an
    engine that does not expose its expert ids, so a near-tie it resolved the other way is
    honest). `groups` ({group: {point: row indices}}, e.g. the phases of a served run) adds the
    free and local noise measured on each group's rows alone: `result["groups"][group][point]`,
    `result["groups_local"][group][point]`."""
    free: dict = {}
    local: dict = {}
    own_choice: dict = {}
    by_group: dict = {g: {} for g in groups or {}}
    by_group_local: dict = {g: {} for g in groups or {}}
    labels = []
    for prec in variants(precision):
        labels.append(prec.label)
        pts = run(case.config, case.params(), case.sequences(), prec).points
        for name, ref in ref_points.items():
            if name in pts:
                merge_point_noise(free, name, pts[name], ref, pts, ref_points)
        for g, rows_of in (groups or {}).items():
            _merge_rows(by_group[g], rows_of, pts, ref_points)
        for part, layer, inp in sub_blocks(case.config):
            if inp not in ref_points:
                continue
            loc = local_points(case, part, layer, ref_points[inp], prec, choices=ref_points)
            for name, val in loc.items():
                if name in ref_points:
                    merge_point_noise(local, name, val, ref_points[name], loc, ref_points)
            for g, rows_of in (groups or {}).items():
                _merge_rows(by_group_local[g], {n: r for n, r in rows_of.items() if n in loc}, loc, ref_points)
            if choice_dependent(case.config, part, layer):
                own = local_points(case, part, layer, ref_points[inp], prec)
                for name, val in own.items():
                    if name in ref_points:
                        merge_point_noise(own_choice, name, val, ref_points[name], own, ref_points)
    out = {"format": NOISE_FORMAT, "precision": Precision.of(precision).name, "variants": labels,
           "free": free, "local": local, "local_own_choice": own_choice}
    if groups:
        out["groups"] = by_group
        out["groups_local"] = by_group_local
    return out

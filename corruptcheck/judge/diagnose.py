"""Diagnosis: from the culprit to the likely defect, with its evidence (docs/diagnosis.md).

For the culprit's sub-block (and, when it is unexplained, the next failing one: at most
MAX_SUB_BLOCKS), every hypothesis of the registry (judge/hypotheses.py) runs on the engine's own
captured input to it, as teacher forcing runs the reference there (localize.forced_run), with
its magnitude m fitted in [0, 1] (screened at m = 1 and 1/2, the best FITTED refined by a
golden-section search). Each is scored by its **residual ratio**: the largest error / local tolerance over the sub-block's points, engine
against the hypothesis, judged exactly as the reference is (the same honest local noise,
differ.judge_point). The reference's own ratio there is the **reference ratio**.

Ranked by residual ratio; the best *explains* the engine only when

    residual <= 1  (within the honest noise: an engine with exactly that defect lands there)
    and reference >= CLEAR x residual  (clearly better than no defect)
    and the runner-up is not within noise and >= CLEAR x residual  (clearly better than the next);

otherwise the sub-block is unexplained and the ranking says what came closest."""
from __future__ import annotations

import math

import torch

from corruptcheck.cases import Case
from corruptcheck.judge.differ import judge_point
from corruptcheck.judge.hypotheses import Hypothesis, hypotheses_for
from corruptcheck.judge.localize import forced_run, local_noise_sets
from corruptcheck.judge.results import Diagnosis
from corruptcheck.judge.teacher_forcing import sub_blocks
from corruptcheck.judge.tolerance import float_tolerance
from corruptcheck.points import MTP, block, capture_points, sub_block_of
from corruptcheck.storage.lazy_points import shape_of
from corruptcheck.verdicts import Verdict

MAX_SUB_BLOCKS = 2  # the culprit's sub-block and, when it is unexplained, the next failing one
CLEAR = 2.0  # "clearly better": by this factor in error / tolerance
SCREEN = (1.0, 0.5)  # magnitudes every applicable hypothesis is tried at
FITTED = 2  # the best screened hypotheses (if better than the reference) whose m is then fitted
FIT_STEPS = 5  # golden-section steps over m in [0, 1] (final bracket 0.09 wide; 0.07 in [1/2, 1])
_PHI = (math.sqrt(5) - 1) / 2
MAX_TOKENS_LISTED = 8


def _key(part: str, layer) -> str:
    return "head" if part == "head" and layer is None else (
        f"{MTP}.head" if part == "head" else f"{block(layer)}.{part}")


def failing_sub_blocks(comp, always: bool = False) -> list[str]:
    """Sub-blocks (localize's keys, "layers.0.ffn") with a point beyond its local tolerance, in
    model order, the culprit's first; with `always` and none failing, the one whose point is
    closest to its local tolerance."""
    out: list[str] = []
    for p in comp.points:
        lr = p.local or {}
        if lr.get("verdict") == Verdict.FAIL and not lr.get("alias"):
            sb = sub_block_of(p.name)
            if sb not in out:
                out.append(sb)
    if out or not always:
        return out[:MAX_SUB_BLOCKS]
    ranked = [p for p in comp.points if (p.local or {}).get("ratio") is not None and not p.local.get("alias")]
    worst = max(ranked, key=lambda p: p.local["ratio"], default=None)
    return [sub_block_of(worst.name)] if worst else []


class _SubBlock:
    """One sub-block judged against the engine: run it (under a hypothesis or not), score it."""

    def __init__(self, case: Case, engine: dict, precision: str, noise, part: str, layer, inp: str):
        self.case, self.engine, self.precision = case, engine, precision
        self.part, self.layer, self.inp = part, layer, inp
        self.base, self.own = local_noise_sets(noise)
        self.specs = {s.name: s for s in capture_points(case.config)}

    def run(self, hyp: Hypothesis | None = None, m: float = 1.0):
        """(ratio, {point: ratio}, outputs, local noise, fired)."""
        if hyp is None:
            loc, _, ln = forced_run(self.case, self.engine, self.part, self.layer, self.inp, self.base, self.own)
            fired = 0
        else:
            with hyp.active(self.case.config, m) as state:
                loc, _, ln = forced_run(self.case, self.engine, self.part, self.layer, self.inp, self.base, self.own)
            fired = state.fired
        ratios = {}
        for name, out in loc.items():
            spec = self.specs.get(name)
            if spec is None or name not in self.engine or tuple(shape_of(self.engine, name).shape) != tuple(out.shape):
                continue
            r = judge_point(spec, self.engine, loc, self.precision, ln, "local").ratio
            ratios[name] = math.inf if r is None or not math.isfinite(r) else float(r)
        return max(ratios.values(), default=math.inf), ratios, loc, ln, fired

    def screen(self, hyp: Hypothesis, reference: float):
        """[best m, its ratio, its outputs] over m in SCREEN, or None when the hypothesis never
        fires here (it does not apply to this sub-block on this input). A hypothesis that at full
        magnitude leaves the sub-block's worst ratio exactly the reference's (it does not touch
        the failing point) is not tried at smaller ones."""
        best = None
        for m in SCREEN:
            r, _, loc, _, fired = self.run(hyp, m)
            if not fired:
                return None
            if best is None or r < best[1]:
                best = [m, r, loc]
            if m == 1.0 and math.isclose(r, reference, rel_tol=1e-9):
                break
        return best

    def fit(self, hyp: Hypothesis, best: list) -> list:
        """Refine `best` ([m, ratio, outputs]) by golden-section search over m: in [1/2, 1]
        when the screen's best was m = 1 (FIT_STEPS - 1 steps), else in [0, 1] (FIT_STEPS)."""
        def f(m):
            r, _, loc, _, _ = self.run(hyp, m)
            if r < best[1]:
                best[:] = [m, r, loc]
            return r
        (a, b), steps = ((0.5, 1.0), FIT_STEPS - 1) if best[0] == 1.0 else ((0.0, 1.0), FIT_STEPS)
        c, d = b - _PHI * (b - a), a + _PHI * (b - a)
        fc, fd = f(c), f(d)
        for _ in range(steps):
            if fc <= fd:
                b, d, fd = d, c, fc
                c = b - _PHI * (b - a)
                fc = f(c)
            else:
                a, c, fc = c, d, fd
                d = a + _PHI * (b - a)
                fd = f(d)
        return best


def diagnose(case: Case, engine: dict, precision: str, noise, comp, hypotheses=None,
             always: bool = False) -> list[Diagnosis]:
    """The diagnosis of a localized comparison: its Diagnosis entries, best first (the best with
    its per-token evidence); the culprit's sub-block first, then the next failing one. Empty
    when no sub-block fails locally (and not `always`)."""
    hyps = hypotheses if hypotheses is not None else hypotheses_for()
    by_key = {_key(part, layer): (part, layer, inp) for part, layer, inp in sub_blocks(case.config)}
    out: list = []
    for key in failing_sub_blocks(comp, always):
        if key not in by_key or by_key[key][2] not in engine:
            continue
        part, layer, inp = by_key[key]
        sb = _SubBlock(case, engine, precision, noise, part, layer, inp)
        ref_ratio, ref_ratios, ref_loc, ln, _ = sb.run()
        point = next((n for n, r in ref_ratios.items() if r > 1), None) or max(ref_ratios, key=ref_ratios.get, default=key)
        screened = [(h, b) for h in hyps if (b := sb.screen(h, ref_ratio)) is not None]
        screened.sort(key=lambda hb: hb[1][1])
        ranked = []
        for i, (h, b) in enumerate(screened):
            fitted = i < FITTED and b[1] < ref_ratio  # worth refining: better than no defect at all
            m, r, loc = sb.fit(h, b) if fitted else b
            params = {**h.params(m, case.config), **({} if fitted else {"fitted": False})}
            ranked.append((Diagnosis(h.name, point, params, _finite(r), _finite(ref_ratio), False, key), r, loc))
        ranked.sort(key=lambda e: e[1])
        if ranked:
            best, r, loc = ranked[0]
            runner = ranked[1][1] if len(ranked) > 1 else math.inf
            best.explains = explains(r, ref_ratio, runner)
            best.evidence = evidence(point, engine, ref_loc, loc, precision, ln)
        out.extend(e for e, _, _ in ranked)
        if any(e.explains for e in out):
            break  # the culprit's sub-block is explained: the next one is not needed
    return out


def explains(residual: float, reference: float, runner_up: float = math.inf) -> bool:
    """The best hypothesis explains the engine: within the honest noise (residual <= 1), on a
    sub-block the reference does not explain (reference > 1), and clearly (CLEAR x) better than
    both the reference and the runner-up, which itself is not within noise."""
    return bool(residual <= 1.0 and reference > 1.0 and reference >= CLEAR * residual
                and runner_up > 1.0 and runner_up >= CLEAR * residual)


def _finite(x: float):
    return float(x) if math.isfinite(x) else None


def _token_rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row: ||a - b|| / ||b|| (0 where both are 0)."""
    a, b = a.double().reshape(a.shape[0], -1), b.double().reshape(b.shape[0], -1)
    d = torch.nan_to_num(a - b, nan=math.inf).norm(dim=1)
    return d / b.norm(dim=1).clamp_min(1e-300)


def _set_differs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.long().sort(-1).values != b.long().sort(-1).values).any(-1)


def evidence(point: str, engine: dict, ref: dict, hyp: dict, precision: str, noise: dict) -> dict | None:
    """Per token at `point`: which tokens fail against the reference, which the hypothesis
    changes, and which failing ones it explains (engine within the per-token bound of it)."""
    if point not in engine or point not in ref or point not in hyp:
        return None
    e, r, h = engine[point], ref[point], hyp[point]
    if tuple(e.shape) != tuple(r.shape) or tuple(h.shape) != tuple(r.shape) or not e.dim():
        return None
    if e.is_floating_point():
        tol = float_tolerance(noise.get(point), precision, "local")
        bound = tol.get("token_value") or tol["value"]
        failing, changed, fits = _token_rel(e, r) > bound, _token_rel(h, r) > bound, _token_rel(e, h) <= bound
        how = f"per-token relative error > {bound:.3g} (the local per-token tolerance)"
    else:
        failing, changed, fits = _set_differs(e, r), _set_differs(h, r), ~_set_differs(e, h)
        how = "the token's selected set differs"
    idx = lambda mask: mask.nonzero().flatten()[:MAX_TOKENS_LISTED].tolist()  # noqa: E731
    return {"point": point, "tokens": int(e.shape[0]), "criterion": how,
            "failing": int(failing.sum()), "changed_by_hypothesis": int(changed.sum()),
            "failing_and_changed": int((failing & changed).sum()),
            "failing_explained": int((failing & fits).sum()),
            "failing_unexplained": int((failing & ~fits).sum()),
            "first_failing_tokens": idx(failing), "first_unexplained_tokens": idx(failing & ~fits)}

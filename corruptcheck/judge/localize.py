"""Localization by teacher forcing (docs/design.md §3, §6).

The first point that exceeds its tolerance is often only where accumulated drift crossed the
line. So every sub-block of the reference (attention half and FFN half of each layer, the
head) is re-run in float64 on the engine's *own* captured input to that sub-block, and the
engine's outputs are compared with that: the local error is the error the sub-block itself
adds. A failing point whose local error is within the local tolerance only inherits drift; the
first point whose local error exceeds it is the culprit.
"""
from __future__ import annotations

import torch

from corruptcheck.cases import Case
from corruptcheck.judge.differ import Comparison, judge_point
from corruptcheck.judge.results import Culprit
from corruptcheck.finite import finite_or_none
from corruptcheck.judge.teacher_forcing import choice_dependent, experts_point, local_points, sub_blocks
from corruptcheck.judge.phases import larger_noise, per_token_bound, phase_local_noise
from corruptcheck.points import capture_points, parse, point, sub_block_of
from corruptcheck.verdicts import Verdict


def prev_out(cfg, name: str) -> str | None:
    """layers.i.attn_hc.in is the stream layers.{i-1}.out (same tensor)."""
    prefix, layer, rest = parse(name)
    if isinstance(layer, int) and rest == "attn_hc.in":
        return point(layer - 1, "out") if layer > 0 else None
    return None


def teacher_force(case: Case, engine: dict, precision: str, noise: dict | None, rows: dict | None = None,
                  group: str | None = None) -> dict:
    """{point: local result} for every point a teacher-forced sub-block produces. A local
    result is {"rel_l2", "norm_ratio", "ratio", "tolerance", "verdict"} or
    {"verdict": "unavailable", "reason"} when the engine lacks the sub-block's input.

    An FFN sub-block runs the engine's own expert ids where the engine exposes them
    (`reference.moe.given_choices`): its output is then judged on arithmetic against the local
    noise of honest runs on the reference's own choices, while the choice itself is judged
    against the router's (a genuine wrong choice fails at `moe.experts`, a near-tie resolved the
    other way is no error downstream). Without them, against the noise of honest runs making
    their own choices (`local_own_choice`).

    `rows` ({point: row indices}, a served run's phase `group`: phases.phase_rows): the
    sub-blocks still run on every token (causality), but each point is judged on those rows only,
    against the local noise measured on the phase's rows (phases.phase_local_noise), so the
    culprit is named within the step where the divergence appeared."""
    base, own = local_noise_sets(noise)
    if rows is not None:
        tokens = len(rows.get("embed", ()))
        base, own = phase_local_noise(noise, base, group, tokens), per_token_bound(own)
    specs = {s.name: s for s in capture_points(case.config)}
    out: dict = {}
    for part, layer, inp in sub_blocks(case.config):
        if inp not in engine:
            out[f"__{part}:{layer}"] = {"verdict": "unavailable", "reason": f"engine did not capture {inp}"}
            continue
        loc, conditioned, local_noise = forced_run(case, engine, part, layer, inp, base, own)
        if rows is not None:
            loc, eng = _rows_of(loc, rows), _rows_of({n: engine[n] for n in loc if n in engine}, rows)
        else:
            eng = engine
        for name, ref_local in loc.items():
            spec = specs.get(name)
            if spec is None or name not in eng or tuple(eng[name].shape) != tuple(ref_local.shape):
                continue
            res = judge_point(spec, eng, loc, precision, local_noise, "local")
            out[name] = {"verdict": res.verdict, "ratio": res.ratio, "tolerance": res.tolerance,
                         "rel_l2": res.metrics.get("rel_l2"), "norm_ratio": res.metrics.get("norm_ratio"),
                         "genuine": res.metrics.get("genuine"), "reason": res.reason,
                         **({"on_engine_choices": True} if conditioned else {})}
    for name in specs:
        prev = prev_out(case.config, name)
        if prev and prev in out:
            out[name] = dict(out[prev], alias=prev)
    return out


def local_noise_sets(noise: dict | None) -> tuple[dict, dict]:
    """(local noise on the reference's expert choices, the larger of it and the noise of honest
    runs making their own choices): what a sub-block is judged against when the engine exposes
    its expert ids, and when it does not."""
    base = (noise or {}).get("local", {})
    own = {**base, **{n: larger_noise(base.get(n), v) for n, v in (noise or {}).get("local_own_choice", {}).items()}}
    return base, own


def forced_run(case: Case, engine: dict, part: str, layer, inp: str, base: dict, own: dict) -> tuple[dict, bool, dict]:
    """(teacher-forced outputs of one sub-block on the engine's captured input to it, whether it
    ran the engine's own expert choices, the local noise it is judged against). The reference's
    functions are looked up when called, so a hypothesis (judge/hypotheses.py) patched around
    this call runs instead of the reference."""
    dependent = choice_dependent(case.config, part, layer)
    conditioned = dependent and experts_point(layer) in engine
    loc = local_points(case, part, layer, engine[inp].to(torch.float64), "float64",
                       choices=engine if conditioned else None)
    return loc, conditioned, own if dependent and not conditioned else base


def _rows_of(points: dict, rows: dict) -> dict:
    """The points that have rows in the phase, restricted to them."""
    return {n: t[rows[n]] for n, t in points.items() if n in rows and t.dim() and t.shape[0] > int(rows[n].max())}


def attach(comp: Comparison, local: dict, judge: bool = False) -> Culprit | None:
    """Put local results on the points, mark roles, and return the culprit (or None).

    `judge` (teacher forcing `always` on a one-forward compare): a point within its free
    tolerance whose own sub-block exceeds the local tolerance fails too. Honest drift cannot do
    that (the local reference runs on the engine's own input), so an error smaller than the
    drift accumulated upstream is still seen where it is made (docs/tolerances.md)."""
    if judge:
        _fail_local_excess(comp, local)
    culprit = None
    for p in comp.points:
        if p.name == "embed" and p.verdict in (Verdict.PASS, Verdict.FAIL):  # no input: local == global
            local.setdefault("embed", {"verdict": p.verdict, "ratio": p.ratio, "tolerance": p.tolerance,
                                       "rel_l2": p.metrics.get("rel_l2"), "norm_ratio": p.metrics.get("norm_ratio")})
        lr = local.get(p.name)
        if lr is None:
            continue
        p.local = dict(lr)
        if culprit is None and lr.get("verdict") == Verdict.FAIL:
            culprit = p
    culprit_sub = sub_block_of(culprit.name) if culprit else None
    for p in comp.points:
        if p.verdict != Verdict.FAIL:
            continue
        lr = p.local or {}
        if lr.get("verdict") == Verdict.FAIL:
            role = "culprit" if p is culprit else (
                "culprit sub-block" if sub_block_of(p.name) == culprit_sub else "local excess")
        elif lr.get("verdict") in (Verdict.PASS, Verdict.NOT_EXERCISED):
            role = "inherited"
        else:
            role = "unknown (no teacher-forced result)"
        p.local = {**lr, "role": role}
    if culprit is None:
        return None
    lr = culprit.local
    return Culprit(culprit.name, culprit.layer, finite_or_none(lr.get("ratio")), lr.get("rel_l2"), lr.get("norm_ratio"),
                   lr.get("reason", ""))


def _fail_local_excess(comp: Comparison, local: dict) -> None:
    for p in comp.points:
        lr = local.get(p.name)
        if p.verdict in (Verdict.PASS, Verdict.NOT_EXERCISED) and lr is not None and lr.get("verdict") == Verdict.FAIL:
            p.verdict, p.ratio = Verdict.FAIL, lr.get("ratio")
            p.reason = f"teacher-forced: {lr.get('reason') or 'beyond the local tolerance'} (free-running within tolerance)"



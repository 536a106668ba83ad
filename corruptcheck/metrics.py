"""Error metrics between an engine tensor and the reference, computed in float64 one chunk of
tokens at a time (no float64 copy of a whole large tensor is made)."""
from __future__ import annotations

import math

import torch

CHUNK_ELEMENTS = 1 << 22


def float_metrics(engine: torch.Tensor, ref: torch.Tensor) -> dict:
    """rel_l2, max_abs, norm_ratio, cosine, worst token (by relative error), NaN/Inf parity."""
    t = ref.shape[0] if ref.dim() else 1
    e2 = r2 = d2 = dot = 0.0
    max_abs = 0.0
    worst_tok, worst_rel = -1, -1.0
    nonfinite_engine = nonfinite_ref = 0
    per_tok = max(1, math.prod(ref.shape[1:]) if ref.dim() else 1)  # also for 0 rows
    step = max(1, CHUNK_ELEMENTS // per_tok)
    for start in range(0, t, step):
        e = engine[start:start + step].to(torch.float64).reshape(-1, per_tok) if ref.dim() else engine.double().reshape(1, 1)
        r = ref[start:start + step].to(torch.float64).reshape(-1, per_tok) if ref.dim() else ref.double().reshape(1, 1)
        fe, fr = torch.isfinite(e), torch.isfinite(r)
        nonfinite_engine += int((~fe & fr).sum())
        nonfinite_ref += int((~fr).sum())
        ok = fe & fr
        e, r = torch.where(ok, e, 0.0), torch.where(ok, r, 0.0)
        d = e - r
        dn, rn = d.square().sum(1), r.square().sum(1)
        e2 += float(e.square().sum()); r2 += float(rn.sum()); d2 += float(dn.sum()); dot += float((e * r).sum())
        if d.numel():
            max_abs = max(max_abs, float(d.abs().max()))
        rel_tok = (dn / rn.clamp_min(1e-300)).sqrt()
        if rel_tok.numel():
            i = int(rel_tok.argmax())
            if float(rel_tok[i]) > worst_rel:
                worst_rel, worst_tok = float(rel_tok[i]), start + i
    rn, en = math.sqrt(r2), math.sqrt(e2)
    return {
        "rel_l2": math.sqrt(d2) / rn if rn > 0 else (0.0 if d2 == 0 else math.inf),
        "max_abs": max_abs,
        "norm_ratio": en / rn if rn > 0 else (1.0 if en == 0 else math.inf),
        "cosine": dot / (en * rn) if en > 0 and rn > 0 else (1.0 if en == rn else 0.0),
        "worst_token": worst_tok,
        "worst_token_rel": worst_rel,
        "nonfinite_new": nonfinite_engine,
        "nonfinite_ref": nonfinite_ref,
    }


def set_disagreements(engine: torch.Tensor, ref: torch.Tensor, scores: torch.Tensor | None,
                      tie_rel: float) -> dict:
    """Per-token set comparison of discrete choices ([T, K], -1 = none).

    A token whose sets differ is "tie-explained" when, by the reference's own scores, every
    swapped-in choice scores within `tie_rel` (relative to the row's score scale) of the
    swapped-out one; otherwise it is a genuine disagreement."""
    genuine, ties, worst_margin = [], [], 0.0
    for t in range(ref.shape[0]):
        a = {int(v) for v in ref[t] if v >= 0}
        b = {int(v) for v in engine[t] if v >= 0}
        if a == b:
            continue
        only_ref, only_eng = sorted(a - b), sorted(b - a)
        if scores is None or len(only_ref) != len(only_eng) or any(
                i >= scores.shape[1] for i in only_ref + only_eng):
            genuine.append(t)
            continue
        row = scores[t].to(torch.float64)
        finite = row[torch.isfinite(row)]
        scale = float(finite.abs().max()) if finite.numel() else 1.0
        lost = row[only_ref]
        gained = row[only_eng]
        if not bool(torch.isfinite(gained).all()):  # engine picked an entry the reference masks
            genuine.append(t)
            continue
        margin = float((lost.min() - gained.max()).clamp_min(0)) / max(scale, 1e-300)
        worst_margin = max(worst_margin, margin)
        (ties if margin <= tie_rel else genuine).append(t)
    return {"tokens": int(ref.shape[0]), "genuine": len(genuine), "tie_explained": len(ties),
            "first_genuine_token": genuine[0] if genuine else None, "worst_margin_rel": worst_margin}

"""Tolerances derived from the noise model (docs/design.md §7, docs/tolerances.md).

    tolerance(point) = max(SAFETY x worst honest error at that point, FLOOR[precision])

for the relative L2 error (teacher-forced points also per token: worst token's relative error
<= max(SAFETY x worst honest per-token relative error, FLOOR)), and for the scale check

    norm band(point) = max(SAFETY x max(worst honest |norm ratio - 1|,
                                        NORM_SHARE x worst honest rel L2), FLOOR[precision])

(an honest error can move the norm by at most its relative L2 — triangle inequality — and in
practice by a small share of it, so a scale error far below the rel-L2 tolerance still fails).
Discrete choices (indexer top-k, expert ids) may differ only where the reference's margin is
within TIE_SAFETY x the 99th-percentile score perturbation an honest implementation makes.
"""
from __future__ import annotations

SAFETY = 3.0
NORM_SHARE = 0.2
TIE_SAFETY = 4.0
FLOOR = {"float64": 1e-12, "float32": 1e-9, "bfloat16": 1e-6, "fp8-serving": 1e-6, "ggml-float32": 1e-9, "ggml-bf16": 1e-6, "ggml-q8_0": 1e-6}
TIE_FLOOR = {"float64": 1e-12, "float32": 1e-6, "bfloat16": 1e-3, "fp8-serving": 1e-3, "ggml-float32": 1e-6, "ggml-bf16": 1e-3, "ggml-q8_0": 1e-3}


def float_tolerance(noise: dict | None, precision: str, scope: str) -> dict:
    """`scope`: "free" (the whole run) or "local" (teacher-forced sub-block)."""
    floor = FLOOR[precision]
    if noise is None:
        return {"metric": "rel_l2", "value": floor, "norm_ratio_band": floor, "noise_rel_l2": None,
                "derivation": f"floor for {precision} (no noise measured for this point)"}
    rel, dev = noise.get("rel_l2", 0.0), noise.get("norm_dev", 0.0)
    value = max(SAFETY * rel, floor)
    band = max(SAFETY * max(dev, NORM_SHARE * rel), floor)
    how = (f"max({SAFETY:g} x worst {scope} rel_l2 of honest {precision} runs ({rel:.3g}), floor {floor:g})")
    out = {"metric": "rel_l2", "value": value, "norm_ratio_band": band, "noise_rel_l2": rel,
           "noise_norm_dev": dev, "safety": SAFETY, "floor": floor, "derivation": how}
    if scope == "local" and noise.get("token_rel"):
        # teacher-forced: no near-tie flips left (the engine's own expert choices), so the honest
        # per-token worst case bounds every token: an error confined to a few tokens is seen
        tok = noise["token_rel"]
        out["token_value"] = max(SAFETY * tok, floor)
        out["derivation"] += f"; per token max({SAFETY:g} x worst honest per-token rel error ({tok:.3g}), floor {floor:g})"
    return out


def tie_margin(score_noise: float | None, precision: str) -> tuple[float, str]:
    floor = TIE_FLOOR[precision]
    if score_noise is None:
        return floor, f"floor for {precision} (no score noise measured)"
    value = max(TIE_SAFETY * score_noise, floor)
    return value, (f"max({TIE_SAFETY:g} x p99 score perturbation of honest {precision} runs "
                   f"({score_noise:.3g}), floor {floor:g}), relative to the row's score scale")

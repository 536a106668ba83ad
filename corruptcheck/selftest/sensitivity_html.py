"""`corruptcheck sensitivity --html`: one self-contained page (inline CSS and SVG, no script):
the families table, the honest runs, and per family its bisection curve — err/tol of the strike
point and of the run's worst point against the magnitude m, both axes logarithmic, the tolerance
at err/tol = 1 and m* marked."""
from __future__ import annotations

import math
from html import escape

from corruptcheck.storage.atomic import atomic_write
from corruptcheck.finite import fmt_number
from corruptcheck.selftest.html import _CSS, _cell
from corruptcheck.selftest.sensitivity import M_LO
from corruptcheck.reports.timeline_html import _H, _PAD, _W, _y, ratio_axis, ratio_range

_SERIES = (("strike_ratio", "#1565c0", "strike point"), ("worst_ratio", "#777", "worst point"))


def _x(m: float) -> float:
    return _PAD + (_W - 2 * _PAD) * (math.log10(m) - math.log10(M_LO)) / -math.log10(M_LO)


def _curve(fam) -> str:
    """The family's runs as an SVG chart (filled marks: detected, hollow: not)."""
    steps = sorted(fam.steps, key=lambda s: s.m)
    lo, hi = ratio_range(getattr(s, k) for s in steps for k, _, _ in _SERIES)
    parts = [f'<svg width="{_W}" height="{_H}" role="img" aria-label="err/tol against m for {escape(fam.family)}">',
             *ratio_axis(lo, hi)]
    for d in range(round(math.log10(M_LO)), 1):
        x = _x(10.0 ** d)
        parts.append(f'<text x="{x:.1f}" y="{_H - 12}" font-size="10" text-anchor="middle" '
                     f'fill="#777">m={10.0 ** d:g}</text>')
    if fam.detected_at is not None:
        x = _x(fam.detected_at)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{_PAD}" y2="{_H - _PAD}" stroke="#2e7d32" '
                     f'stroke-dasharray="2 2"/><text x="{x + 4:.1f}" y="{_PAD - 6}" font-size="11" '
                     f'fill="#2e7d32">m*={fam.detected_at:.3g}</text>')
    for key, colour, label in _SERIES:
        pts = [(s, getattr(s, key)) for s in steps if getattr(s, key) is not None]
        xy = [(s, _x(s.m), _y(r if math.isfinite(r) and r > 0 else (hi if r > 0 else lo), lo, hi)) for s, r in pts]
        if len(xy) > 1:
            parts.append(f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for _, x, y in xy)}" fill="none" '
                         f'stroke="{colour}" stroke-width="1.5"/>')
        for s, x, y in xy:
            fill = colour if s.localized else "white"
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{fill}" stroke="{colour}">'
                         f'<title>{label}, m={s.m:.3g}: err/tol {getattr(s, key):.3g}, '
                         f'{"detected" if s.localized else "flagged" if s.flagged else "not detected"}</title></circle>')
    parts.append(f'<text x="{_PAD}" y="{_H - 26}" font-size="11" fill="#1565c0">— strike point</text>'
                 f'<text x="{_PAD + 110}" y="{_H - 26}" font-size="11" fill="#777">— worst point</text></svg>')
    return "".join(parts)


def render_html(res) -> str:
    """The page of a sensitivity.SensitivityResult."""
    head = "".join(f"<th>{c}</th>" for c in ("family", "class", "point", "detected at m", "flagged at m", "effect",
                                              "noise", "MDE (noise units)", "localized", "knob", "note"))
    rows = ["<tr>" + "".join([
        _cell(f.family), _cell(f.klass), _cell(f.point), _cell(f.detected_at), _cell(f.flagged_at), _cell(f.effect),
        _cell(f.noise), _cell(f.mde_noise_units), _cell("yes" if f.localized else "no", "yes" if f.localized else "no"),
        _cell(f.knob), _cell(f.note)]) + "</tr>" for f in res.families]
    honest = ["<tr>" + "".join([_cell(h.variant), _cell(h.worst_ratio), _cell(h.worst_point), _cell(h.note)]) + "</tr>"
              for h in res.honest]
    curves = [f"<h3>{escape(f.family)}</h3><p>knob: {escape(f.knob)}; point {escape(f.point or '-')}</p>{_curve(f)}"
              for f in res.families if f.steps and f.point]
    title = f"corruptcheck sensitivity · {escape(res.engine)} · {escape(res.case)} · {escape(res.precision)}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{_CSS}</style></head>"
            f"<body><h1>{title}</h1><p>MDE = effect(m*) / noise at the strike point: m* the smallest magnitude "
            f"of the fault's knob that compare flags and localizes (bisection in log space over [{M_LO:g}, 1], "
            f"{res.steps} steps), effect = rel_l2 of the faulty capture against the clean one, noise = rel_l2 of "
            f"the clean capture against the float64 reference. Honest max err/tol "
            f"{fmt_number(res.honest_max_ratio)}; {res.seconds:.1f} s.</p>"
            f"<table><tr>{head}</tr>{''.join(rows)}</table><h2>honest runs</h2><table><tr><th>variant</th><th>worst err/tol</th>"
            f"<th>at</th><th>note</th></tr>{''.join(honest)}</table><h2>bisection curves</h2>{''.join(curves)}"
            f"</body></html>")


def write_html(res, path: str) -> None:
    atomic_write(path, render_html(res))

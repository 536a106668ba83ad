"""`corruptcheck history timeline`: one engine, one case, every release it was recorded with, as
one self-contained HTML page (inline CSS and SVG, no script, nothing fetched).

What a reader sees first: a line chart of the worst err/tol per release (log scale, the pass line
at 1), then one row per release in version order — verdict, the first divergence, the culprit,
what the release needed to run at all, and a heat strip of the worst err/tol per layer.
"""
from __future__ import annotations

import html
import json
import math
import re

from corruptcheck.verdicts import Verdict

_W, _H, _PAD = 720, 220, 44


def version_key(v: str | None) -> tuple:
    """Release order: numeric parts compared as numbers (0.9 < 0.10), text after."""
    parts = re.split(r"[.+-]", v or "")
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def latest_per_release(runs: list[dict]) -> list[dict]:
    """The latest recorded run of each engine version, in version order."""
    latest: dict = {}
    for r in runs:
        latest[r["engine_version"]] = r  # runs come in recording order
    return [latest[v] for v in sorted(latest, key=version_key)]


def layer_worst(points: dict) -> dict:
    """{layer label: worst err/tol} over the run's points (None where nothing was judged)."""
    out: dict = {}
    for name, p in points.items():
        label = "mtp" if name.startswith("mtp.") else (f"L{p['layer']}" if p["layer"] is not None else "io")
        r = p["ratio"] if p["verdict"] != Verdict.FAIL or p["ratio"] is not None else math.inf
        if r is None:
            out.setdefault(label, None)
            continue
        out[label] = r if out.get(label) is None else max(out[label], r)
    return out


def _colour(r) -> str:
    """Green under half the tolerance, amber to the tolerance, red above, grey unjudged."""
    if r is None:
        return "#ccc"
    if r <= 0.5:
        return "#2e7d32"
    return "#f9a825" if r <= 1.0 else "#c62828"


def _y(r: float, lo: float, hi: float) -> float:
    r = min(max(r, lo), hi)
    return _PAD + (_H - 2 * _PAD) * (1 - (math.log10(r) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)))


def ratio_range(vals) -> tuple[float, float]:
    """The err/tol axis for `vals`: at least 0.05 .. 20, a factor 2 beyond the data."""
    vals = [v for v in vals if v is not None and math.isfinite(v) and v > 0]
    return min([0.1, *vals]) / 2, max([10.0, *vals]) * 2


def ratio_axis(lo: float, hi: float) -> list[str]:
    """SVG parts of a log err/tol axis: the dashed tolerance line at 1 and the decade grid."""
    parts = [f'<line x1="{_PAD}" x2="{_W - _PAD}" y1="{_y(1, lo, hi):.1f}" y2="{_y(1, lo, hi):.1f}" '
             'stroke="#c62828" stroke-dasharray="4 3"/>',
             f'<text x="{_W - _PAD + 4}" y="{_y(1, lo, hi) + 4:.1f}" font-size="11" fill="#c62828">tolerance</text>']
    for d in range(math.ceil(math.log10(lo)), math.floor(math.log10(hi)) + 1):  # decade ticks: the scale readable
        y = _y(10.0 ** d, lo, hi)
        parts.append(f'<line x1="{_PAD}" x2="{_W - _PAD}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                     f'<text x="{_PAD - 6}" y="{y + 4:.1f}" font-size="10" text-anchor="end" fill="#777">{10.0 ** d:g}</text>')
    return parts


def _chart(rows: list[dict]) -> str:
    lo, hi = ratio_range(r["worst_ratio"] for r in rows)
    n = max(len(rows), 2)
    xs = [_PAD + (_W - 2 * _PAD) * i / (n - 1) for i in range(len(rows))]
    parts = [f'<svg width="{_W}" height="{_H}" role="img" aria-label="worst err/tol per release">',
             *ratio_axis(lo, hi)]
    pts = []
    for x, r in zip(xs, rows):
        label = html.escape(r["engine_version"] or "?")
        parts.append(f'<text x="{x:.1f}" y="{_H - 12}" font-size="11" text-anchor="middle">{label}</text>')
        if r["verdict"] == Verdict.CRASH or r["worst_ratio"] is None:
            parts.append(f'<text x="{x:.1f}" y="{_PAD - 8}" font-size="11" text-anchor="middle" fill="#555">'
                         f'{Verdict.CRASH if r["verdict"] == Verdict.CRASH else "no ratio"}</text>')
            continue
        y = _y(r["worst_ratio"] if math.isfinite(r["worst_ratio"]) else hi, lo, hi)
        pts.append(f"{x:.1f},{y:.1f}")
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{_colour(r["worst_ratio"])}">'
                     f'<title>{label}: worst err/tol {r["worst_ratio"]:.3g}</title></circle>'
                     f'<text x="{x + 6:.1f}" y="{y - 6:.1f}" font-size="11">{r["worst_ratio"]:.3g}</text>')
    if len(pts) > 1:
        parts.insert(3, f'<polyline points="{" ".join(pts)}" fill="none" stroke="#1565c0" stroke-width="2"/>')
    parts.append("</svg>")
    return "".join(parts)


def _strip(worst: dict, labels: list[str]) -> str:
    cells = []
    for lab in labels:
        r = worst.get(lab)
        tip = f"{lab}: {'not judged' if r is None else f'worst err/tol {r:.3g}'}"
        cells.append(f'<span class="cell" style="background:{_colour(r)}" title="{html.escape(tip)}"></span>')
    return "".join(cells)


def render(engine: str, case: str, rows: list[dict], points: dict) -> str:
    """rows: latest_per_release(...); points: {run id: store.points_of(...)}."""
    worst = {r["id"]: layer_worst(points.get(r["id"], {})) for r in rows}
    labels = sorted({lab for w in worst.values() for lab in w},
                    key=lambda s: (s == "mtp", s == "io", int(s[1:]) if s[1:].isdigit() else 0))
    body = []
    for r in rows:
        need = ", ".join(r["workarounds"]) or "—"
        worst_txt = "" if r["worst_ratio"] is None else f"{r['worst_ratio']:.3g}"
        found = html.escape(r["first_divergence"] or ("—" if r["verdict"] != Verdict.CRASH else (r["reason"] or "")))
        body.append(
            f'<tr><td>{html.escape(r["engine_version"] or "?")}</td>'
            f'<td class="v {r["verdict"]}">{r["verdict"]}</td>'
            f'<td>{worst_txt}</td>'
            f'<td>{found}</td><td>{html.escape(r["culprit"] or "—")}</td>'
            f'<td>{html.escape(need)}</td><td>{_strip(worst[r["id"]], labels)}</td></tr>')
    legend = " ".join(labels)
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>corruptcheck timeline: {html.escape(engine)} on {html.escape(case)}</title>
<style>body{{font:14px system-ui,sans-serif;margin:24px;color:#222}}table{{border-collapse:collapse}}
td,th{{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left;vertical-align:middle}}
.cell{{display:inline-block;width:14px;height:14px;margin-right:2px}}.v.pass{{color:#2e7d32}}
.v.fail,.v.crash,.v.error{{color:#c62828;font-weight:600}}.v.incomplete{{color:#f9a825}}</style></head><body>
<h1>{html.escape(engine)} · {html.escape(case)}: correctness by release</h1>
<p>Worst error / tolerance over every capture point, per release (log scale; above the dashed line fails).</p>
{_chart(rows)}
<table><thead><tr><th>release</th><th>verdict</th><th>worst err/tol</th><th>first divergence</th>
<th>culprit</th><th>needed to run</th><th>worst err/tol per layer ({html.escape(legend)})</th></tr></thead>
<tbody>{"".join(body)}</tbody></table>
<p>Each row is the latest recorded run of that release. Green: under half the tolerance; amber: up to it;
red: over it; grey: nothing judged.</p>
<script type="application/json" id="data">{html.escape(json.dumps(rows, default=str))}</script>
</body></html>"""

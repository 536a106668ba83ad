"""Self-contained HTML report: verdict and culprit first, then error/tolerance per point
across the layers (log scale), then the table. No scripts, no external resources."""
from __future__ import annotations

import html
import math

from corruptcheck.storage.atomic import atomic_write
from corruptcheck.judge.coverage import coverage_sentence
from corruptcheck.finite import fmt_number
from corruptcheck.judge.phases import phase_words
from corruptcheck.reports.render import diagnosis_lines
from corruptcheck.judge.results import Report
from corruptcheck.verdicts import JUDGED, NOT_COMPARED, Verdict

_COLOR = {Verdict.PASS: "#2e7d32", Verdict.FAIL: "#c62828", Verdict.NOT_EXERCISED: "#00838f",
          Verdict.MISSING: "#f9a825", Verdict.SKIPPED: "#9e9e9e", Verdict.ERROR: "#c62828",
          Verdict.INCOMPLETE: "#f9a825", Verdict.UNCHECKED: "#f9a825", Verdict.CRASH: "#6a1b9a"}
LO = -3.0  # log10 of the lowest error/tolerance drawn; the top follows the worst point


def _esc(v) -> str:
    return html.escape(str(v))


def _fmt(v, spec=".3g"):
    return fmt_number(v, spec, none="–", nonfinite="∞")


def _group(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "layers":
        return f"L{parts[1]}"
    if parts[0] == "mtp":
        return "MTP"
    return "head" if parts[0] in ("head", "logits") else parts[0]


class _Axes:
    """The plot's frame: x per point, y = log10(error / tolerance) from LO to HI."""
    w, h, left, right, top, bottom = 1100, 360, 60, 20, 30, 70

    def __init__(self, pts: list):
        self.pw, self.ph = self.w - self.left - self.right, self.h - self.top - self.bottom
        self.step = self.pw / max(len(pts), 1)
        finite = [p.finite_ratio for p in pts if p.finite_ratio]
        self.hi = float(min(8, max(1, math.ceil(math.log10(max(finite))) if finite else 1)))

    def x(self, i: float) -> float:
        return self.left + i * self.step

    def y(self, r) -> float:
        lr = LO if r is None or r <= 0 else max(LO, min(self.hi, math.log10(r) if math.isfinite(r) else self.hi))
        return self.top + self.ph * (self.hi - lr) / (self.hi - LO)


def _plot(rep: Report) -> str:
    pts = [p for p in rep.points if p.verdict in JUDGED + NOT_COMPARED]
    if not pts:
        return "<p>No point was compared.</p>"
    ax = _Axes(pts)
    out = [f'<svg viewBox="0 0 {ax.w} {ax.h}" width="100%" role="img" aria-label="error over tolerance per point" '
           f'style="background:#fff;font-family:sans-serif;font-size:11px">']
    out += _layer_bands(pts, ax)
    out += _grid(ax)
    culprit = rep.culprit.name if rep.culprit else None
    first = (rep.first_divergence or {}).get("name")
    for i, p in enumerate(pts):
        out += _marks(p, ax.x(i + 0.5), ax, culprit, first)
    out += _legend(ax)
    out.append("</svg>")
    return "".join(out)


def _layer_bands(pts: list, ax: _Axes) -> list:
    out, start, shade = [], 0, False
    for i in range(1, len(pts) + 1):
        if i == len(pts) or _group(pts[i].name) != _group(pts[start].name):
            x0, x1 = ax.x(start), ax.x(i)
            if shade:
                out.append(f'<rect x="{x0:.1f}" y="{ax.top}" width="{x1 - x0:.1f}" height="{ax.ph}" fill="#f3f4f6"/>')
            out.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{ax.top + ax.ph + 16}" text-anchor="middle" fill="#333">'
                       f'{_esc(_group(pts[start].name))}</text>')
            start, shade = i, not shade
    return out


def _grid(ax: _Axes) -> list:
    out = []
    left, pw, top, ph = ax.left, ax.pw, ax.top, ax.ph
    for e in range(int(LO), int(ax.hi) + 1):
        y = ax.y(10.0 ** e)
        color, width = ("#c62828", 1.5) if e == 0 else ("#ddd", 1)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="{color}" stroke-width="{width}"'
                   + (' stroke-dasharray="6 3"' if e == 0 else "") + "/>")
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#333">1e{e}</text>')
    out.append(f'<text x="{left + pw - 4}" y="{ax.y(1.0) - 5:.1f}" text-anchor="end" fill="#c62828">tolerance</text>')
    out.append(f'<text x="14" y="{top + ph / 2}" transform="rotate(-90 14 {top + ph / 2})" text-anchor="middle" '
               f'fill="#333">error / tolerance (log)</text>')
    return out


def _ring(x: float, y: float, r, color: str, width) -> str:
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="none" stroke="{color}" stroke-width="{width}"/>'


def _marks(p, x: float, ax: _Axes, culprit, first) -> list:
    """One point's marks: a dot (float) or square (discrete), its teacher-forced ring, the
    culprit / first-divergence highlight; a triangle on the axis when missing."""
    tip = f"{p.name}: {p.verdict}, err/tol {_fmt(p.finite_ratio)}" + (f" — {p.reason}" if p.reason else "")
    if p.verdict in NOT_COMPARED:  # not compared: a triangle on the axis
        y = ax.top + ax.ph - 4
        return [f'<path d="M{x:.1f},{y - 7:.1f} l5,9 l-10,0 z" fill="{_COLOR[Verdict.MISSING]}">'
                f'<title>{_esc(tip)}</title></path>']
    y = ax.y(p.finite_ratio)
    loc = p.finite_local or {}
    if p.kind == "index":  # discrete choices: squares
        out = [f'<rect x="{x - 3.6:.1f}" y="{y - 3.6:.1f}" width="7.2" height="7.2" fill="{_COLOR[p.verdict]}">'
               f'<title>{_esc(tip)}</title></rect>']
        return out + ([_ring(x, y, 11, "#c62828", 2.5)] if p.name == culprit else [])
    out = []
    if loc.get("ratio") is not None:
        out.append(f'<circle cx="{x:.1f}" cy="{ax.y(loc["ratio"]):.1f}" r="4" fill="none" stroke="#555">'
                   f'<title>{_esc(p.name)}: local (teacher-forced) err/tol {_fmt(loc["ratio"])}</title></circle>')
    out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.6" fill="{_COLOR[p.verdict]}"><title>{_esc(tip)}</title></circle>')
    if p.name == culprit:
        out.append(_ring(x, y, 11, "#c62828", 2.5))
        anchor = "end" if x > ax.left + ax.pw * 0.6 else "start"
        dx = -14 if anchor == "end" else 14
        out.append(f'<text x="{x + dx:.1f}" y="{max(y - 12, ax.top + 12):.1f}" text-anchor="{anchor}" fill="#c62828" '
                   f'font-weight="bold" font-size="13">culprit: {_esc(p.name)}</text>')
    elif p.name == first and first != culprit:
        out.append(_ring(x, y, 8, "#ef6c00", 2))
    return out


def _legend(ax: _Axes) -> list:
    lx, ly = ax.left, ax.h - 22
    items = [(v, v.replace("-", " ")) for v in (Verdict.PASS, Verdict.FAIL, Verdict.NOT_EXERCISED, Verdict.MISSING)]
    out = [f'<circle cx="{lx + i * 120 + 6}" cy="{ly}" r="4" fill="{_COLOR[k]}"/>'
           f'<text x="{lx + i * 120 + 14}" y="{ly + 4}" fill="#333">{label}</text>' for i, (k, label) in enumerate(items)]
    out.append(f'<circle cx="{lx + 486}" cy="{ly}" r="4" fill="none" stroke="#555"/>'
               f'<text x="{lx + 494}" y="{ly + 4}" fill="#333">teacher-forced (local) err/tol</text>'
               f'<rect x="{lx + 700}" y="{ly - 4}" width="8" height="8" fill="#555"/>'
               f'<text x="{lx + 712}" y="{ly + 4}" fill="#333">discrete choice (top-k / experts)</text>')
    return out


def _phases(rep: Report) -> str:
    """A served run (docs/serving.md): one row per phase — prefill chunk or decode step."""
    if not rep.phases:
        note = (rep.engine_info or {}).get("schedule_note")
        return f'<p class="meta">Schedule: prefill only{(" — " + _esc(note)) if note else ""}.</p>'
    s = rep.schedule
    rows = []
    for p in rep.phases:
        f = p.first_divergence or {}
        where = "" if not f else f'<code>{_esc(f["name"])}</code>' + (
            f' (sequence {f["sequence"]})' if f.get("sequence") is not None else "")
        label = f'prefill chunk {p.chunk}' if p.phase == "prefill" else f'decode step {p.step}'
        rows.append(f'<tr class="{p.verdict}"><td>{label}</td><td class="n">{p.tokens}</td>'
                    f'<td><span class="badge" style="background:{_COLOR[p.verdict]}">{p.verdict}</span></td>'
                    f'<td class="n">{_fmt(p.worst_ratio)}</td><td>{_esc(p.worst_point or "")}</td>'
                    f'<td>{where}</td></tr>')
    return (f'<h2 style="font-size:16px">By phase</h2><p class="meta">prompts {"+".join(map(str, s["prompt_lens"]))}, '
            f'prefill chunk {s["chunk"] or "whole prompt"}, {s["decode_steps"]} greedy decode steps; '
            f'{_esc(rep.batching or "")}</p>'
            '<table><tr><th>phase</th><th>tokens</th><th>verdict</th><th>worst err/tol</th><th>at</th>'
            f'<th>first divergence</th></tr>{"".join(rows)}</table>')


def _diagnosis(rep: Report) -> str:
    """The diagnosis section (docs/diagnosis.md): its sentence, the ranked hypotheses, the
    per-token evidence; nothing when the diagnosis did not run."""
    if rep.diagnosis is None:
        return ""
    lines = diagnosis_lines(rep.diagnosis)
    rows = "".join(
        f'<tr class="{"fail" if d.explains else ""}"><td><code>{_esc(d.hypothesis)}</code></td><td>{_esc(d.sub_block)}</td>'
        f'<td>{_esc(", ".join(f"{k}={v}" for k, v in d.params.items()))}</td>'
        f'<td class="n">{_fmt(d.residual_ratio)}</td><td class="n">{_fmt(d.reference_ratio)}</td>'
        f'<td>{"explains" if d.explains else ""}</td></tr>' for d in rep.diagnosis)
    table = ('<table><tr><th>hypothesis</th><th>sub-block</th><th>fitted parameters</th><th>residual err/tol</th>'
             f'<th>reference err/tol</th><th></th></tr>{rows}</table>') if rep.diagnosis else ""
    return (f'<h2 style="font-size:16px">Diagnosis</h2><p>{"<br>".join(_esc(x) for x in lines)}</p>{table}'
            '<p class="meta">Each hypothesis is a defect of the catalog run on the engine\'s own input to the '
            'sub-block, its magnitude m fitted; residual: the engine against it, in units of the local tolerance '
            '(≤ 1: within honest noise). It explains the engine only within noise and clearly (2×) better than the '
            'reference and the runner-up (docs/diagnosis.md).</p>')


def _headline(rep: Report) -> str:
    """The sentence under the verdict: the culprit, else the first divergence, else why not a pass."""
    s, culprit, first = rep.summary, rep.culprit, rep.first_divergence
    if rep.verdict == Verdict.CRASH:
        c, d = rep.crash or {}, (rep.crash or {}).get("delivered") or {}
        return (f'The engine crashed (<b>{_esc(c.get("kind"))}</b>) in {_esc(c.get("phase"))}: {_esc(c.get("detail"))}. '
                f'It delivered {d.get("sequences", 0)} of {d.get("of", "?")} sequence(s) before it died; '
                f'{s.compared} point(s) judged on those, {s.failed} failed, {s.missing} missing — not a pass.')
    if rep.verdict == Verdict.FAIL and culprit:
        within = phase_words(culprit.phase)
        headline = (f'Culprit: <code>{_esc(culprit.name)}</code> — its own error is '
                    f'{_fmt(culprit.local_ratio)}× the local tolerance when fed the engine\'s own input'
                    + (f' (teacher-forced within {within})' if within else '') + '.')
        if first and first["name"] != culprit.name:
            headline += f' The first point over tolerance was <code>{_esc(first["name"])}</code>.'
        return headline
    if rep.verdict == Verdict.FAIL:
        return (f'First divergence: <code>{_esc(first["name"])}</code>. '
                + ("No sub-block exceeds its local tolerance: accumulated drift." if rep.teacher_forcing == "run"
                   else "Teacher forcing was not run."))
    if rep.verdict == Verdict.INCOMPLETE:
        return (f'Incomplete: no compared point fails, but {s.missing} required point(s) are missing '
                f'— not a pass.')
    if rep.verdict == Verdict.PASS:
        wr = s.worst_ratio or {}
        return f'All {s.compared} compared points within tolerance; worst error/tolerance {_fmt(wr.get("ratio"))} at <code>{_esc(wr.get("name"))}</code>.'
    return "Nothing was compared."


def _by_severity(points: list) -> list:
    """Failing points first, worst first; the rest in model order."""
    return sorted(points, key=lambda p: (p.verdict != Verdict.FAIL,
                                         -(p.finite_ratio or 0) if p.verdict == Verdict.FAIL else 0))


def _point_row(p) -> str:
    m, t, loc = p.metrics or {}, p.tolerance or {}, p.finite_local or {}
    if p.kind == "index" and m:
        err = f'{m.get("genuine")} genuine / {m.get("tie_explained")} near-tie'
        tol = f'tie margin {_fmt(t.get("tie_margin_rel"))}'
    else:
        err = _fmt(m.get("rel_l2"))
        tol = _fmt(t.get("value"))
    role = loc.get("role") or (f'local {_fmt(loc.get("ratio"))}' if loc.get("ratio") is not None else "")
    return (f'<tr class="{_esc(p.verdict)}"><td><code>{_esc(p.name)}</code></td>'
            f'<td><span class="badge" style="background:{_COLOR[p.verdict]}">{_esc(p.verdict)}</span></td>'
            f'<td class="n">{_fmt(p.finite_ratio)}</td><td class="n">{err}</td><td class="n">{tol}</td>'
            f'<td class="n">{_fmt(m.get("norm_ratio"), ".5f") if "norm_ratio" in m else "–"}</td>'
            f'<td>{_esc(role)}</td><td>{_esc(p.reason)}</td></tr>')


def render(rep: Report) -> str:
    """The page of a Report."""
    verdict, s, headline = rep.verdict, rep.summary, _headline(rep)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>corruptcheck {_esc(verdict)} · {_esc(rep.engine)} · {_esc(rep.case)}</title>
<style>
body{{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222;max-width:1200px}}
.verdict{{display:inline-block;padding:6px 16px;border-radius:6px;color:#fff;font-size:22px;font-weight:700;background:{_COLOR.get(verdict, "#555")}}}
h1{{font-size:20px;margin:0 0 8px 0}} .head{{display:flex;gap:16px;align-items:center}}
.headline{{font-size:17px;margin:14px 0;padding:10px 14px;border-left:5px solid {_COLOR.get(verdict, "#555")};background:#fafafa}}
table{{border-collapse:collapse;width:100%;font-size:13px}} td,th{{padding:3px 8px;border-bottom:1px solid #eee;text-align:left}}
td.n{{text-align:right;font-variant-numeric:tabular-nums}} tr.fail td{{background:#fff1f1}}
.badge{{color:#fff;padding:1px 7px;border-radius:10px;font-size:12px}} .meta{{color:#555;font-size:13px}}
code{{font-size:12.5px}}
</style></head><body>
<div class="head"><span class="verdict">{_esc(verdict.upper())}</span>
<h1>engine <code>{_esc(rep.engine)}</code> · case <code>{_esc(rep.case)}</code> · precision {_esc(rep.precision)}</h1></div>
<div class="headline">{headline}</div>
{_diagnosis(rep)}
<p class="meta">{s.compared} compared · {s.failed} failed · {s.missing} missing · {s.not_exercised} not exercised · {s.skipped} skipped ·
reference float64 ({_esc(rep.reference["source"])}) · tolerances from the {_esc(rep.tolerance_precision)} noise model ({_esc(rep.noise_model)})</p>
<h2 style="font-size:16px">Error / tolerance per point, in model order</h2>
{_plot(rep)}
<p class="meta">Filled dots: the engine against the free-running reference. Rings: the same point when the sub-block is fed the engine's own input (teacher forcing); a failing point whose ring is below the line only inherits drift.</p>
<h2 style="font-size:16px">Points</h2>
<table><tr><th>point</th><th>verdict</th><th>err/tol</th><th>error</th><th>tolerance</th><th>norm ratio</th><th>teacher forcing</th><th>note</th></tr>
{"".join(_point_row(p) for p in _by_severity(rep.points))}</table>
{_phases(rep)}
<h2 style="font-size:16px">Coverage</h2><p class="meta">{_esc(coverage_sentence(rep.coverage))}</p>
</body></html>
"""


def write_html(rep: Report, path: str) -> None:
    atomic_write(path, render(rep))

"""The self-test's HTML page: totals, then one row per fault run and per benign variant."""
from __future__ import annotations

from html import escape as html_escape

from corruptcheck.storage.atomic import atomic_write


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}th{background:#f2f2f2}"
        ".detected,.pass,.yes{color:#11772d}.missed,.flagged,.error,.no{color:#b00020;font-weight:bold}"
        ".not-exercised{color:#0b6b8a}code{font-size:12px}")


def _cell(v, cls: str = "") -> str:
    text = "-" if v is None or v == "" else (f"{v:.3g}" if isinstance(v, float) else str(v))
    return f'<td class="{cls}">{html_escape(text)}</td>'


def render_html(res) -> str:
    """The page of a selftest.SelftestResult."""
    t = res.totals()
    effects = {(e["fault"], e["case"]): e["effect_over_noise"] for e in res.bf16_effects()}
    rows = []
    for r in res.faults:
        ratio = effects.get((r.fault, r.case)) if r.precision == "bfloat16" else (
            r.effect / r.noise if r.effect is not None and r.noise else None)
        loc = None if r.localized is None else ("yes" if r.localized else "no")
        rows.append("<tr>" + "".join([
            _cell(r.fault), _cell(r.klass), _cell(r.case), _cell(r.precision),
            _cell(r.status, r.status.replace(" ", "-")), _cell(r.first), _cell(r.culprit), _cell(r.expected),
            _cell(loc, loc or ""), _cell(ratio), _cell(r.note)]) + "</tr>")
    benign = ["<tr>" + "".join([_cell(r.variant), _cell(r.case), _cell(r.precision), _cell(r.status, r.status),
                                _cell(r.worst_ratio), _cell(r.worst), _cell(r.note)]) + "</tr>" for r in res.benign]
    summary = []
    for prec in res.precisions:
        b = t[prec]
        summary.append(f"<li>{prec}: {b['detected']}/{b['exercised']} detected, {b['localized']}/{b['exercised']} "
                       f"localized ({b['localized_at_expected']} at the expected point), "
                       f"{b['not_exercised']} not exercised</li>")
    summary.append(f"<li>benign: {t['benign']['false_positives']} false positives in {t['benign']['runs']} runs</li>")
    head = ("<tr><th>fault</th><th>class</th><th>case</th><th>dtype</th><th>status</th><th>first failing point</th>"
            "<th>culprit</th><th>expected</th><th>loc</th><th>effect/noise</th><th>note</th></tr>")
    bhead = ("<tr><th>variant</th><th>case</th><th>dtype</th><th>status</th><th>worst err/tol</th><th>at</th>"
             "<th>note</th></tr>")
    verdict = '<span class="pass">PASS</span>' if res.ok else '<span class="flagged">FAIL</span>'
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>corruptcheck selftest</title>"
            f"<style>{_CSS}</style></head><body><h1>corruptcheck selftest · engine {html_escape(res.engine)} · "
            f"{verdict}</h1><ul>{''.join(summary)}</ul><h2>faults</h2><table>{head}{''.join(rows)}</table>"
            f"<h2>benign variants</h2><table>{bhead}{''.join(benign)}</table></body></html>")


def write_html(res, path: str) -> None:
    atomic_write(path, render_html(res))

"""Verdicts by serving phase: every token row of a served run carries the phase that produced
it — ("prefill", chunk j) or ("decode", step k) — and each phase is judged on its own rows with
the same tolerances, so a failure confined to decode (or to one chunk) reads as such.

Row labels of a point: token points use the token's label; compressed entries (`compressed_kv`,
`indexer_keys`) the label of the token that closed them (entry i of a block size m closes at
position (i+1)*m - 1); MTP rows (row i pairs token i with token i+1) the label of token i+1.
"""
from __future__ import annotations

import torch

from corruptcheck.judge.differ import compare_points
from corruptcheck.judge.results import Phase
from corruptcheck.points import MTP, layer_of
from corruptcheck.reference.model import ENTRY_POINTS
from corruptcheck.verdicts import JUDGED, Verdict

PHASE_ORDER = ("prefill", "decode")
MIN_MEASURED_TOKENS = 32  # phases at least this large are judged on their own measured noise


def _entry_ratio(cfg, name: str) -> int:
    if name.endswith("indexer_keys"):
        return cfg.csa_ratio
    layer = layer_of(name)
    return cfg.compress_ratio(cfg.num_layers if layer == MTP else layer)


def point_labels(cfg, name: str, rows: int, token_labels: list, seq_lens) -> list | None:
    """The (phase, index) label of every row of point `name`, or None when its rows are not
    tied to tokens (then it is judged on the whole run only)."""
    starts = [sum(seq_lens[:i]) for i in range(len(seq_lens))]
    if name.split(".")[-1] in ENTRY_POINTS:
        m = _entry_ratio(cfg, name)
        out = [token_labels[s0 + (i + 1) * m - 1] for s0, n in zip(starts, seq_lens) for i in range(n // m)]
    elif layer_of(name) == MTP:
        out = [token_labels[s0 + i] for s0, n in zip(starts, seq_lens) for i in range(1, n)]
    else:
        out = list(token_labels)
    return out if len(out) == rows else None


def _sequence_of(row: int, seq_lens) -> int:
    for i, n in enumerate(seq_lens):
        if row < n:
            return i
        row -= n
    return len(seq_lens) - 1


def label_key(label) -> str:
    return f"{label[0]}:{label[1]}"


def phase_rows(cfg, ref: dict, token_labels: list, seq_lens) -> dict:
    """{phase label: {point: row indices}} for every reference point whose rows are tied to
    tokens (`point_labels`); a point without rows in a phase is absent from it."""
    labels = sorted(set(token_labels), key=lambda lab: (PHASE_ORDER.index(lab[0]), lab[1]))
    out: dict = {lab: {} for lab in labels}
    for name, t in ref.items():
        plab = point_labels(cfg, name, t.shape[0] if t.dim() else -1, token_labels, seq_lens)
        if plab is None:
            continue
        for lab in labels:
            idx = [i for i, x in enumerate(plab) if x == lab]
            if idx:
                out[lab][name] = torch.tensor(idx)
    return out


def phase_noise(noise: dict | None, label, tokens: int) -> dict | None:
    """The noise model for judging one phase of `tokens` token rows.

    * A phase of >= MIN_MEASURED_TOKENS tokens (a prefill chunk) measured on its own rows
      (`noise.measure(..., groups=)`): per point the larger of that and the whole run's noise.
      With that many tokens the honest error of the phase is an average, like the run's.
    * A smaller phase (a decode step holds one token per sequence): the honest per-token worst
      cases of the whole run, which bound the error of any subset of tokens (a subset's rel_l2
      is at most its worst token's, sum d_t^2 <= max_t (d_t/r_t)^2 sum r_t^2, and its norm ratio
      lies between its tokens'). Measured on three tokens instead, honest runs drew err/tol up
      to 1.5 on `tiny`: a few tokens' error is not an average."""
    if noise is None:
        return None
    group = (noise.get("groups") or {}).get(label_key(label)) if tokens >= MIN_MEASURED_TOKENS else None
    return {**noise, "free": _phase_scope(noise.get("free", {}), group)}


def phase_local_noise(noise: dict | None, local: dict, group_key: str | None, tokens: int) -> dict:
    """The local (teacher-forced) noise entries `local` for judging one phase's rows: as
    `phase_noise`, from the local noise measured on the phase's own rows when the phase has
    >= MIN_MEASURED_TOKENS tokens, else the run's honest per-token worst cases."""
    groups = (noise or {}).get("groups_local") or {}
    group = groups.get(group_key) if group_key is not None and tokens >= MIN_MEASURED_TOKENS else None
    return _phase_scope(local, group)


def _phase_scope(whole: dict, group: dict | None) -> dict:
    """Per point the larger of the whole run's and the phase's measured noise, or without a
    measured phase the run's per-token worst cases."""
    if group is None:
        return per_token_bound(whole)
    return {name: larger_noise(n, group[name]) if name in group else n for name, n in whole.items()}


def larger_noise(a: dict | None, b: dict | None) -> dict:
    """Per metric the larger of two noise entries of one point."""
    a, b = a or {}, b or {}
    return {k: max(a.get(k, 0.0), b.get(k, 0.0)) for k in {**a, **b}}


def per_token_bound(entries: dict) -> dict:
    """Noise entries whose rel_l2 / norm deviation are the run's honest per-token worst cases:
    the bound for judging any subset of its tokens (see phase_noise)."""
    return {name: {**n, "rel_l2": n["token_rel"], "norm_dev": n.get("token_norm_dev", 0.0)} if "token_rel" in n else n
            for name, n in entries.items()}


def first_failing_phase(phases: list[Phase]) -> Phase | None:
    return next((p for p in phases if p.verdict == Verdict.FAIL), None)


def judge_phases(specs, ref: dict, engine: dict, rows_by_phase: dict, cfg, seq_lens, precision: str,
                 coverage: dict, noise: dict | None, skips: dict | None) -> tuple[list[Phase], dict]:
    """One Phase per phase label, in phase order: verdict, worst err/tol, first divergence (with
    the sequence = batch slot of its worst token), compared (point, token) pairs; and, per point
    that fails in some phase, {"ratio": its worst err/tol over the failing phases, "phase": the
    first failing Phase} (`fail_by_phase` folds it into the whole-run verdict)."""
    out, failures = [], {}
    for lab, rows_of in rows_by_phase.items():
        sub_ref = {n: ref[n][rows] for n, rows in rows_of.items()}
        sub_eng = {n: engine[n][rows] for n, rows in rows_of.items()
                   if n in engine and engine[n].dim() and engine[n].shape[0] == ref[n].shape[0]}
        tokens = len(rows_of["embed"]) if "embed" in rows_of else 0
        comp = compare_points([s for s in specs if s.name in sub_eng], sub_ref, sub_eng, precision, coverage,
                              phase_noise(noise, lab, tokens), skips)
        judged = [p for p in comp.points if p.verdict in JUDGED]
        worst = max((p for p in judged if p.ratio is not None), key=lambda p: p.ratio, default=None)
        first = comp.failed[0] if comp.failed else None
        first_divergence = None
        if first is not None:
            tok = first.metrics.get("worst_token", first.metrics.get("first_genuine_token"))
            rows = rows_of[first.name].tolist()
            row = rows[tok] if isinstance(tok, int) and 0 <= tok < len(rows) else None
            first_divergence = {"name": first.name, "layer": first.layer, "reason": first.reason,
                                "sequence": None if row is None else _sequence_of(
                                    _token_row(cfg, first.name, row, seq_lens), seq_lens)}
        entry = Phase(phase=lab[0], step=lab[1] if lab[0] == "decode" else None,
                      chunk=lab[1] if lab[0] == "prefill" else None, tokens=tokens,
                      verdict=Verdict.FAIL if comp.failed else Verdict.PASS,
                      worst_ratio=worst.finite_ratio if worst else None, worst_point=worst.name if worst else None,
                      pairs=sum(len(rows_of[p.name]) for p in judged), first_divergence=first_divergence,
                      failed_points=len(comp.failed) if first is not None else None)
        for p in comp.failed:
            f = failures.setdefault(p.name, {"ratio": p.ratio, "phase": entry})
            f["ratio"] = max(f["ratio"], p.ratio)
        out.append(entry)
    return out, failures


def phase_words(phase: dict | None) -> str:
    """'decode step 3' / 'prefill chunk 1' for a phase's {"phase", "step", "chunk"} (Phase.where;
    a culprit's phase), or ''."""
    if not phase:
        return ""
    return f"decode step {phase['step']}" if phase["phase"] == "decode" else f"prefill chunk {phase['chunk']}"


def fail_by_phase(comp, failures: dict) -> None:
    """A point is judged on the whole run and on every phase: one that passes the whole run but
    fails a phase (a decode-only error diluted among the prefill rows) fails, with the phase
    named. Never the other way round: a phase pass does not clear a whole-run failure."""
    for p in comp.points:
        f = failures.get(p.name)
        if f is None or p.verdict == Verdict.FAIL:
            continue
        whole = f"err/tol {p.ratio:.3g}" if p.ratio is not None else p.verdict
        p.reason = (f"within tolerance over the whole run ({whole}) but fails in {phase_words(f['phase'].where)} "
                    f"(err/tol {f['ratio']:.3g})")
        p.verdict, p.ratio = Verdict.FAIL, f["ratio"]


def _token_row(cfg, name: str, row: int, seq_lens) -> int:
    """The token row behind row `row` of a point (for naming its sequence)."""
    if name.split(".")[-1] in ENTRY_POINTS:
        m = _entry_ratio(cfg, name)
        for s0, n in zip([sum(seq_lens[:i]) for i in range(len(seq_lens))], seq_lens):
            if row < n // m:
                return s0 + (row + 1) * m - 1
            row -= n // m
    return row


def pairs_by_phase(phases: list[Phase]) -> dict:
    out = {k: 0 for k in PHASE_ORDER}
    for p in phases:
        out[p.phase] += p.pairs
    return out


def summarize(phases: list[Phase]) -> list[str]:
    """One line per phase kind, e.g. 'decode steps 1-16: FAIL from step 5 (first divergence
    layers.1.attn.out, sequence 2); worst err/tol 4.1'."""
    lines = []
    for kind in PHASE_ORDER:
        ps = [p for p in phases if p.phase == kind]
        if not ps:
            continue
        key = "chunk" if kind == "prefill" else "step"
        what = f"{kind} {'chunks' if kind == 'prefill' else 'steps'} {ps[0].label[1]}-{ps[-1].label[1]}"
        ratios = [p.worst_ratio for p in ps if p.worst_ratio is not None]
        worst = f"worst err/tol {max(ratios):.3g}" if ratios else "worst err/tol -"
        failing = [p for p in ps if p.verdict == Verdict.FAIL]
        if failing:
            f = failing[0].first_divergence or {}
            seq = f" in sequence {f['sequence']}" if f.get("sequence") is not None else ""
            only = "only " if len(failing) < len(ps) else ""
            lines.append(f"{what}: FAIL {only}at {len(failing)} of {len(ps)}, from {key} {failing[0].label[1]} "
                         f"(first divergence {f.get('name')}{seq}); {worst}")
        else:
            lines.append(f"{what}: pass ({sum(p.pairs for p in ps)} point-token pairs); {worst}")
    return lines

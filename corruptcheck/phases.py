"""Verdicts by serving phase: every token row of a served run carries the phase that produced
it — ("prefill", chunk j) or ("decode", step k) — and each phase is judged on its own rows with
the same tolerances, so a failure confined to decode (or to one chunk) reads as such.

Row labels of a point: token points use the token's label; compressed entries (`compressed_kv`,
`indexer_keys`) the label of the token that closed them (entry i of a block size m closes at
position (i+1)*m - 1); MTP rows (row i pairs token i with token i+1) the label of token i+1.
"""
from __future__ import annotations

import math

import torch

from corruptcheck.differ import compare_points
from corruptcheck.reference.model import ENTRY_POINTS

PHASE_ORDER = ("prefill", "decode")


def _entry_ratio(cfg, name: str) -> int:
    if name.endswith("indexer_keys"):
        return cfg.csa_ratio
    layer = name.split(".")[1]
    return cfg.compress_ratio(cfg.num_layers if name.startswith("mtp.") else int(layer))


def point_labels(cfg, name: str, rows: int, token_labels: list, seq_lens) -> list | None:
    """The (phase, index) label of every row of point `name`, or None when its rows are not
    tied to tokens (then it is judged on the whole run only)."""
    starts = [sum(seq_lens[:i]) for i in range(len(seq_lens))]
    if name.split(".")[-1] in ENTRY_POINTS:
        m = _entry_ratio(cfg, name)
        out = [token_labels[s0 + (i + 1) * m - 1] for s0, n in zip(starts, seq_lens) for i in range(n // m)]
    elif name.startswith("mtp."):
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


def subset_noise(noise: dict | None) -> dict | None:
    """The noise model for judging a subset of tokens: a subset's honest rel_l2 is at most the
    honest worst token's (sum d_t^2 <= max_t (d_t/r_t)^2 sum r_t^2), and its norm ratio lies
    between its tokens' (a weighted RMS of them), so the per-token worst cases bound any phase.
    Points measured without them keep their whole-run noise (named in the derivation)."""
    if noise is None:
        return None
    free = {}
    for name, n in noise.get("free", {}).items():
        if "token_rel" in n:
            free[name] = {"rel_l2": n["token_rel"], "norm_dev": n.get("token_norm_dev", 0.0)}
        else:
            free[name] = n
    return {**noise, "free": free}


def judge_phases(specs, ref: dict, engine: dict, token_labels: list, cfg, seq_lens, precision: str,
                 coverage: dict, noise: dict | None, skips: dict | None) -> list[dict]:
    """One entry per phase label, in phase order: verdict, worst err/tol, first divergence (with
    the sequence = batch slot of its worst token), compared (point, token) pairs. Tolerances
    bound the honest error of any subset of tokens (`subset_noise`)."""
    noise = subset_noise(noise)
    labels = sorted(set(token_labels), key=lambda lab: (PHASE_ORDER.index(lab[0]), lab[1]))
    per_point = {}
    for name in set(ref) & set(engine):
        lab = point_labels(cfg, name, engine[name].shape[0] if engine[name].dim() else 0, token_labels, seq_lens)
        if lab is not None:
            per_point[name] = lab
    token_rows = {lab: [i for i, t in enumerate(token_labels) if t == lab] for lab in labels}
    out = []
    for lab in labels:
        sub_ref, sub_eng, rows_of = {}, {}, {}
        for name, plab in per_point.items():
            idx = [i for i, x in enumerate(plab) if x == lab]
            if not idx:
                continue  # e.g. no entry closed in this phase
            sel = torch.tensor(idx)
            sub_ref[name], sub_eng[name], rows_of[name] = ref[name][sel], engine[name][sel], idx
        for name in set(ref) - set(engine):  # reference-only tie scores ride along with their points
            plab = point_labels(cfg, name, ref[name].shape[0], token_labels, seq_lens) if ref[name].dim() else None
            if plab is not None:
                idx = [i for i, x in enumerate(plab) if x == lab]
                if idx:
                    sub_ref[name] = ref[name][torch.tensor(idx)]
        comp = compare_points([s for s in specs if s.name in sub_eng], sub_ref, sub_eng, precision, coverage, noise,
                              skips)
        judged = [p for p in comp.points if p.verdict in ("pass", "fail", "not-exercised")]
        worst = max((p for p in judged if p.ratio is not None), key=lambda p: p.ratio, default=None)
        first = comp.failed[0] if comp.failed else None
        entry = {"phase": lab[0], "step": lab[1] if lab[0] == "decode" else None,
                 "chunk": lab[1] if lab[0] == "prefill" else None, "tokens": len(token_rows[lab]),
                 "verdict": "fail" if comp.failed else "pass",
                 "worst_ratio": None if worst is None or not math.isfinite(worst.ratio) else worst.ratio,
                 "worst_point": worst.name if worst else None,
                 "pairs": sum(len(rows_of[p.name]) for p in judged),
                 "first_divergence": None}
        if first is not None:
            tok = first.metrics.get("worst_token", first.metrics.get("first_genuine_token"))
            row = rows_of[first.name][tok] if isinstance(tok, int) and 0 <= tok < len(rows_of[first.name]) else None
            entry["first_divergence"] = {"name": first.name, "layer": first.layer, "reason": first.reason,
                                         "sequence": None if row is None else _sequence_of(
                                             _token_row(cfg, first.name, row, seq_lens), seq_lens)}
            entry["failed_points"] = len(comp.failed)
        out.append(entry)
    return out


def _token_row(cfg, name: str, row: int, seq_lens) -> int:
    """The token row behind row `row` of a point (for naming its sequence)."""
    if name.split(".")[-1] in ENTRY_POINTS:
        m = _entry_ratio(cfg, name)
        for s0, n in zip([sum(seq_lens[:i]) for i in range(len(seq_lens))], seq_lens):
            if row < n // m:
                return s0 + (row + 1) * m - 1
            row -= n // m
    return row


def pairs_by_phase(phases: list[dict]) -> dict:
    out = {k: 0 for k in PHASE_ORDER}
    for p in phases:
        out[p["phase"]] += p["pairs"]
    return out


def summarize(phases: list[dict]) -> list[str]:
    """One line per phase kind, e.g. 'decode steps 1-16: FAIL from step 5 (first divergence
    layers.1.attn.out, sequence 2); worst err/tol 4.1'."""
    lines = []
    for kind in PHASE_ORDER:
        ps = [p for p in phases if p["phase"] == kind]
        if not ps:
            continue
        key = "chunk" if kind == "prefill" else "step"
        what = f"{kind} {'chunks' if kind == 'prefill' else 'steps'} {ps[0][key]}-{ps[-1][key]}"
        ratios = [p["worst_ratio"] for p in ps if p["worst_ratio"] is not None]
        worst = f"worst err/tol {max(ratios):.3g}" if ratios else "worst err/tol -"
        failing = [p for p in ps if p["verdict"] == "fail"]
        if failing:
            f = failing[0]["first_divergence"] or {}
            seq = f" in sequence {f['sequence']}" if f.get("sequence") is not None else ""
            only = "only " if len(failing) < len(ps) else ""
            lines.append(f"{what}: FAIL {only}at {len(failing)} of {len(ps)}, from {key} {failing[0][key]} "
                         f"(first divergence {f.get('name')}{seq}); {worst}")
        else:
            lines.append(f"{what}: pass ({sum(p['pairs'] for p in ps)} point-token pairs); {worst}")
    return lines

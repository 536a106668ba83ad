"""The reference's incremental path: one sequence fed in chunks (chunked prefill, then decode
steps of one token), carrying the state a serving engine carries — the KV rows, the KV
compressor's open block and last closed half-block, the indexer compressor's, the compressed
entries and indexer keys so far, and, for the MTP block, the previous chunk's last main-model
stream.

`forward_chunks` must reproduce the full forward (`model.forward_sequence`) at every point, for
any chunking: causality makes the full forward over the whole sequence the truth for every
step, and this path is the proof that the decode-time state is the state the definition
implies (docs/v4-spec.md §12.3, extended from the compressor to the whole model). Entry points
(`compressed_kv`, `indexer_keys`) are recorded as the entries that close in each chunk; indexer
scores of a chunk cover the entries so far (the concatenation pads them, as across sequences).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention import (attend_and_project, available_at, chosen_entries, indexer_keys_sims, kv_cache_sims, layer_rope,
                        project_kv, project_q, score_entries, select_topk, sub, window_mask_at)
from .compressor import IncrementalCompressor
from .config import ModelConfig
from .model import Recorder, _concat, attention_sublayer, cast_params, ffn_sublayer, head, rope_tables
from .precision import Precision
from .primitives import linear, rms_norm, rope_angles


@dataclass
class AttentionState:
    """What one attention layer keeps between steps of one sequence."""
    kv: torch.Tensor | None = None  # [P, hd] every position so far (the window is a mask)
    compressor: IncrementalCompressor | None = None
    entries: torch.Tensor | None = None  # [n, dc] compressed entries so far
    indexer: IncrementalCompressor | None = None
    indexer_keys: torch.Tensor | None = None  # [n, d_index]


@dataclass
class SequenceState:
    pos: int = 0  # tokens consumed
    layers: dict = field(default_factory=dict)  # layer id -> AttentionState
    last_stream: torch.Tensor | None = None  # [n, D] main-model output at position pos-1 (MTP input)
    last_id: int | None = None


def _cat(prev, new):
    return new if prev is None else torch.cat([prev, new], 0)


def _new_entries(x, p: dict, ratio: int, overlap: bool, cfg: ModelConfig, freqs, prec: Precision, sims,
                 comp: IncrementalCompressor | None) -> tuple:
    """(the compressor, created on first use; the entries [m, dc] that close in chunk x [S, D])."""
    if comp is None:
        comp = IncrementalCompressor(p, ratio=ratio, overlap=overlap, norm_eps=cfg.rms_eps, freqs=freqs,
                                     rope_dim=cfg.rope_dim, prec=prec, sims=sims)
    return comp, comp.feed(x)


def _indexer_step(x, qr, p: dict, cfg: ModelConfig, freqs, angles, q_pos, prec: Precision, sims: bool, rec,
                  state: AttentionState, n: int) -> torch.Tensor:
    """CSA: [S, n] bool, the entries the indexer picks for the chunk's queries at q_pos."""
    ip = sub(p, "indexer")
    state.indexer, new_keys = _new_entries(x, sub(ip, "compressor"), cfg.csa_ratio, True, cfg, freqs, prec,
                                           indexer_keys_sims(prec, sims), state.indexer)
    rec("indexer_keys", new_keys)
    state.indexer_keys = _cat(state.indexer_keys, new_keys)  # [n, d_index]
    scores = score_entries(x, qr, ip, cfg, angles, state.indexer_keys, q_pos, prec, sims)  # [S, n]
    rec("indexer_scores", scores)
    topk = select_topk(scores, cfg.index_topk, cfg.csa_ratio, q_pos)  # [S, index_topk]
    rec("indexer_topk", topk)
    return chosen_entries(topk, n)


def _compressed_step(x, qr, p: dict, layer: int, cfg: ModelConfig, freqs, angles, q_pos, prec: Precision,
                     sims: bool, rec, state: AttentionState) -> torch.Tensor:
    """CSA / HCA: feed the chunk to the compressor(s); returns which of the entries so far
    [n, dc] each query attends ([S, n] bool)."""
    kind, ratio = cfg.layer_type(layer), cfg.compress_ratio(layer)
    state.compressor, new = _new_entries(x, sub(p, "compressor"), ratio, kind == "csa", cfg, freqs, prec,
                                         kv_cache_sims(prec, sims), state.compressor)
    rec("compressed_kv", new)
    state.entries = _cat(state.entries, new)  # [n, dc]
    n = state.entries.shape[0]
    if kind == "csa":
        return _indexer_step(x, qr, p, cfg, freqs, angles, q_pos, prec, sims, rec, state, n)
    return available_at(q_pos, n, ratio)


def attention_step(x, p: dict, layer: int, cfg: ModelConfig, tables: dict, prec: Precision, sims: bool, rec, *,
                   state: AttentionState, start: int):
    """`attention.attention` for the tokens at positions start..start+S-1 of a sequence whose
    earlier positions are summarised in `state` (updated in place)."""
    s = x.shape[0]
    kind, freqs = layer_rope(cfg, layer, tables)
    q_pos = torch.arange(start, start + s)
    angles = rope_angles(q_pos, freqs, prec.policy.rope_iterated)  # [S, rd/2]
    qr, q = project_q(x, p, cfg, angles, prec, rec)
    state.kv = _cat(state.kv, project_kv(x, p, cfg, angles, prec, sims, rec))  # [P, hd], every position so far
    keys, allow = state.kv, window_mask_at(q_pos, torch.arange(state.kv.shape[0]), cfg.window)  # [S, P]
    if kind != "sliding":
        visible = _compressed_step(x, qr, p, layer, cfg, freqs, angles, q_pos, prec, sims, rec, state)  # [S, n]
        keys, allow = torch.cat([state.kv, state.entries], 0), torch.cat([allow, visible], 1)
    return attend_and_project(q, keys, allow, angles, p, cfg, prec, rec)


def _attend(state: SequenceState, layer, start: int):
    lstate = state.layers.setdefault(layer, AttentionState())

    def attend(x, p, layer_id, cfg, tables, prec, sims, rec):
        return attention_step(x, p, layer_id, cfg, tables, prec, sims, rec, state=lstate, start=start)
    return attend


def feed(cfg: ModelConfig, p: dict, state: SequenceState, ids: torch.Tensor, prec: Precision, *, sims=False,
         mtp=True, rec: Recorder | None = None) -> torch.Tensor:
    """Run the next `ids` of one sequence through the model (p: cast parameters). Returns the
    logits [S, vocab] of these positions; records every point of them."""
    rec = rec or Recorder(None)
    tables = rope_tables(cfg)
    start, s = state.pos, ids.shape[0]
    e = p["embed.weight"][ids].to(prec.act)
    rec("embed", e)
    x = e[:, None, :].expand(s, cfg.hc_mult, cfg.hidden_size).contiguous()
    for layer in range(cfg.num_layers):
        lp = sub(p, f"layers.{layer}")
        lrec = rec.child(f"layers.{layer}")
        x = attention_sublayer(x, lp, layer, cfg, tables, prec, sims, lrec, attend=_attend(state, layer, start))
        x = ffn_sublayer(x, ids, lp, layer, cfg, prec, lrec)
    logits = head(x, p, "", cfg, prec, rec)
    if mtp and cfg.num_mtp_layers:
        _mtp_feed(cfg, p, state, ids, x, tables, prec, sims, rec.child("mtp.0"))
    state.pos += s
    state.last_stream, state.last_id = x[-1:], int(ids[-1])
    return logits


def _mtp_feed(cfg, p, state: SequenceState, ids, x_main, tables, prec, sims, rec):
    """MTP row i pairs the main stream at i with token i+1, so a chunk at positions [a, b)
    completes rows [a-1, b-1): the first from the previous chunk's last stream."""
    if state.last_stream is not None:
        x_main, ids_prev = torch.cat([state.last_stream, x_main]), ids
    else:
        x_main, ids_prev = x_main, ids[1:]
    x_main = x_main[: ids_prev.shape[0]]
    if ids_prev.shape[0] == 0:
        return
    m = sub(p, "mtp.0")
    e = rms_norm(p["embed.weight"][ids_prev].to(prec.act), m["enorm.weight"], cfg.rms_eps, prec.acc)
    xh = rms_norm(x_main, m["hnorm.weight"], cfg.rms_eps, prec.acc)
    k, r = prec.policy.split_k, prec.policy.bf16_linear_in
    x = linear(e, m["e_proj.weight"], k, r)[:, None, :] + linear(xh, m["h_proj.weight"], k, r)  # [R, n, D]
    rec("in", x)
    start = max(state.pos - 1, 0)
    layer = cfg.num_layers
    x = attention_sublayer(x, m, layer, cfg, tables, prec, sims, rec, attend=_attend(state, "mtp.0", start))
    x = ffn_sublayer(x, ids_prev, m, layer, cfg, prec, rec)
    head(x, {**m, "head.weight": p["head.weight"]}, "", cfg, prec, rec)


def forward_chunks(cfg: ModelConfig, params: dict, ids, chunks, precision="float64", *, sims=False,
                   mtp=True) -> dict:
    """Every point of one sequence fed as `chunks` (sizes summing to its length), concatenated
    in position order — the layout of `model.run` for that sequence."""
    prec = Precision.of(precision)
    p = cast_params(params, prec)
    ids = torch.as_tensor(ids, dtype=torch.long)
    if sum(chunks) != ids.shape[0] or any(c < 1 for c in chunks):
        raise ValueError(f"chunks {list(chunks)} do not partition a sequence of {ids.shape[0]} tokens")
    return serve(cfg, params, ids, chunks, 0, precision, sims=sims, mtp=mtp)[0]


def serve(cfg: ModelConfig, params: dict, prompt, chunks, decode_steps: int, precision="float64", *, sims=False,
          mtp=True) -> tuple[dict, list]:
    """Serve one prompt as an engine would: prefill in `chunks`, then `decode_steps` greedy
    steps of one token each (argmax of the last logits). Returns (every point of every fed token,
    in position order; the token ids fed)."""
    prec = Precision.of(precision)
    p = cast_params(params, prec)
    ids = torch.as_tensor(prompt, dtype=torch.long)
    if sum(chunks) != ids.shape[0] or any(c < 1 for c in chunks):
        raise ValueError(f"chunks {list(chunks)} do not partition a prompt of {ids.shape[0]} tokens")
    state, stores, fed, at = SequenceState(), [], ids.tolist(), 0
    with torch.no_grad():
        steps = [ids[at:at + c] for at, c in zip([sum(chunks[:i]) for i in range(len(chunks))], chunks)]
        for k in range(len(steps) + decode_steps):
            if k >= len(steps):
                fed.append(int(logits[-1].argmax()))
                step = torch.tensor(fed[-1:])
            else:
                step = steps[k]
            store: dict = {}
            logits = feed(cfg, p, state, step, prec, sims=sims, mtp=mtp, rec=Recorder(store))
            stores.append(store)
    names = dict.fromkeys(n for st in stores for n in st)
    return {n: _concat([st[n] for st in stores if n in st]) for n in names}, fed

"""Faults only a served model shows: each is silent in a prefill-only compare (one forward per
sequence, no carried state) and fires under a schedule (schedule.py) — chunked prefill, decode
steps, carried caches, batches of decode steps. Each is re-enacted twice, in the engine's own
code: in transformers' cache classes (`DeepseekV4HCACache`) and attention for `hf`, and in vLLM's
CPU DeepSeek V4 (`vllm/models/deepseek_v4/cpu/`: its compressor, its sparse attention's slot
maps, its output projection) for `vllm`, where the real scheduler decides what shares a step
(tests/test_served.py, tests/test_vllm_engine.py).

A fifth family, a scale or layout bug that fires only when a decode step holds more than one
sequence (batch > 1; "M=1 remains exactly unchanged"), needs an engine that batches sequences in
one step: transformers serves one sequence at a time, so it is vLLM's only.

vLLM's step composition is read where its kernels read it, from the forward context's
attention metadata (`num_decodes` / `num_prefills`, `token_to_req_indices`): vLLM orders a
step's rows decodes first.
"""
from __future__ import annotations

import torch

from corruptcheck.engines.patching import lerp, patched
from corruptcheck.faults.base import Fault, affected, hf_module


class ServingFault(Fault):
    engines = ("hf", "vllm")
    served = True


def _vllm():
    from corruptcheck.faults import vllm as vllm_faults

    return vllm_faults


def _step_metadata(attn):
    """vLLM's sliding-window metadata for this attention layer in the running step (None in
    warm-up / profile runs, which carry no metadata)."""
    from vllm.forward_context import get_forward_context

    md = get_forward_context().attn_metadata
    return md.get(attn.swa_cache_layer.prefix) if isinstance(md, dict) else None


def _step_start(positions: torch.Tensor, req_idx: torch.Tensor) -> torch.Tensor:
    """Per token: the first position its request runs in this step (rows before it were cached
    by earlier steps)."""
    n = int(req_idx.max()) + 1 if req_idx.numel() else 0
    first = torch.full((n,), torch.iinfo(torch.int64).max, dtype=torch.int64)
    first.scatter_reduce_(0, req_idx.long(), positions.long(), "amin")
    return first[req_idx.long()]


# the knobs' arithmetic (docs/faults.md §Magnitude knobs): these patch stateful cache code, so
# each scales what it writes or how many rows it touches inside its own patch

def drop_oldest(buffered: torch.Tensor, m: float) -> torch.Tensor | None:
    """The compressor's open block [B, n, ...] after losing its oldest round(m·n) tokens (None at
    m = 1: all of it)."""
    if m == 1:
        return None
    return buffered[:, int(round(m * buffered.shape[1])):]


def restarted_positions(positions: torch.Tensor, start: torch.Tensor, shift: torch.Tensor, m: float) -> torch.Tensor:
    """Positions of the `shift` tokens counted from round(m·start) before their chunk's start
    (from the chunk start itself at m = 1)."""
    back = start if m == 1 else torch.round(m * start.to(torch.float64)).to(start.dtype)
    return torch.where(shift, positions - back, positions)


def wrapped_oldest(keys: torch.Tensor, m: float) -> torch.Tensor:
    """The window's key rows [B, H, W, D] with the oldest (row 0) overwritten by
    old + m·(newest − old) (by the newest at m = 1)."""
    keys = keys.clone()
    keys[:, :, 0] = lerp(keys[:, :, 0], keys[:, :, -1], m)
    return keys


def row_scaled(out: torch.Tensor, o: torch.Tensor, n: int, m: float) -> torch.Tensor:
    """Decode rows 0..n-1 of `out` rescaled as if dequantized with row 0's activation scale:
    row i × (1 + m·(amax₀/amaxᵢ − 1)) (amax over the rows of `o`)."""
    amax = o[:n].float().abs().flatten(1).amax(-1).clamp_min(1e-30)
    out = out.clone()
    out[:n] = (out[:n].float() * lerp(torch.ones_like(amax), amax[0] / amax, m)[:, None]).to(out.dtype)
    return out


def _tokens_in_step(req_idx: torch.Tensor) -> torch.Tensor:
    """Per token: how many tokens its request runs in this step (1 = a decode step)."""
    counts = torch.bincount(req_idx.long())
    return counts[req_idx.long()]


class CompressorTailLostAtChunk(ServingFault):
    """A KV compressor loses its carried state when a new prefill chunk arrives, as when a
    compressor is called per chunk without its state or without the sequence lengths (cf. the C4
    compressor called without them, wrong from the 4th token). In transformers an HCA layer's
    compressor drops its open block (tokens since the last closed block), so later blocks close
    at the wrong tokens; in vLLM the main compressors count the chunk's positions from 0. Silent
    without chunking: a single prefill starts with an empty state at position 0."""
    name = "compressor-tail-lost-at-chunk"
    klass = "S1"
    summary = "compressor state lost at a prefill chunk boundary (hf: buffer dropped; vLLM: positions restart)"
    trigger = "chunked prefill with a chunk that splits a compression block"
    # fewer entries fail `compressed_kv` on their count, so teacher forcing names the attention core;
    # vLLM's compressors run inside its opaque attention op: its output is the first point it shows
    points = ("attn.compressed_kv", "attn.core", "attn.out")
    knob = "hf: the oldest round(m·n) of the n buffered tokens lost; vLLM: positions restart round(m·start) back"

    def hf(self, p, state, cfg):
        M = hf_module()
        m = self.magnitude

        def make(orig):
            def store(self_c, name, kv, gate):
                buffered = self_c.buffer_kv.get(name)
                hca = type(self_c) is M.DeepseekV4HCACache  # (in CSA the indexer would then outnumber it)
                if hca and kv.shape[1] > 1 and buffered is not None and buffered.shape[1]:
                    state.hit()
                    self_c.buffer_kv[name] = drop_oldest(buffered, m)
                    self_c.buffer_gate[name] = drop_oldest(self_c.buffer_gate[name], m)
                return orig(self_c, name, kv, gate)
            return store
        p.wrap(M.DeepseekV4HCACache, "store_compression_weights", make)

    def vllm(self, p, state, cfg):
        """vLLM's compressors (main attention, head_dim 512: CSA and HCA) are called, for a
        request running several tokens in a step that starts past its first token (a later
        prefill chunk), with positions counted from the chunk's start: the compressor is not
        told where the chunk sits in the sequence (the C4 compressor called without the
        sequence lengths). Its partial state, block closings, APE rows and gathered windows then
        line up with the wrong tokens. A single prefill starts at position 0: nothing shifts."""
        V = _vllm()
        C = V.vllm_module(V.CPU_COMPRESSOR)

        def make(orig):
            def forward(self_c, kv_score, positions, rotary_emb):
                md = _compressor_metadata(self_c)
                if md is None or self_c.head_dim != 512:
                    return orig(self_c, kv_score, positions, rotary_emb)
                req = md.token_to_req_indices[: positions.shape[0]]
                start = _step_start(positions, req)
                shift = (_tokens_in_step(req) > 1) & (start > 0)
                if not bool(shift.any()):
                    return orig(self_c, kv_score, positions, rotary_emb)
                state.hit()
                return orig(self_c, kv_score, restarted_positions(positions, start, shift, self.magnitude), rotary_emb)
            return forward
        p.wrap(C.DeepseekV4CPUCompressor, "forward", make)


class WindowWrapsEarly(ServingFault):
    """The sliding-window ring buffer wraps one slot early: the newest key row overwrites the
    oldest one a query may still see, so once the cache, not the mask, bounds the window — from
    the prefill chunk whose queries reach back that far, and at every decode step — the oldest
    key in the window is a copy of the newest. Silent in one prefill: the whole prompt's keys
    are in that forward."""
    name = "window-wraps-early"
    klass = "S2"
    summary = "sliding-window KV ring buffer wraps one slot early"
    trigger = "a later prefill chunk or a decode step beyond the window"
    points = ("attn.core", "attn.out")
    knob = "hf: the oldest key becomes old + m·(newest − old); vLLM: the fraction m of queries (by position) misread"

    def hf(self, p, state, cfg):
        M = hf_module()

        def make(orig):
            def update(self_c, key_states, value_states, *args, **kwargs):
                full, _ = orig(self_c, key_states, value_states, *args, **kwargs)
                if self_c.keys.shape[-2] >= self_c.sliding_window - 1:
                    keys = wrapped_oldest(self_c.keys, self.magnitude)
                    self_c.keys = self_c.values = keys
                    state.hit()
                return full, full
            return update
        p.wrap(M.DeepseekV4HCACache, "update", make)

    def vllm(self, p, state, cfg):
        """vLLM's sparse attention gathers each query's window [p-w+1, p] through the request's
        block table; once the window is full and its oldest row was cached by an earlier step,
        that slot is read from the newest row's (the ring wrote one slot early). One key of a
        128-key window: on flash-engine at fp8-serving it sits at the edge of the honest FP8
        KV-cache noise (measured err/tol 1.17 in the prefill chunk after the boundary)."""
        V = _vllm()
        S = V.vllm_module(V.CPU_SPARSE)

        def wrap_oldest(orig_map, start, window):
            calls = []

            def map_slots(local, req_idx, block_table, block_size):
                slots = orig_map(local, req_idx, block_table, block_size)
                calls.append(1)
                if len(calls) > 1 or local.shape[-1] != window:  # the second call maps compressed entries
                    return slots
                hit = (local[:, 0] >= 0) & (local[:, 0] < start)
                if self.magnitude != 1:  # the query's own position closes its window
                    hit &= affected(local[:, -1], self.magnitude)
                if bool(hit.any()):
                    state.hit()
                    slots = slots.clone()
                    slots[hit, 0] = slots[hit, -1]
                return slots
            return map_slots

        def make(orig):
            def forward_mqa(self_a, q, kv, positions, output):
                md = _step_metadata(self_a)
                if md is None:
                    return orig(self_a, q, kv, positions, output)
                start = _step_start(positions, md.token_to_req_indices[: positions.shape[0]])
                with patched() as p2:
                    p2.wrap(S, "map_local_to_global_slots_cpu", lambda o: wrap_oldest(o, start, self_a.window_size))
                    return orig(self_a, q, kv, positions, output)
            return forward_mqa
        p.wrap(S.DeepseekV4CPUAttention, "forward_mqa", make)


class StaleIndexerRows(ServingFault):
    """In decode, entries the indexer's compressor closes are not appended to the indexer's key
    cache (cf. vLLM #50576, indexer cache layout misread: "fluent output, wrong top-k"): a
    decode query cannot select the newest compressed entries. Silent in prefill: the keys of a
    multi-token forward are appended."""
    name = "stale-indexer-rows"
    klass = "S3"
    summary = "indexer key cache not updated by decode steps"
    trigger = "a decode step that closes a CSA block"
    points = ("attn.indexer_topk",)
    knob = "the fraction m of decode-closed indexer entries left out (hf: by entry index; vLLM: by position)"

    def hf(self, p, state, cfg):
        M = hf_module()
        m = self.magnitude
        fed: dict = {}

        def make_store(orig):
            def store(self_c, name, kv, gate):
                fed[id(self_c), name] = kv.shape[1]
                return orig(self_c, name, kv, gate)
            return store

        def make_update(orig):
            def update(self_c, name, compressed):
                if name == "indexer" and fed.get((id(self_c), name)) == 1 and compressed.shape[1] > 0:
                    state.hit()
                    n = compressed.shape[1]
                    if m == 1:
                        self_c.entry_count[name] += n
                        return self_c.compressed_kv[name]
                    kept = compressed[:, ~affected(self_c.entry_count[name] + torch.arange(n), m)]
                    self_c.entry_count[name] += n - kept.shape[1]  # the lost ones are counted all the same
                    return orig(self_c, name, kept)
                return orig(self_c, name, compressed)
            return update
        p.wrap(M.DeepseekV4HCACache, "store_compression_weights", make_store)
        p.wrap(M.DeepseekV4HCACache, "update_compressor_states", make_update)

    def triggered(self, cfg, seq_lens, engine):
        # vLLM reads its indexer's key cache only when a sequence has more compressed entries
        # than the top-k (below that its short-context path selects every entry)
        if engine == "vllm":
            return max(seq_lens) // cfg.csa_ratio > cfg.index_topk
        return True

    def vllm(self, p, state, cfg):
        """vLLM's indexer compressor (head_dim 128) stores the entries it closes into the
        indexer's FP8 key cache; for a request in a decode step (one token) the store's slot is
        dropped (-1), so the cache keeps its stale rows."""
        V = _vllm()
        C = V.vllm_module(V.CPU_COMPRESSOR)

        def skip_decode_rows(orig_store, decode, positions, ratio):
            def store(state_cache, gather, pos, k_slots, *rest):
                pos = positions[: k_slots.shape[0]]
                drop = decode[: k_slots.shape[0]] & ((pos + 1) % ratio == 0) & (k_slots >= 0)
                if self.magnitude != 1:
                    drop &= affected(pos, self.magnitude)
                if bool(drop.any()):
                    state.hit()
                    k_slots = torch.where(drop, torch.full_like(k_slots, -1), k_slots)
                return orig_store(state_cache, gather, pos, k_slots, *rest)
            return store

        def make(orig):
            def forward(self_c, kv_score, positions, rotary_emb):
                md = _compressor_metadata(self_c)
                if md is None or self_c.head_dim != 128:
                    return orig(self_c, kv_score, positions, rotary_emb)
                decode = _tokens_in_step(md.token_to_req_indices[: positions.shape[0]]) == 1
                with patched() as p2:
                    p2.wrap(C, "compress_norm_rope_store_indexer_cpu",
                            lambda o: skip_decode_rows(o, decode, positions, self_c.compress_ratio))
                    return orig(self_c, kv_score, positions, rotary_emb)
            return forward
        p.wrap(C.DeepseekV4CPUCompressor, "forward", make)


DECODE_KERNEL_SCALE = 1.05


class DecodeKernelScale(ServingFault):
    """A decode-only attention kernel (one query token per sequence) whose output is off by 5%
    (cf. vLLM #52644, a GSM8K drop only in the FULL_DECODE_ONLY graph mode): prefill runs the
    other kernel. Strikes `attn.out` of the first attention layer at every decode step.

    Why 5%: a decode step holds a few tokens and is held to the run's honest per-token worst
    case (phases.phase_noise). At float32 that is tiny; at vLLM's fp8-serving precision (FP8 KV
    cache) an error of 2% on every decode row of `layers.0.attn.out` drew err/tol 0.94 on
    flash-engine — below what one decode step can show."""
    name = "decode-kernel-scale"
    klass = "S4"
    summary = "decode-only attention kernel output scaled by 1.05"
    trigger = "a decode step (one token per sequence)"
    points = ("attn.out",)
    knob = "the decode kernel's scale error times m: output × (1 + m·0.05)"

    @property
    def factor(self) -> float:
        return lerp(1.0, DECODE_KERNEL_SCALE, self.magnitude)

    def hf(self, p, state, cfg):
        M = hf_module()

        def make(orig):
            def forward(self_a, hidden_states, *args, **kwargs):
                out = orig(self_a, hidden_states, *args, **kwargs)
                if hidden_states.shape[1] == 1 and self_a.layer_idx == 0:
                    state.hit()
                    return (out[0] * self.factor, *out[1:])
                return out
            return forward
        p.wrap(M.DeepseekV4Attention, "forward", make)

    def vllm(self, p, state, cfg):
        """In vLLM a decode-only kernel runs a step in which every request decodes (as the
        FULL_DECODE_ONLY graph mode does); mixed steps take the other path."""
        V = _vllm()
        S = V.vllm_module(V.CPU_SPARSE)

        def make(orig):
            def _o_proj(self_a, o, positions):
                out = orig(self_a, o, positions)
                md = _step_metadata(self_a)
                if md is not None and md.num_prefills == 0 and md.num_decodes > 0 and \
                        V.layer_index(self_a.prefix) == 0:
                    state.hit()
                    return out * self.factor
                return out
            return _o_proj
        p.wrap(S.DeepseekV4CPUAttention, "_o_proj", make)


class DecodeBatchRowScale(ServingFault):
    """A scale read for the first row only, when a decode step holds more than one sequence
    (a batch > 1 decode: "M=1 remains exactly unchanged"): every decode row of layer 1's
    attention output projection is dequantized with row 0's per-token activation scale, so
    row i comes out multiplied by amax(row 0) / amax(row i). Silent without decode (prefill-only)
    and at batch 1; vLLM only (transformers decodes one sequence at a time). Strikes
    `layers.1.attn.out` at every decode step that batches several sequences."""
    name = "decode-batch-row-scale"
    klass = "S5"
    summary = "batched decode: every row dequantized with row 0's activation scale"
    trigger = "a decode step holding >= 2 sequences"
    points = ("attn.out",)
    engines = ("vllm",)
    knob = "the row-scale error times m: decode row i × (1 + m·(amax₀/amaxᵢ − 1))"

    def triggered(self, cfg, seq_lens, engine):
        return cfg.num_layers > 1 and len(seq_lens) > 1

    def vllm(self, p, state, cfg):
        V = _vllm()
        S = V.vllm_module(V.CPU_SPARSE)

        def make(orig):
            def _o_proj(self_a, o, positions):
                out = orig(self_a, o, positions)
                md = _step_metadata(self_a)
                n = md.num_decode_tokens if md is not None else 0
                if n < 2 or md.num_decodes < 2 or V.layer_index(self_a.prefix) != 1:
                    return out
                state.hit()
                return row_scaled(out, o, n, self.magnitude)
            return _o_proj
        p.wrap(S.DeepseekV4CPUAttention, "_o_proj", make)


def _compressor_metadata(compressor):
    """vLLM's compressor-state metadata for the running step (None outside a real step)."""
    from vllm.forward_context import get_forward_context

    md = get_forward_context().attn_metadata
    return md.get(compressor.state_cache.prefix) if isinstance(md, dict) else None


# registered in corruptcheck.faults.FAULTS
SERVING_FAULTS: tuple[Fault, ...] = (
    CompressorTailLostAtChunk(), WindowWrapsEarly(), StaleIndexerRows(), DecodeKernelScale(), DecodeBatchRowScale())

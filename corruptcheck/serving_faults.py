"""Faults only a served model shows: each is silent in a prefill-only compare (one forward per
sequence, no carried state) and fires under a schedule (schedule.py) — chunked prefill, decode
steps, carried caches. Re-enacted in transformers' own cache code (`DeepseekV4HCACache` /
`DeepseekV4CSACache`) and attention, so `compare --engine hf` serving the case's schedule must
catch them and name the phase (tests/test_served.py).

A fifth family, a scale or layout bug that fires only when a step holds more than one sequence
(SGLang #31727: "M=1 remains exactly unchanged"), needs an engine that batches sequences in one
step; transformers serves one sequence at a time, so it is not re-enacted here.
"""
from __future__ import annotations

import torch

from corruptcheck.faults import Fault, hf_module


class ServingFault(Fault):
    engines = ("hf",)


class CompressorTailLostAtChunk(ServingFault):
    """An HCA layer's KV compressor drops its open block (tokens since the last closed block)
    when a new prefill chunk arrives, as when a compressor is called per chunk without its
    carried state (cf. the C4 compressor called without the sequence lengths, wrong from the 4th
    token). Silent without chunking: a single prefill starts with an empty buffer."""
    name = "compressor-tail-lost-at-chunk"
    klass = "S1"
    summary = "compressor's buffered tokens dropped at a prefill chunk boundary"
    trigger = "chunked prefill with a chunk that splits a compression block"
    # fewer entries fail `compressed_kv` on their count, so teacher forcing names the attention core
    points = ("attn.compressed_kv", "attn.core")

    def hf(self, p, state, cfg):
        M = hf_module()

        def make(orig):
            def store(self_c, name, kv, gate):
                buffered = self_c.buffer_kv.get(name)
                hca = type(self_c) is M.DeepseekV4HCACache  # (in CSA the indexer would then outnumber it)
                if hca and kv.shape[1] > 1 and buffered is not None and buffered.shape[1]:
                    state.hit()
                    self_c.buffer_kv[name] = self_c.buffer_gate[name] = None
                return orig(self_c, name, kv, gate)
            return store
        p.wrap(M.DeepseekV4HCACache, "store_compression_weights", make)


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

    def hf(self, p, state, cfg):
        M = hf_module()

        def make(orig):
            def update(self_c, key_states, value_states, *args, **kwargs):
                full, _ = orig(self_c, key_states, value_states, *args, **kwargs)
                if self_c.keys.shape[-2] >= self_c.sliding_window - 1:
                    keys = self_c.keys.clone()
                    keys[:, :, 0] = keys[:, :, -1]
                    self_c.keys = self_c.values = keys
                    state.hit()
                return full, full
            return update
        p.wrap(M.DeepseekV4HCACache, "update", make)


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

    def hf(self, p, state, cfg):
        M = hf_module()
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
                    self_c.entry_count[name] += compressed.shape[1]
                    return self_c.compressed_kv[name]
                return orig(self_c, name, compressed)
            return update
        p.wrap(M.DeepseekV4HCACache, "store_compression_weights", make_store)
        p.wrap(M.DeepseekV4HCACache, "update_compressor_states", make_update)


class DecodeKernelScale(ServingFault):
    """A decode-only attention kernel (one query token per sequence) whose output is off by 2%
    (cf. vLLM #52644, a GSM8K drop only in the FULL_DECODE_ONLY graph mode): prefill runs the
    other kernel. Strikes `attn.out` of the first attention layer at every decode step."""
    name = "decode-kernel-scale"
    klass = "S4"
    summary = "decode-only attention kernel output scaled by 1.02"
    trigger = "a decode step (one token per sequence)"
    points = ("attn.out",)

    def hf(self, p, state, cfg):
        M = hf_module()

        def make(orig):
            def forward(self_a, hidden_states, *args, **kwargs):
                out = orig(self_a, hidden_states, *args, **kwargs)
                if hidden_states.shape[1] == 1 and self_a.layer_idx == 0:
                    state.hit()
                    return (out[0] * 1.02, *out[1:])
                return out
            return forward
        p.wrap(M.DeepseekV4Attention, "forward", make)


SERVING_FAULTS: dict[str, Fault] = {f.name: f for f in (
    CompressorTailLostAtChunk(), WindowWrapsEarly(), StaleIndexerRows(), DecodeKernelScale())}

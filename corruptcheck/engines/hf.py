"""The `hf` engine: transformers' `DeepseekV4ForCausalLM` (built by hf_model.py), run on the
case's weights and captured like every other engine: `capture_taps()` (taps.py) attached by
the `HookRecorder` (recorder.py), one recorded pass per model call (docs/design.md §4). Runs the case's
sequences one at a time or as one right-padded batch, or serves a schedule through
transformers' cache; `OutputPatch`es modify module outputs during a run (fault injection).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from corruptcheck.engines import progress
from corruptcheck.engines.patching import patched
from corruptcheck.storage.batch_layout import is_entry_point, pad_right, rows_per_sequence, unpad
from corruptcheck.cases import Case
from corruptcheck.engines.hf_model import build_model
from corruptcheck.engines.recorder import HookRecorder
from corruptcheck.engines.taps import Tap, TokenSource
from corruptcheck.reference import ModelConfig


L = "model.layers.{i}"
# DeepseekV4ForCausalLM(input_ids=..., ...): transformers derives positions from its cache
TOKENS = TokenSource(ids="in[input_ids|0]", pos=None, method=None)


def capture_taps(cfg: ModelConfig) -> list[Tap]:
    """Canonical point -> transformers' DeepseekV4ForCausalLM module (a layer's mHC modules
    return (post, comb, collapsed); the router returns (logits, weights, expert ids); a CSA /
    HCA layer's compressor returns its entries so far, [B, 1, n, d], first)."""
    taps = [Tap("model.embed_tokens", "embed", "out")]
    for hc in ("attn_hc", "ffn_hc"):
        taps += [Tap(f"{L}.{hc}", f"layers.{{i}}.{hc}.in", "in[0]"),
                 Tap(f"{L}.{hc}", f"layers.{{i}}.{hc}.post", "out[0]"),
                 Tap(f"{L}.{hc}", f"layers.{{i}}.{hc}.comb", "out[1]"),
                 Tap(f"{L}.{hc}", f"layers.{{i}}.{hc}.collapsed", "out[2]")]
    return taps + [
        Tap(f"{L}.input_layernorm", "layers.{i}.attn_norm", "out"),
        Tap(f"{L}.post_attention_layernorm", "layers.{i}.ffn_norm", "out"),
        Tap(f"{L}.self_attn.q_a_norm", "layers.{i}.attn.qr", "out"),
        Tap(f"{L}.self_attn", "layers.{i}.attn.out", "out[0]"),
        Tap(f"{L}.self_attn.o_a_proj", "layers.{i}.attn.core", "in[0]"),
        Tap(f"{L}.self_attn.compressor", "layers.{i}.attn.compressed_kv", "out[0]"),  # absent: sliding
        Tap(f"{L}.self_attn.compressor.indexer", "layers.{i}.attn.indexer_topk", "out"),  # CSA only
        Tap(f"{L}.mlp.gate", "layers.{i}.moe.router_logits", "out[0]"),
        Tap(f"{L}.mlp.gate", "layers.{i}.moe.experts", "out[2]"),
        Tap(f"{L}.mlp.gate", "layers.{i}.moe.weights", "out[1]"),
        Tap(f"{L}.mlp", "layers.{i}.moe.out", "out"),
        Tap(L, "layers.{i}.out", "out"),
        Tap("model.hc_head", "head.collapsed", "out"),
        Tap("model.norm", "head.norm", "out"),
        Tap("lm_head", "logits", "out"),
    ]


def _canonical_rows(points: dict, cfg: ModelConfig) -> dict:
    """One forward pass's raw tensors -> canonical rows: module outputs [B, S, ...] flattened to
    [B*S, ...] (the router already works on [B*S, ...]), attn.core split into heads, expert ids
    sorted (their weights in the same order), indexer top-k padded with -1 to index_topk;
    compressed entries stay per sequence, [B, n, d]."""
    out = {}
    for name, t in points.items():
        leaf = name.split(".", 2)[-1]
        if leaf == "attn.core":
            out[name] = t.reshape(-1, cfg.num_heads, cfg.head_dim)
        elif is_entry_point(name):
            out[name] = t[:, 0]
        elif leaf == "attn.indexer_topk":
            idx = _flat(t).long()
            pad = torch.full((idx.shape[0], cfg.index_topk - idx.shape[1]), -1, dtype=torch.long)
            out[name] = torch.cat([idx, pad], 1)
        elif leaf == "moe.experts":
            weights = name[: -len("experts")] + "weights"
            order = torch.sort(t.long(), dim=-1)
            out[name] = order.values
            out[weights] = points[weights].gather(1, order.indices)
        elif leaf == "moe.router_logits":
            out[name] = t
        elif leaf != "moe.weights":  # the weights are placed with their expert ids
            out[name] = _flat(t)
    return out


def _flat(t: torch.Tensor) -> torch.Tensor:
    """[B, S, ...] -> [B*S, ...]"""
    return t.reshape(-1, *t.shape[2:])


def _unpad(rows: dict, cfg: ModelConfig, lens: list[int], s_max: int) -> dict:
    """Drop the padding of a right-padded batch (batch_layout.unpad): token rows (b, s < len_b)
    in order; compressed entries i < len_b // ratio of each sequence."""
    out = {}
    for name, t in rows.items():
        if is_entry_point(name):  # [B, n, d]
            out[name] = unpad(t, rows_per_sequence(cfg, name, lens))
        else:  # [B*S_max, ...]
            out[name] = unpad(t.reshape(len(lens), s_max, *t.shape[1:]), lens)
    return out


@contextlib.contextmanager
def _capturing(model, cfg: ModelConfig, patches=()):
    """Output patches installed, then the recorder attached (so it records patched outputs);
    everything removed on exit. Yields the HookRecorder (one pass per model call)."""

    recorder = HookRecorder(capture_taps(cfg), TOKENS, cfg.num_layers)
    with patched() as p:
        for patch in patches or ():
            patch.install(p, model)
        with recorder.attached(model):
            yield recorder


def _concat_rows(parts: list[dict]) -> dict:
    """Row dicts (sequences, or steps of one) concatenated, points in the first one's order."""
    return {n: torch.cat([s[n] for s in parts if n in s], 0) for n in parts[0]}


@dataclass(frozen=True)
class OutputPatch:
    """Modify one module's output during a run (fault injection): `fn(output) -> output`,
    applied to `output[index]` when the module returns a tuple. Installed through the faults'
    `Patcher` (faults/base.py) on that module instance's `forward`, and put back when the run ends."""
    module: str  # dotted path under the CausalLM, e.g. "model.layers.1.self_attn"
    fn: Callable
    index: int | None = None
    label: str = ""

    def __str__(self):
        return self.label or f"patch {self.module}"

    def apply(self, out):
        if self.index is None:
            return self.fn(out)
        out = list(out)
        out[self.index] = self.fn(out[self.index])
        return tuple(out)

    def install(self, p, model) -> None:
        """Wrap the module's forward through Patcher `p`."""
        def make(forward):
            def patched_forward(*args, **kwargs):
                return self.apply(forward(*args, **kwargs))
            return patched_forward
        p.wrap(model.get_submodule(self.module), "forward", make)


def run_hf(case: Case, precision: str = "float32", attn_impl: str = "eager", model=None, patches=(),
           batch: bool = False) -> dict:
    """Run the case through transformers; returns canonical points flattened over tokens.

    By default sequences run one at a time. `batch=True` runs them as one right-padded batch
    with an attention mask: right padding keeps every real token's computation (pad tokens
    only form compressed entries that no real query may see), while left padding would not
    (pads enter the compressor and shift positions, transformers#45938).
    `patches` (OutputPatch) are installed before the capture hooks, so captures see them."""
    model = model or build_model(case, precision, attn_impl)
    progress.phase("ready")  # the model is built: progress for a supervisor's --engine-timeout
    cfg, seqs = case.config, case.sequences()
    with _capturing(model, cfg, patches) as recorder, torch.no_grad():
        if batch:
            progress.phase("prefill", sequence=0, batch=len(seqs))
            ids, mask = pad_right(seqs)
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            per_seq = [_unpad(_canonical_rows(recorder.passes[0]["points"], cfg), cfg, [len(s) for s in seqs],
                              ids.shape[1])]
        else:
            per_seq = []
            for i, ids in enumerate(seqs):
                progress.phase("prefill", sequence=i)
                model(input_ids=ids[None], use_cache=False)
                per_seq.append(_unpad(_canonical_rows(recorder.passes[-1]["points"], cfg), cfg, [len(ids)], len(ids)))
                progress.deliver(per_seq[-1], ids.tolist())
    return _concat_rows(per_seq)


def run_hf_served(case: Case, schedule, precision: str = "float32", attn_impl: str = "eager", model=None,
                  patches=()) -> tuple[dict, dict]:
    """Serve the schedule's prompts through transformers' own cache (`DynamicCache`): each
    prompt prefilled in chunks, then greedy decode steps of one token, one sequence at a time
    (transformers has no continuous batching). Returns (points over every fed token, in
    sequence and position order; {"sequences": the token ids fed, "rows": (phase, index) per
    row}). Compressed entries are recorded as they close (the cache returns all so far)."""
    from dataclasses import replace

    from corruptcheck.schedule import prompt_case, row_labels

    model = model or build_model(case, precision, attn_impl)
    progress.phase("ready")
    per_seq, sequences = [], []
    with _capturing(model, case.config, patches) as recorder, torch.no_grad():
        for i, prompt in enumerate(prompt_case(case, schedule).sequences()):
            first = len(recorder.passes)
            sequences.append(_serve_prompt(model, prompt, schedule, i))
            per_seq.append(_served_rows(recorder.passes[first:], case.config))
            progress.deliver(per_seq[-1], sequences[-1], row_labels(
                replace(schedule, prompt_lens=(len(prompt),), arrivals=None), [len(sequences[-1])]))
    return _concat_rows(per_seq), {"sequences": sequences,
                                   "rows": row_labels(schedule, [len(s) for s in sequences])}


def _serve_prompt(model, prompt: torch.Tensor, schedule, sequence: int = 0) -> list[int]:
    """One prompt through a fresh DynamicCache: prefill chunks, then greedy decode steps of
    one token. Returns the token ids fed (prompt + decoded)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids = prompt.tolist()

    def step(chunk: torch.Tensor) -> torch.Tensor:
        return model(input_ids=chunk[None], past_key_values=cache, use_cache=True).logits[0, -1]

    at = 0
    for j, c in enumerate(schedule.prefill_chunks(len(ids))):
        progress.phase("prefill", sequence=sequence, chunk=j)
        last = step(prompt[at:at + c])
        at += c
    for k in range(1, schedule.decode_steps + 1):
        progress.phase("decode", sequence=sequence, step=k)
        ids.append(int(last.argmax()))
        last = step(torch.tensor([ids[-1]]))
    return ids


def _served_rows(passes: list[dict], cfg: ModelConfig) -> dict:
    """One sequence's steps (one pass each) -> its rows: token rows of every step in order;
    compressed entries as they close (each step's cache returns all so far, [1, n, d])."""
    seen: dict = {}
    steps = []
    for p in passes:
        rows = {}
        for name, t in _canonical_rows(p["points"], cfg).items():
            if is_entry_point(name):
                rows[name] = t[0, seen.get(name, 0):]
                seen[name] = t.shape[1]
            else:
                rows[name] = t
        steps.append(rows)
    return _concat_rows(steps)

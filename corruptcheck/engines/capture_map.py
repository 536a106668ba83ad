"""Engine-independent capture: declarative taps on an engine's module tree -> canonical points.

An engine adapter declares *where* each canonical point (docs/design.md §4) lives in its module tree
as a list of `Tap`s; this module does the rest, the same way for every engine:

* `Recorder` attaches forward hooks / method wrappers to any `torch.nn.Module` tree, counts
  calls per forward pass (fused ops run several times per layer), snapshots each tensor to the
  CPU at hook time (shared buffers are overwritten by later layers; aux CUDA streams are synced
  first, docs/engine-capture.md §7.10) and groups the tensors by forward pass, together
  with the pass's token ids and positions.
* `merge_ranks` folds the captures of tensor-parallel ranks into one: `replicated` (rank 0,
  and any disagreement between ranks is reported: it is itself a corruption signal), `partial`
  (per-rank partial sums: summed) or `shard:<dim>` (per-rank slices: concatenated).
* `finalize` reshapes every tensor to its canonical trailing shape (engines keep mHC streams
  as [T, hc, H] or flattened [T, hc*H]; the HF layout is [B, S, ...]), drops points the engine
  computed only for some rows (e.g. logits of the sampled tokens), aligns the engine's
  flattened token order (batches reordered, chunked prefill split over passes) with the case's
  order by (token id, position), and puts discrete points in canonical form (expert ids sorted,
  indexer top-k padded with -1).

The hooks do not care whether the tree is the engine's real model or a fake with the same
names (tests/engine_trees.py), which is how this is tested without a GPU.

The last section holds what the three in-process launches share (availability check, a
checkpoint in DeepSeek's on-disk format); it only prepares files and never imports an engine.
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from corruptcheck.engines.base import Capture, Engine
from corruptcheck.errors import EngineUnavailable
from corruptcheck.reference import ModelConfig
from corruptcheck.reference.quant import fp8_block_quantize, fp8_dequantize
from corruptcheck.weights import is_fp8_linear


class CaptureError(RuntimeError):
    """The capture cannot be turned into canonical points (wrong tree, tokens not found)."""


# --------------------------------------------------------------------------------------------
# Declarations
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Call:
    """What a hook sees of one call: positional args, keyword args, and the output (None in
    the pre-hook)."""
    args: tuple
    kwargs: dict
    out: object = None

    def arg(self, name: str | None, index: int | None = None):
        if name is not None and name in self.kwargs:
            return self.kwargs[name]
        if index is not None and index < len(self.args):
            return self.args[index]
        return None


@dataclass(frozen=True)
class Tap:
    """One canonical point and where an engine exposes it.

    path   module path from the root, `{i}` standing for the decoder layer index
           ("model.layers.{i}.attn_norm"; "" is the root). The object at the path may be a
           plain attribute (e.g. a routing object) when `method` is given.
    point  canonical name; `{i}` = layer, `{prev}` = i - 1 (fused boundaries: a layer's output
           produced by the next layer's call), `{last}` = num_layers - 1.
    take   what to read: `out`, `in[name|k]` (keyword `name`, else positional k), or
           `state:<path>` (an attribute path from the root, rows [:T] of the pass: shared
           buffers); followed by any `[k]` / `.attr` accessors ("out[3]", "out.residual").
           `in` values are read before the call runs (engines mutate inputs in place).
    method wrap this method instead of hooking the module's forward (mHC ops that are
           methods, docs/engine-capture.md §2.4, §3.1).
    call   which call of that module/method within one forward pass (0-based); None = every
           call (the point must then be written once per pass).
    layers "all", "first" (the first layer present) or "rest" (the others): fused ops are
           called a different number of times on the first layer (vLLM, docs/engine-capture.md §1.2).
    when   predicate on the `Call` (e.g. a fused-norm flag in the output).
    merge  across tensor-parallel ranks: "replicated", "partial" or "shard:<dim>" (the dim of
           the raw engine tensor).
    scale  multiply the value by this (an engine convention, e.g. routing weights stored
           without the routed scaling factor).
    """
    path: str
    point: str
    take: str
    method: str | None = None
    call: int | None = None
    layers: str = "all"
    when: Callable[[Call], bool] | None = None
    merge: str = "replicated"
    scale: float = 1.0


@dataclass(frozen=True)
class TokenSource:
    """Where a forward pass starts and which token ids / positions it runs; every pass starts
    a new group of captured tensors. By default the root's `forward` is wrapped (engines call
    `model.forward(...)` directly: SGLang's ModelRunner does, which skips module hooks);
    `method=None` uses a forward pre-hook instead."""
    ids: str
    pos: str
    path: str = ""
    method: str | None = "forward"


# --------------------------------------------------------------------------------------------
# Reading values out of a call
# --------------------------------------------------------------------------------------------

_BASE = re.compile(r"^(out|in\[(?P<spec>[^\]]+)\]|state:(?P<state>[\w.]+))(?P<rest>(\[\d+\]|\.\w+)*)$")
_ACCESS = re.compile(r"\[(\d+)\]|\.(\w+)")


def _parse_take(take: str):
    m = _BASE.match(take)
    if not m:
        raise ValueError(f"cannot parse take {take!r}")
    if m.group("state"):
        base = ("state", m.group("state"))
    elif m.group("spec"):
        name, _, idx = m.group("spec").partition("|")
        if name.isdigit() and not idx:
            name, idx = None, name
        base = ("in", (name or None, int(idx) if idx else None))
    else:
        base = ("out", None)
    steps = [int(a) if a else b for a, b in _ACCESS.findall(m.group("rest"))]
    return base, steps


def _step(value, step):
    if value is None:
        return None
    if isinstance(step, int):
        return value[step] if isinstance(value, (tuple, list)) and step < len(value) else None
    return getattr(value, step, None)


def resolve_attr(root, path: str):
    """getattr chain (ModuleList entries by index); None where the chain breaks."""
    obj = root
    for part in path.split(".") if path else ():
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def snapshot(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy taken now; device work (aux streams included) is synced first."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
    return t.detach().to("cpu", copy=True)


# --------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------

@dataclass
class RawCapture:
    """One rank's capture: per forward pass the token ids, positions and raw tensors."""
    passes: list = field(default_factory=list)  # [{"ids", "pos", "points": {name: tensor}}]
    rules: dict = field(default_factory=dict)  # point -> merge rule
    scales: dict = field(default_factory=dict)  # point -> factor
    notes: dict = field(default_factory=dict)


@dataclass
class _Binding:
    tap: Tap
    layer: int | None
    point: str
    base: tuple
    steps: list


def _expand(root, tap: Tap, num_layers: int):
    """(layer, object) pairs the tap's path names in this tree."""
    if "{i}" not in tap.path:
        obj = resolve_attr(root, tap.path)
        return [] if obj is None else [(None, obj)]
    head, _, tail = tap.path.partition("{i}")
    container = resolve_attr(root, head.rstrip("."))
    if container is None:
        return []
    try:
        count = len(container)
    except TypeError:
        return []
    found = []
    for i in range(min(count, num_layers)):  # engines append MTP layers after the main ones
        obj = resolve_attr(container[i], tail.lstrip(".")) if tail else container[i]
        if obj is not None:
            found.append((i, obj))
    if tap.layers == "first":
        found = found[:1]
    elif tap.layers == "rest":
        found = found[1:]
    return found


class Recorder:
    """Attach `taps` to a module tree, record each forward pass, detach.

    Usable as `with Recorder(...).attached(model) as rec:` or attach()/detach(); `result()`
    gives the RawCapture. One recorder per rank."""

    def __init__(self, taps: list[Tap], tokens: TokenSource, num_layers: int):
        self.taps, self.tokens, self.num_layers = list(taps), tokens, num_layers
        self.passes: list[dict] = []
        self.notes: dict = {"attached": [], "conflicts": [], "non_tensor": {}, "outside_pass": []}
        self._handles: list = []
        self._wrapped: list = []  # (obj, method name, previous instance attribute or _MISSING)
        self._counts: dict = {}
        self._stacks: dict = {}
        self._fired: set = set()
        self._bound: list[_Binding] = []
        self.root = None

    # -- attach / detach ---------------------------------------------------------------------
    def attach(self, root):
        if self.root is not None:
            raise CaptureError("recorder is already attached")
        self.root = root
        start = resolve_attr(root, self.tokens.path)
        if start is None:
            raise CaptureError(f"no module at {self.tokens.path!r} to start passes")
        if self.tokens.method is None:
            self._handles.append(start.register_forward_pre_hook(self._start_pass, with_kwargs=True))
        else:
            self._wrap(start, self.tokens.method, before=lambda args, kwargs: self._start_pass(None, args, kwargs))
        groups: dict = {}
        for tap in self.taps:
            base, steps = _parse_take(tap.take)
            for layer, obj in _expand(root, tap, self.num_layers):
                point = _format_point(tap.point, layer, self.num_layers)
                if point is None:
                    continue
                b = _Binding(tap, layer, point, base, steps)
                key = (id(obj), tap.method)
                groups.setdefault(key, (obj, tap.method, []))[2].append(b)
                self._bound.append(b)
                self.notes["attached"].append(f"{_describe(tap, layer)} -> {point}")
        for obj, method, bindings in groups.values():
            if method is None:
                self._hook_module(obj, bindings)
            else:
                self._wrap_method(obj, method, bindings)
        return self

    def detach(self):
        for h in self._handles:
            h.remove()
        for obj, name, previous in reversed(self._wrapped):
            if previous is _MISSING:
                del obj.__dict__[name]
            else:
                obj.__dict__[name] = previous
        self._handles, self._wrapped = [], []
        self.root = None

    def attached(self, root):
        recorder = self

        class _Ctx:
            def __enter__(self):
                return recorder.attach(root)

            def __exit__(self, *exc):
                recorder.detach()
        return _Ctx()

    # -- passes ------------------------------------------------------------------------------
    def _start_pass(self, _module, args, kwargs):
        call = Call(args, kwargs)
        ids, pos = (_read(call, *_parse_take(t), self.root, None) for t in (self.tokens.ids, self.tokens.pos))
        if ids is None or pos is None:
            raise CaptureError("could not read token ids / positions at the start of a forward pass")
        self.passes.append({"ids": snapshot(ids).reshape(-1).long(), "pos": snapshot(pos).reshape(-1).long(),
                            "points": {}})
        self._counts.clear()

    def _store(self, b: _Binding, value):
        if value is None:
            return
        if not isinstance(value, torch.Tensor):
            self.notes["non_tensor"][b.point] = type(value).__name__
            return
        if not self.passes:
            self.notes["outside_pass"].append(b.point)
            return
        points = self.passes[-1]["points"]
        if b.point in points:
            self.notes["conflicts"].append(f"{b.point} written twice in one pass ({_describe(b.tap, b.layer)})")
            return
        points[b.point] = snapshot(value)
        self._fired.add(id(b))

    def _next_call(self, key) -> int:
        n = self._counts.get(key, 0)
        self._counts[key] = n + 1
        return n

    def _applies(self, b: _Binding, n: int, call: Call) -> bool:
        if b.tap.call is not None and b.tap.call != n:
            return False
        if b.tap.when is None:
            return True
        try:  # a hook must never break the engine's forward: an unexpected call shape is noted
            return bool(b.tap.when(call))
        except Exception as exc:  # noqa: BLE001
            self.notes.setdefault("when_errors", {})[b.point] = f"{type(exc).__name__}: {exc}"
            return False

    def _rows(self) -> int | None:
        return len(self.passes[-1]["ids"]) if self.passes else None

    def _on_inputs(self, bindings, n, call):
        for b in bindings:
            if b.base[0] == "in" and self._applies(b, n, call):
                self._store(b, _read(call, b.base, b.steps, self.root, self._rows()))

    def _on_output(self, bindings, n, call):
        for b in bindings:
            if b.base[0] != "in" and self._applies(b, n, call):
                self._store(b, _read(call, b.base, b.steps, self.root, self._rows()))

    def _hook_module(self, module, bindings):
        key = (id(module), None)
        stack = self._stacks.setdefault(key, [])

        def pre(_m, args, kwargs):
            n = self._next_call(key)
            stack.append((n, args, kwargs))
            self._on_inputs(bindings, n, Call(args, kwargs))

        def post(_m, args, kwargs, out):
            n, _a, _k = stack.pop() if stack else (self._counts.get(key, 1) - 1, args, kwargs)
            self._on_output(bindings, n, Call(args, kwargs, out))

        self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self._handles.append(module.register_forward_hook(post, with_kwargs=True))

    def _wrap_method(self, obj, name, bindings):
        key = (id(obj), name)

        def before(args, kwargs):
            n = self._next_call(key)
            self._on_inputs(bindings, n, Call(args, kwargs))
            return n

        def after(n, args, kwargs, out):
            self._on_output(bindings, n, Call(args, kwargs, out))

        self._wrap(obj, name, before, after)

    def _wrap(self, obj, name, before, after=None):
        """Replace obj.name by an instance attribute calling before / the original / after."""
        original = getattr(obj, name, None)
        if original is None or not callable(original):
            return
        previous = obj.__dict__.get(name, _MISSING)

        def wrapper(*args, **kwargs):
            token = before(args, kwargs)
            out = original(*args, **kwargs)
            if after is not None:
                after(token, args, kwargs, out)
            return out

        obj.__dict__[name] = wrapper
        self._wrapped.append((obj, name, previous))

    # -- result ------------------------------------------------------------------------------
    def result(self) -> RawCapture:
        unfired = sorted({f"{_describe(b.tap, b.layer)} -> {b.point}" for b in self._bound if id(b) not in self._fired})
        notes = {**self.notes, "unfired": unfired}
        rules = {b.point: b.tap.merge for b in self._bound}
        scales = {b.point: b.tap.scale for b in self._bound if b.tap.scale != 1.0}
        return RawCapture(self.passes, rules, scales, notes)


_MISSING = object()


def _read(call: Call, base, steps, root, rows):
    kind, spec = base
    if kind == "in":
        value = call.arg(*spec)
    elif kind == "out":
        value = call.out
    else:
        value = resolve_attr(root, spec)
        if isinstance(value, torch.Tensor) and rows is not None:
            value = value[:rows]
    for s in steps:
        value = _step(value, s)
    return value


def _format_point(template: str, layer: int | None, num_layers: int) -> str | None:
    if layer is None:
        return template.format(last=num_layers - 1)
    if "{prev}" in template and layer == 0:
        return None
    return template.format(i=layer, prev=layer - 1, last=num_layers - 1)


def _describe(tap: Tap, layer) -> str:
    path = tap.path.replace("{i}", str(layer)) if layer is not None else tap.path
    where = f"{path}.{tap.method}()" if tap.method else (path or "<root>")
    call = f" call {tap.call}" if tap.call is not None else ""
    return f"{where}{call} {tap.take}"


# --------------------------------------------------------------------------------------------
# Tensor parallelism
# --------------------------------------------------------------------------------------------

def _sum(parts):
    low = parts[0].dtype in (torch.float16, torch.bfloat16)
    acc = torch.zeros_like(parts[0], dtype=torch.float32 if low else parts[0].dtype)
    for p in parts:
        acc = acc + p.to(acc.dtype)
    return acc


def merge_ranks(captures: list[RawCapture]) -> RawCapture:
    """Fold the captures of TP ranks (same batch, same passes) into one (docs/engine-capture.md §7.2)."""
    if len(captures) == 1:
        return captures[0]
    first = captures[0]
    if any(len(c.passes) != len(first.passes) for c in captures):
        raise CaptureError("tensor-parallel ranks recorded different numbers of forward passes")
    rules = {k: v for c in captures for k, v in c.rules.items()}
    mismatch: dict = {}
    missing: set = set()
    passes = []
    for k, p0 in enumerate(first.passes):
        ranks = [c.passes[k] for c in captures]
        if any(not torch.equal(r["ids"], p0["ids"]) for r in ranks):
            raise CaptureError(f"tensor-parallel ranks ran different tokens in pass {k}")
        merged = {}
        for name in sorted({n for r in ranks for n in r["points"]}):
            parts = [r["points"].get(name) for r in ranks]
            if any(p is None for p in parts):
                missing.add(name)
                continue
            rule = rules.get(name, "replicated")
            if rule == "partial":
                merged[name] = _sum(parts)
            elif rule.startswith("shard:"):
                merged[name] = torch.cat(parts, int(rule.split(":", 1)[1]))
            else:
                merged[name] = parts[0]
                for p in parts[1:]:
                    if p.shape == parts[0].shape and torch.equal(p, parts[0]):
                        continue
                    diff = (math.inf if p.shape != parts[0].shape else
                            float((p.double() - parts[0].double()).abs().nan_to_num(math.inf).max()))
                    mismatch[name] = max(mismatch.get(name, 0.0), diff)
        passes.append({"ids": p0["ids"], "pos": p0["pos"], "points": merged})
    notes = dict(first.notes)
    notes["tp_ranks"] = len(captures)
    notes["rank_mismatch"] = mismatch  # replicated points whose ranks disagree: report, never hide
    notes["rank_missing"] = sorted(missing)
    return RawCapture(passes, rules, dict(first.scales), notes)


# --------------------------------------------------------------------------------------------
# Canonical shapes, token alignment
# --------------------------------------------------------------------------------------------

_STREAM = ("attn_hc.in", "ffn_hc.in", "out")
_VECTOR = ("attn_hc.collapsed", "attn_norm", "attn.out", "ffn_hc.collapsed", "ffn_norm", "moe.out")


def canonical_tail(cfg: ModelConfig, name: str):
    """The canonical per-token shape of a point (docs/design.md §4); None for the indexer top-k
    (its width is padded to index_topk)."""
    n, d = cfg.hc_mult, cfg.hidden_size
    top = {"embed": (d,), "head.collapsed": (d,), "head.norm": (d,), "logits": (cfg.vocab_size,)}
    if name in top:
        return top[name]
    m = re.match(r"^layers\.\d+\.(.+)$", name)
    if not m:
        raise CaptureError(f"not a canonical point name: {name!r}")
    leaf = m.group(1)
    table = {**{s: (n, d) for s in _STREAM}, **{s: (d,) for s in _VECTOR},
             "attn_hc.post": (n,), "ffn_hc.post": (n,), "attn_hc.comb": (n, n), "ffn_hc.comb": (n, n),
             "attn.qr": (cfg.q_lora_rank,), "attn.q": (cfg.num_heads, cfg.head_dim),
             "attn.kv": (cfg.head_dim,), "attn.core": (cfg.num_heads, cfg.head_dim),
             "moe.router_logits": (cfg.n_routed_experts,), "moe.experts": (cfg.experts_per_tok,),
             "moe.weights": (cfg.experts_per_tok,), "attn.indexer_topk": None}
    if leaf not in table:
        raise CaptureError(f"no canonical shape for point {name!r}")
    return table[leaf]


@dataclass
class Alignment:
    """For every token of the case (in the case's order) the (pass, row) the engine ran it in."""
    where: list
    extra_rows: int = 0
    duplicate_rows: int = 0

    @property
    def missing(self) -> int:
        return sum(w is None for w in self.where)


def align_tokens(tokens: list[tuple[torch.Tensor, torch.Tensor]], sequences) -> Alignment:
    """Match the engine's flattened rows to the case's tokens by (token id, position).

    Rows are split into runs of consecutive positions (one request's chunk); each run is
    matched greedily to the sequence agreeing with it for longest, preferring tokens not yet
    located. Rows matching no case token (padding, decode steps, warm-up) are `extra_rows`."""
    seqs = [torch.as_tensor(s).reshape(-1).tolist() for s in sequences]
    offsets = [0]
    for s in seqs:
        offsets.append(offsets[-1] + len(s))
    where: list = [None] * offsets[-1]
    extra = dup = 0
    for p, (ids_t, pos_t) in enumerate(tokens):
        ids, pos = ids_t.tolist(), pos_t.tolist()
        r = 0
        while r < len(ids):
            end = r + 1
            while end < len(ids) and pos[end] == pos[end - 1] + 1:
                end += 1
            while r < end:
                best, best_key = None, (0, False)
                for s, seq in enumerate(seqs):
                    p0, length = pos[r], 0
                    while r + length < end and 0 <= p0 + length < len(seq) and seq[p0 + length] == ids[r + length]:
                        length += 1
                    key = (length, length > 0 and where[offsets[s] + p0] is None)
                    if length and key > best_key:
                        best, best_key = s, key
                if best is None:
                    extra += 1
                    r += 1
                    continue
                for k in range(best_key[0]):
                    t = offsets[best] + pos[r] + k
                    if where[t] is None:
                        where[t] = (p, r + k)
                    else:
                        dup += 1
                r += best_key[0]
    return Alignment(where, extra, dup)


def _reshape(cfg, name, t: torch.Tensor, rows: int):
    tail = canonical_tail(cfg, name)
    if tail is None:  # indexer top-k: [T, k] or [B, S, k]
        return t.reshape(rows, -1) if t.numel() % max(rows, 1) == 0 and t.dim() >= 2 else None
    width = math.prod(tail)
    if t.numel() != rows * width:
        return None
    return t.reshape(rows, *tail)


def align_requests(tokens: list[tuple[torch.Tensor, torch.Tensor]], batches: list, sequences) -> Alignment:
    """Like `align_tokens`, for a served run whose engine said, per forward pass, which request
    each run of rows belongs to (`batches[k]` = [(request id, rows), ...] in row order): a
    request is matched to a sequence once, by its first rows' (id, position), and every later
    row of it (a decode step whose token another sequence shares) is placed by the request id."""
    if len(batches) != len(tokens):
        raise CaptureError(f"{len(tokens)} forward passes captured but {len(batches)} scheduled batches recorded")
    seqs = [torch.as_tensor(s).reshape(-1).tolist() for s in sequences]
    offsets = [0]
    for s in seqs:
        offsets.append(offsets[-1] + len(s))
    where: list = [None] * offsets[-1]
    owner: dict = {}
    extra = dup = 0
    for k, ((ids_t, pos_t), batch) in enumerate(zip(tokens, batches)):
        ids, pos = ids_t.tolist(), pos_t.tolist()
        r = 0
        for req, n in batch:
            if req not in owner:
                free = [s for s in range(len(seqs)) if s not in owner.values()]
                fits = [s for s in free if all(0 <= pos[r + j] < len(seqs[s]) and seqs[s][pos[r + j]] == ids[r + j]
                                               for j in range(n))]
                owner[req] = fits[0] if len(fits) == 1 else None  # ambiguous or unknown: not placed
            s = owner[req]
            for j in range(n):
                if s is None or not (0 <= pos[r + j] < len(seqs[s])) or seqs[s][pos[r + j]] != ids[r + j]:
                    extra += 1
                    continue
                t = offsets[s] + pos[r + j]
                if where[t] is None:
                    where[t] = (k, r + j)
                else:
                    dup += 1
            r += n
        extra += len(ids) - r
    return Alignment(where, extra, dup)


def finalize(raw: RawCapture, cfg: ModelConfig, sequences, align: Alignment | None = None) -> tuple[dict, dict]:
    """RawCapture (ranks already merged) -> ({canonical name: [T, ...] tensor}, info).

    A point is kept only if every token of the case has a row for it; otherwise it is listed
    in info["gaps"] with the reason (and the differ reports it missing / skipped). `align`:
    a served run's request-aware alignment (`align_requests`), else rows are matched by
    (token id, position)."""
    align = align or align_tokens([(p["ids"], p["pos"]) for p in raw.passes], sequences)
    if align.missing == len(align.where):
        raise CaptureError("no captured forward pass ran the case's tokens")
    per_pass: dict = {}  # pass -> (case token indices, engine rows)
    for t, w in enumerate(align.where):
        if w is not None:
            per_pass.setdefault(w[0], ([], []))
            per_pass[w[0]][0].append(t)
            per_pass[w[0]][1].append(w[1])
    gaps: dict = {}
    shaped: dict = {}
    for k in per_pass:  # passes without case tokens (warm-up, decode) are ignored
        p = raw.passes[k]
        rows = len(p["ids"])
        for name, t in p["points"].items():
            r = _reshape(cfg, name, t, rows)
            if r is None:
                gaps[name] = (f"captured {tuple(t.shape)} in a pass of {rows} tokens: not one row per token "
                              "(the engine computes it only for some rows, e.g. the sampled ones)")
            else:
                shaped.setdefault(name, {})[k] = r
    points = {}
    for name in sorted(set(shaped) - set(gaps)):
        parts = shaped[name]
        if align.missing or set(parts) != set(per_pass):
            gaps[name] = "not captured for every token of the case"
            continue
        if len({x.shape[1:] for x in parts.values()}) > 1:
            gaps[name] = "different per-token shapes in different passes"
            continue
        first = next(iter(parts.values()))
        t = torch.empty(len(align.where), *first.shape[1:], dtype=first.dtype)
        for k, (canon, rows) in per_pass.items():
            t[torch.tensor(canon)] = parts[k][torch.tensor(rows)]
        if name in raw.scales:
            t = t * raw.scales[name]
        points[name] = t
    _canonical_discrete(points, cfg, gaps)
    info = {"passes": len(raw.passes), "tokens_missing": align.missing, "extra_rows": align.extra_rows,
            "duplicate_rows": align.duplicate_rows, "gaps": gaps}
    return points, info


def _canonical_discrete(points: dict, cfg: ModelConfig, gaps: dict) -> None:
    for name in [n for n in points if n.endswith("moe.weights")]:
        if name[: -len("weights")] + "experts" not in points:  # their order is the ids' order
            gaps[name] = "routing weights without their expert ids: order unknown"
            del points[name]
    for name in list(points):
        if name.endswith("moe.experts"):
            ids = points[name].long()
            order = torch.sort(ids, dim=-1)
            points[name] = order.values
            w = name[: -len("experts")] + "weights"
            if w in points:
                points[w] = points[w].gather(1, order.indices)
        elif name.endswith("attn.indexer_topk"):
            idx = points[name].long()
            k = cfg.index_topk
            if idx.shape[1] > k:
                gaps[name] = f"{idx.shape[1]} entries per token, more than index_topk={k}"
                del points[name]
                continue
            pad = torch.full((idx.shape[0], k - idx.shape[1]), -1, dtype=torch.long)
            points[name] = torch.cat([torch.where(idx < 0, -1, idx), pad], 1)


def capture_meta(raw: RawCapture, info: dict) -> dict:
    """What a Capture.meta carries about the capture itself."""
    return {"capture": {"passes": info["passes"], "tokens_missing": info["tokens_missing"],
                        "extra_rows": info["extra_rows"], "duplicate_rows": info["duplicate_rows"],
                        "gaps": info["gaps"], "unfired_taps": raw.notes.get("unfired", []),
                        "conflicts": raw.notes.get("conflicts", []),
                        "non_tensor": raw.notes.get("non_tensor", {}),
                        "when_errors": raw.notes.get("when_errors", {}),
                        "tp_ranks": raw.notes.get("tp_ranks", 1),
                        "rank_mismatch": raw.notes.get("rank_mismatch", {}),
                        "rank_missing": raw.notes.get("rank_missing", [])}}


def capture_points_from(recorders_or_raw, cfg: ModelConfig, sequences) -> tuple[dict, dict]:
    """Convenience: one Recorder / RawCapture per rank -> (points, meta)."""
    raws = [r.result() if isinstance(r, Recorder) else r for r in recorders_or_raw]
    raw = merge_ranks(raws)
    points, info = finalize(raw, cfg, sequences)
    return points, capture_meta(raw, info)


# --------------------------------------------------------------------------------------------
# Shared by the in-process launches (GPU only; nothing here imports an engine)
# --------------------------------------------------------------------------------------------

def engine_available(package: str) -> tuple[bool, str]:
    """Importable without importing it (find_spec), and a CUDA device present."""
    problems = []
    if importlib.util.find_spec(package) is None:
        problems.append(f"the Python package '{package}' is not installed")
    if not torch.cuda.is_available():
        problems.append(f"no CUDA device (torch {torch.__version__})")
    return (not problems), "; ".join(problems)


class GPUEngine(Engine):
    """An engine that needs its Python package and a CUDA device. `launch(case, **options)`
    (GPU only) returns (points, meta); V4 runs bf16 activations in every such engine, whatever
    precision was asked, so the capture declares bfloat16 and keeps the request in its meta."""
    package: str

    def available(self) -> tuple[bool, str]:
        return engine_available(self.package)

    def launch(self, case, **options) -> tuple[dict, dict]:
        raise NotImplementedError

    def run(self, case, precision: str, **options) -> Capture:
        ok, why = self.available()
        if not ok:
            raise EngineUnavailable(why)
        points, meta = self.launch(case, **options)
        meta["requested_precision"] = precision
        return Capture(points, self.name, "bfloat16", meta)


def checkpoint_config(cfg: ModelConfig, weight_format: str = "bf16") -> dict:
    """config.json in the keys DeepSeek's V4 release uses (as the engines' config classes read
    them: docs/engine-capture.md §1.1, §2.1, §3.1). Keys only some engine reads are marked."""
    conf = {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": 1, "head_dim": cfg.head_dim,
        "qk_rope_head_dim": cfg.rope_dim, "q_lora_rank": cfg.q_lora_rank, "o_lora_rank": cfg.o_lora_rank,
        "o_groups": cfg.o_groups, "sliding_window": cfg.window, "compress_ratios": list(cfg.compress_ratios),
        "compress_rope_theta": cfg.compress_rope_theta, "rope_theta": cfg.rope_theta,
        "rope_scaling": {"type": "yarn", "rope_type": "yarn", "factor": cfg.yarn_factor,
                         "original_max_position_embeddings": cfg.yarn_original_max_pos,
                         "beta_fast": cfg.yarn_beta_fast, "beta_slow": cfg.yarn_beta_slow},
        "max_position_embeddings": cfg.max_position_embeddings, "hc_mult": cfg.hc_mult,
        "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters, "hc_eps": cfg.hc_eps,
        "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.experts_per_tok, "moe_intermediate_size": cfg.moe_inter_dim,
        "num_hash_layers": cfg.num_hash_layers, "routed_scaling_factor": cfg.route_scale,
        "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc", "norm_topk_prob": True,
        "swiglu_limit": cfg.swiglu_limit, "index_n_heads": cfg.index_n_heads,
        "index_head_dim": cfg.index_head_dim, "index_topk": cfg.index_topk, "rms_norm_eps": cfg.rms_eps,
        "num_nextn_predict_layers": cfg.num_mtp_layers, "hidden_act": "silu", "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
        # TRT-LLM reads the MLA-style names (kv_lora_rank must be 448 there, docs/engine-capture.md §3.3)
        "kv_lora_rank": cfg.head_dim - cfg.rope_dim, "qk_nope_head_dim": cfg.head_dim - cfg.rope_dim,
        "v_head_dim": cfg.head_dim, "n_hash_layers": cfg.num_hash_layers, "n_group": 1, "topk_group": 1,
    }
    if weight_format == "fp8":
        conf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                       "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}
        conf["expert_dtype"] = "fp8"  # FP8 experts (as V4-Flash-Base), vLLM file A
    return conf


def write_checkpoint(case, out_dir, weight_format: str = "bf16") -> dict:
    """The case's weights as a checkpoint directory in DeepSeek's on-disk format: config.json
    plus model.safetensors with the release's tensor names (the case's own naming).

    bf16: matrices bf16 (exact: case weights are bf16-representable), mHC / sinks / biases /
    norms fp32, tid2eid int32. fp8: the linear layers (see `weights.is_fp8_linear`) as e4m3 +
    `<name>.scale` ue8m0 128x128 block scales, as V4 releases store them; this changes
    the weights, so the returned summary says by how much (the reference runs the case's
    unquantized weights). Returns {"path", "weight_format", "fp8_max_rel_error"}."""
    from safetensors.torch import save_file

    if weight_format not in ("bf16", "fp8"):
        raise ValueError(f"weight_format must be bf16 or fp8, not {weight_format!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict = {}
    worst = 0.0
    for name, t in case.params().items():
        if not t.is_floating_point():
            tensors[name] = t.to(torch.int32).contiguous()
        elif weight_format == "fp8" and is_fp8_linear(name, t):
            q, scale = fp8_block_quantize(t)
            tensors[name] = q
            tensors[name[: -len(".weight")] + ".scale"] = scale
            err = (fp8_dequantize(q, scale) - t.float()).norm() / t.float().norm().clamp(min=1e-30)
            worst = max(worst, float(err))
        elif t.dim() == 2 and name.endswith(".weight"):
            tensors[name] = t.to(torch.bfloat16).contiguous()
        else:
            tensors[name] = t.to(torch.float32).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "case": case.name})
    (out / "config.json").write_text(json.dumps(checkpoint_config(case.config, weight_format), indent=1))
    return {"path": str(out), "weight_format": weight_format,
            "fp8_max_rel_error": worst if weight_format == "fp8" else 0.0}

"""The tap language: where an engine exposes each canonical point (docs/design.md §4).

An engine adapter declares its capture as a list of `Tap`s (module path, canonical point name,
what to read) plus a `TokenSource` (where a forward pass starts and which token ids /
positions it runs). This module parses those declarations and reads values out of a call;
`recorder.py` attaches them to a module tree. docs/engines.md describes the language.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch


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
    merge  across tensor-parallel ranks, in corruptcheck/storage/shards.py's vocabulary: "replicated",
           "sum" (per-rank partial sums) or "concat:<dim>" (per-rank slices; the dim of the raw
           engine tensor).
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
    `method=None` uses a forward pre-hook instead. `pos=None`: the engine passes no positions
    (transformers derives them from its cache); passes then record none."""
    ids: str
    pos: str | None
    path: str = ""
    method: str | None = "forward"


# --------------------------------------------------------------------------------------------
# Reading values out of a call
# --------------------------------------------------------------------------------------------

_BASE = re.compile(r"^(out|in\[(?P<spec>[^\]]+)\]|state:(?P<state>[\w.]+))(?P<rest>(\[\d+\]|\.\w+)*)$")
_ACCESS = re.compile(r"\[(\d+)\]|\.(\w+)")


def parse_take(take: str):
    """take text -> (base, accessors): base ("out", None) | ("in", (name, index)) | ("state", path)."""
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


def read_value(call: Call, base, steps, root, rows):
    """The value a parsed take (`parse_take`) names in this call; `state:` tensors cut to `rows`."""
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


def format_point(template: str, layer: int | None, num_layers: int) -> str | None:
    """The point name for one layer (None: `{prev}` on the first layer)."""
    if layer is None:
        return template.format(last=num_layers - 1)
    if "{prev}" in template and layer == 0:
        return None
    return template.format(i=layer, prev=layer - 1, last=num_layers - 1)


def describe_tap(tap: Tap, layer) -> str:
    path = tap.path.replace("{i}", str(layer)) if layer is not None else tap.path
    where = f"{path}.{tap.method}()" if tap.method else (path or "<root>")
    call = f" call {tap.call}" if tap.call is not None else ""
    return f"{where}{call} {tap.take}"


def expand_tap(root, tap: Tap, num_layers: int):
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

"""The recorder: attaches `Tap`s to any `torch.nn.Module` tree and records each forward pass.

Forward hooks / method wrappers count calls per forward pass (fused ops run several times per
layer), snapshot each tensor to the CPU at hook time (shared buffers are overwritten by later
layers; aux CUDA streams are synced first, docs/engine-capture.md §7.10) and group the
tensors by forward pass, together with the pass's token ids and positions. The hooks do not
care whether the tree is the engine's real model or a fake with the same names
(tests/engine_trees.py), which is how this is tested without a GPU. One recorder per rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from corruptcheck.engines import progress
from corruptcheck.engines.taps import (
    Call,
    CaptureError,
    Tap,
    TokenSource,
    describe_tap,
    expand_tap,
    format_point,
    parse_take,
    read_value,
    resolve_attr,
)


def snapshot(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy taken now; device work (aux streams included) is synced first."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
    return t.detach().to("cpu", copy=True)


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



class HookRecorder:
    """Attach `taps` to a module tree, record each forward pass, detach.

    Usable as `with HookRecorder(...).attached(model) as rec:` or attach()/detach(); `result()`
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
            base, steps = parse_take(tap.take)
            for layer, obj in expand_tap(root, tap, self.num_layers):
                point = format_point(tap.point, layer, self.num_layers)
                if point is None:
                    continue
                b = _Binding(tap, layer, point, base, steps)
                key = (id(obj), tap.method)
                groups.setdefault(key, (obj, tap.method, []))[2].append(b)
                self._bound.append(b)
                self.notes["attached"].append(f"{describe_tap(tap, layer)} -> {point}")
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
        ids = read_value(call, *parse_take(self.tokens.ids), self.root, None)
        pos = None if self.tokens.pos is None else read_value(call, *parse_take(self.tokens.pos), self.root, None)
        if ids is None or (pos is None and self.tokens.pos is not None):
            raise CaptureError("could not read token ids / positions at the start of a forward pass")
        self.passes.append({"ids": snapshot(ids).reshape(-1).long(),
                            "pos": None if pos is None else snapshot(pos).reshape(-1).long(), "points": {}})
        self._counts.clear()
        progress.phase("forward", **{"pass": len(self.passes)})  # progress for an engine child's supervisor

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
            self.notes["conflicts"].append(f"{b.point} written twice in one pass ({describe_tap(b.tap, b.layer)})")
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
                self._store(b, read_value(call, b.base, b.steps, self.root, self._rows()))

    def _on_output(self, bindings, n, call):
        for b in bindings:
            if b.base[0] != "in" and self._applies(b, n, call):
                self._store(b, read_value(call, b.base, b.steps, self.root, self._rows()))

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
        unfired = sorted({f"{describe_tap(b.tap, b.layer)} -> {b.point}" for b in self._bound if id(b) not in self._fired})
        notes = {**self.notes, "unfired": unfired}
        rules = {b.point: b.tap.merge for b in self._bound}
        scales = {b.point: b.tap.scale for b in self._bound if b.tap.scale != 1.0}
        return RawCapture(self.passes, rules, scales, notes)


_MISSING = object()

"""One way to patch and undo: `Patcher` sets attributes and puts every one back, last first.
Faults (faults/), the hf engine's output patches (engines/hf.py) and the vLLM runtime's
workarounds and fixes (engines/vllm_cpu.py) all patch through it, inside `patched()`.

`wrap` replaces a callable by `make(original)`; `before`, `map_args`, `map_output`, `during`
and `blend` are the shapes most patches take, written once; `under` and `mapped` are the faulty
calls `blend` takes; `lerp` is the blend itself (docs/faults.md §Magnitude knobs)."""
from __future__ import annotations

from contextlib import contextmanager

import torch


def lerp(clean, faulty, m: float):
    """clean + m·(faulty − clean): exactly `clean` at m = 0 and exactly `faulty` at m = 1 (the
    ends are returned as they are, never recomputed). Tensors blend in float32 (float64 for
    float64) and come back in clean's dtype; tuples and lists blend element by element; numbers
    blend as numbers."""
    if m == 0:
        return clean
    if m == 1:
        return faulty
    if isinstance(clean, (tuple, list)):
        return type(clean)(lerp(c, f, m) for c, f in zip(clean, faulty, strict=True))
    if isinstance(clean, torch.Tensor):
        if not clean.is_floating_point():
            raise TypeError(f"cannot blend a {clean.dtype} tensor (a discrete result): give the fault another knob")
        acc = torch.float64 if clean.dtype == torch.float64 else torch.float32
        c = clean.to(acc)
        return (c + m * (faulty.to(acc) - c)).to(clean.dtype)
    if clean is None:
        return None
    return clean + m * (faulty - clean)


class Patcher:
    """Sets attributes and puts every one back, last first (`restore`).

    `wrap` replaces a callable by `make(original)`; `before`, `map_args`, `map_output` and
    `during` are the shapes most patches take, written once."""

    _MISSING = object()

    def __init__(self):
        self._undo: list = []

    def set(self, obj, name: str, value) -> None:
        old = vars(obj).get(name, self._MISSING)
        setattr(obj, name, value)
        self._undo.append((obj, name, old))

    def wrap(self, obj, name: str, make) -> None:
        """Replace `obj.name` by `make(original)`."""
        self.set(obj, name, make(getattr(obj, name)))

    def before(self, obj, name: str, fn) -> None:
        """Every call of `obj.name` first calls `fn` with the same arguments."""
        def make(orig):
            def wrapper(*args, **kwargs):
                fn(*args, **kwargs)
                return orig(*args, **kwargs)
            return wrapper
        self.wrap(obj, name, make)

    def map_args(self, obj, name: str, fn) -> None:
        """`obj.name(*args, **kwargs)` runs the original on `fn(*args, **kwargs)` -> (args, kwargs)."""
        def make(orig):
            def wrapper(*args, **kwargs):
                args, kwargs = fn(*args, **kwargs)
                return orig(*args, **kwargs)
            return wrapper
        self.wrap(obj, name, make)

    def map_output(self, obj, name: str, fn) -> None:
        """`obj.name(*args, **kwargs)` returns `fn(result, *args, **kwargs)` of the original's result."""
        def make(orig):
            def wrapper(*args, **kwargs):
                return fn(orig(*args, **kwargs), *args, **kwargs)
            return wrapper
        self.wrap(obj, name, make)

    def during(self, obj, name: str, install) -> None:
        """Each call of `obj.name` first runs `install(p2, *args, **kwargs)`, which may patch more
        through `p2`; those patches are undone when the call returns."""
        def make(orig):
            def wrapper(*args, **kwargs):
                with patched() as p2:
                    install(p2, *args, **kwargs)
                    return orig(*args, **kwargs)
            return wrapper
        self.wrap(obj, name, make)

    def blend(self, obj, name: str, m: float, faulty) -> None:
        """`obj.name`, a pure function (it writes no state), returns clean + m·(faulty − clean)
        (`lerp`), faulty being `faulty(original, *args, **kwargs)` (`under`, `mapped`): the
        faulty result alone at m = 1, both in between; at m = 0 the faulty call still runs (it
        counts the firing) and the clean result is returned."""
        def make(orig):
            def wrapper(*args, **kwargs):
                bad = faulty(orig, *args, **kwargs)
                return bad if m == 1 else lerp(orig(*args, **kwargs), bad, m)
            return wrapper
        self.wrap(obj, name, make)

    def restore(self) -> None:
        while self._undo:
            obj, name, old = self._undo.pop()
            if old is self._MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)


def under(install):
    """A `Patcher.blend` faulty call: the original with `install(p2, *args, **kwargs)`'s patches
    active (as `Patcher.during`)."""
    def faulty(orig, *args, **kwargs):
        with patched() as p2:
            install(p2, *args, **kwargs)
            return orig(*args, **kwargs)
    return faulty


def mapped(fn):
    """A `Patcher.blend` faulty call: the original on `fn(*args, **kwargs)` -> (args, kwargs)
    (as `Patcher.map_args`)."""
    def faulty(orig, *args, **kwargs):
        args, kwargs = fn(*args, **kwargs)
        return orig(*args, **kwargs)
    return faulty


@contextmanager
def patched():
    p = Patcher()
    try:
        yield p
    finally:
        p.restore()

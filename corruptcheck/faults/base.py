"""The fault mechanism (docs/faults.md): `Fault`, what it did in a run (`FaultState`), the
`Patcher` its patches go through, layer tracking, and `FaultyEngine`.

Each fault is a small class naming the real bug it mirrors (an entry of
the catalog in docs/faults.md §Catalog, or a trap of docs/v4-spec.md §10 where the catalog
has no entry), its class in the catalog's taxonomy (A1..A12), the canonical point it strikes
first (where localization must point), and the condition under which the real bug fired.

A fault applies to an *engine run only*: `FaultyEngine(inner, fault)` installs the fault's
patches around `inner.run(...)` and restores everything afterwards (in `finally`), so the
reference that `compare` loads or computes, its teacher forcing and the noise measurement stay
honest. For the `hf` engine the patches wrap methods of transformers' DeepSeek V4 classes (or
module-level helpers, looked up where they are called); for the `reference` engine they wrap
functions of `corruptcheck.reference.*` in the module that calls them.

Every patch counts when it took the defect's path (`FaultState.hit`) and records the layers
where it did: a (fault, case) pair whose fault never fired is *not exercised*.
`Fault.triggered(cfg, seq_lens, engine)` states the same condition statically (None when it
depends on activations), so a runner can skip runs that cannot fire.

Magnitude (docs/faults.md §Magnitude knobs): every fault has a knob `m` in [0, 1], named by its
`knob` line. m = 1 (the default) is the re-enacted bug bit for bit, m = 0 changes nothing (the
patches still run and count firings, but compute the clean result); `fault.at(m)` is a copy at
magnitude m. A knob either blends the output of a pure function (`lerp`, `Patcher.blend`:
clean + m·(faulty − clean)), scales the defect's own parameter inside the patch, or applies the
defect to a fraction m of rows (`affected`).
"""
from __future__ import annotations

import copy
import importlib
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from corruptcheck.engines.base import Capture, Engine, EngineWrapper
from corruptcheck.errors import BadInput
from corruptcheck.reference import ModelConfig
from corruptcheck.reference import model as r_model

HF_MODULE = "transformers.models.deepseek_v4.modeling_deepseek_v4"
ENGINES = ("hf", "reference", "vllm")  # vllm: corruptcheck.faults.vllm


def hf_module():
    return importlib.import_module(HF_MODULE)


# ---------------------------------------------------------------------------------------------
# magnitude

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


_GOLDEN = (math.sqrt(5) - 1) / 2


def affected(index: torch.Tensor, m: float) -> torch.Tensor:
    """Which of the rows numbered `index` (token positions, entry or vocabulary ids) a fault
    applied to a fraction m of rows touches: row i iff frac((i + 1)·φ⁻¹) < m. Evenly spread at
    every m, nested (the rows at m are among those at any larger m), all at m = 1, none at 0."""
    if m >= 1:
        return torch.ones(index.shape, dtype=torch.bool)
    return torch.remainder((index.to(torch.float64) + 1) * _GOLDEN, 1.0) < m


# ---------------------------------------------------------------------------------------------
# patching

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


@dataclass
class FaultState:
    """What a fault did during one engine run."""
    fired: int = 0  # how many times a patch took the defect's path (at any magnitude)
    where: str | None = None  # first layer key where it fired: "layers.i" or "mtp.0"
    layers: list = field(default_factory=list)  # every layer key where it fired, in order
    layer: str | None = None  # the layer running now (set by the layer trackers)
    scratch: dict = field(default_factory=dict)

    def hit(self, n: int = 1, where: str | None = None) -> None:
        if n <= 0:
            return
        self.fired += int(n)
        key = where or self.layer
        if self.where is None:
            self.where = key
        if key is not None and key not in self.layers:
            self.layers.append(key)


def _layer_key(cfg: ModelConfig, layer) -> str:
    return "mtp.0" if layer == cfg.num_layers else f"layers.{layer}"


def _track_hf_layers(p: Patcher, state: FaultState) -> None:
    def enter(self_l, *args, **kwargs):
        state.layer = f"layers.{self_l.layer_idx}"
    p.before(hf_module().DeepseekV4DecoderLayer, "forward", enter)


def _track_reference_layers(p: Patcher, state: FaultState) -> None:
    def enter(x, ids, params, layer, cfg, *rest, **kwargs):
        state.layer = _layer_key(cfg, layer)
    p.before(r_model, "block", enter)


# ---------------------------------------------------------------------------------------------
# faults

class Fault:
    """A named fault. Subclasses set the class attributes and implement `hf` / `reference`
    (install patches through `p`, count firings on `state`) and `triggered`."""

    name: str = ""
    catalog: str = ""  # catalog entry id(s), e.g. "V4-01"
    klass: str = ""  # taxonomy class, e.g. "A1"
    summary: str = ""  # one line: what goes wrong
    trigger: str = "always"  # one line: when the real bug fired
    # canonical point suffixes under the layer where it strikes, earliest first; the expected
    # culprit is the first one the engine exposes
    points: tuple[str, ...] = ()
    # further points localization accepts because the fault genuinely strikes there too
    # (documented per fault; empty for most)
    also: tuple[str, ...] = ()
    engines: tuple[str, ...] = ("hf", "reference")  # engines it is implemented for
    knob: str = ""  # one line: what the magnitude m scales (m = 1: the bug, m = 0: no effect)
    magnitude: float = 1.0

    def at(self, m: float) -> "Fault":
        """A copy of this fault at magnitude m in [0, 1] (docs/faults.md §Magnitude knobs)."""
        try:
            m = float(m)
        except (TypeError, ValueError):
            raise BadInput(f"fault magnitude {m!r} is not a number") from None
        if not 0.0 <= m <= 1.0:
            raise BadInput(f"fault magnitude {m!r} is outside [0, 1]")
        out = copy.copy(self)
        out.magnitude = m
        return out

    def triggered(self, cfg: ModelConfig, seq_lens, engine: str) -> bool | None:
        """Can the fault fire on this case and engine? None: depends on activations."""
        return True

    def hf(self, p: Patcher, state: FaultState, cfg: ModelConfig) -> None:  # pragma: no cover
        raise NotImplementedError

    def reference(self, p: Patcher, state: FaultState, cfg: ModelConfig) -> None:  # pragma: no cover
        raise NotImplementedError

    def vllm(self, p: Patcher, state: FaultState, cfg: ModelConfig) -> None:  # pragma: no cover
        raise NotImplementedError

    @contextmanager
    def active(self, engine: str, cfg: ModelConfig, state: FaultState):
        """Install the fault for `engine` (one of `self.engines`); everything is restored on exit."""
        if engine not in self.engines:
            raise BadInput(f"fault {self.name!r} has no implementation for engine {engine!r}; "
                           f"it applies to: {', '.join(self.engines)}")
        with patched() as p:
            if engine == "hf":
                _track_hf_layers(p, state)
                self.hf(p, state, cfg)
            elif engine == "vllm":
                from corruptcheck.faults.vllm import _track_vllm_layers

                _track_vllm_layers(p, state)
                self.vllm(p, state, cfg)
            else:
                _track_reference_layers(p, state)
                self.reference(p, state, cfg)
            yield state

    def expected_candidates(self, where: str) -> list[str]:
        return [f"{where}.{s}" for s in self.points]

    def equivalents(self, where: str) -> list[str]:
        return [f"{where}.{s}" for s in self.also]

    def accepted(self, expected: str, where: str, layers) -> list[str]:
        """Culprits localization accepts: the expected point and the fault's documented
        equivalents, at the first layer where it fired, or — the fault striking there too — at
        any later layer where it fired (e.g. a bf16 run whose first-layer effect hides in the
        noise)."""
        suffixes = [expected[len(where) + 1:]] + list(self.also)
        return [f"{layer}.{s}" for layer in [where] + [x for x in layers if x != where] for s in suffixes]

    def describe(self) -> str:
        """One line: name first (`selftest --list`)."""
        also = f" (or {'|'.join(self.also)})" if self.also else ""
        return (f"{self.name}\t{self.klass}\t{self.catalog}\tstrikes {'|'.join(self.points)}{also}\t"
                f"trigger: {self.trigger}\t{self.summary}\tknob m: {self.knob}")


def _has_layer(cfg: ModelConfig, kinds, engine: str, mtp: bool = True) -> bool:
    layers = list(range(cfg.num_layers))
    if mtp and engine == "reference" and cfg.num_mtp_layers:
        layers.append(cfg.num_layers)  # transformers has no MTP block; the reference runs it
    return any(cfg.layer_type(i) in kinds for i in layers)


# ---------------------------------------------------------------------------------------------
# the engine wrapper

class FaultyEngine(EngineWrapper):
    """`inner` with `fault` active during its run only (pass it to `compare(..., engine=)`), at
    the fault's magnitude (`fault.at(m)`; a registry fault is m = 1). After a run, `state` says
    whether and where the fault fired."""

    def __init__(self, inner: Engine, fault: Fault):
        at = "" if fault.magnitude == 1 else f"@{fault.magnitude:.3g}"
        super().__init__(inner, f"{inner.name}+{fault.name}{at}")
        self.fault = fault
        self.state: FaultState | None = None

    def run(self, case, precision: str, **options) -> Capture:
        state = FaultState()
        with self.fault.active(self.inner.name, case.config, state):
            cap = self.inner.run(case, precision, **options)
        self.state = state
        cap.meta = {**cap.meta, "fault": self.fault.name, "fault_magnitude": self.fault.magnitude,
                    "fault_fired": state.fired, "fault_where": state.where}
        return cap

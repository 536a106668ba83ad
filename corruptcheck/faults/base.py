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
from corruptcheck.engines.patching import Patcher, patched
from corruptcheck.errors import BadInput
from corruptcheck.points import MTP, block
from corruptcheck.reference import ModelConfig
from corruptcheck.reference import model as r_model

HF_MODULE = "transformers.models.deepseek_v4.modeling_deepseek_v4"
ENGINES = ("hf", "reference", "vllm")  # vllm: corruptcheck.faults.vllm


def hf_module():
    return importlib.import_module(HF_MODULE)


# ---------------------------------------------------------------------------------------------
# magnitude

_GOLDEN = (math.sqrt(5) - 1) / 2


def affected(index: torch.Tensor, m: float) -> torch.Tensor:
    """Which of the rows numbered `index` (token positions, entry or vocabulary ids) a fault
    applied to a fraction m of rows touches: row i iff frac((i + 1)·φ⁻¹) < m. Evenly spread at
    every m, nested (the rows at m are among those at any larger m), all at m = 1, none at 0."""
    if m >= 1:
        return torch.ones(index.shape, dtype=torch.bool)
    return torch.remainder((index.to(torch.float64) + 1) * _GOLDEN, 1.0) < m


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
    return block(MTP if layer == cfg.num_layers else layer)


def _track_hf_layers(p: Patcher, state: FaultState) -> None:
    def enter(self_l, *args, **kwargs):
        state.layer = block(self_l.layer_idx)
    p.before(hf_module().DeepseekV4DecoderLayer, "forward", enter)


def _track_reference_layers(p: Patcher, state: FaultState) -> None:
    def enter(x, ids, params, layer, cfg, *rest, **kwargs):
        state.layer = _layer_key(cfg, layer)
    p.before(r_model, "block", enter)


# engine -> how a fault run learns which layer is running (`FaultState.layer`); an engine's
# fault module registers its own (faults/vllm.py registers "vllm" when it is imported, as every
# vLLM fault is)
LAYER_TRACKERS = {"hf": _track_hf_layers, "reference": _track_reference_layers}


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
    served: bool = False  # only a served run (chunked prefill, decode steps) can show it
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
            LAYER_TRACKERS[engine](p, state)
            getattr(self, engine)(p, state, cfg)
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

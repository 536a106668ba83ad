"""The engine interface: a name, an availability check, and `run(case, precision)` returning
canonical points ({name: tensor}, tokens flattened over the batch; docs/design.md §4, §9)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from corruptcheck.cases import Case


@dataclass
class Capture:
    points: dict[str, torch.Tensor]
    engine: str
    precision: str
    meta: dict = field(default_factory=dict)


class Engine:
    name: str = ""
    extra: str | None = None  # pip extra that provides it
    options: tuple = ()  # engines.options.Option: the settings it takes as KEY=VALUE text
    # runs a schedule.Schedule (chunked prefill, greedy decode) when `run(..., schedule=S)` and
    # returns meta["served"] = {"sequences": token ids fed, "rows": (phase, index) per token row}
    serves: bool = False

    # run in a supervised child process by default (compare's engine_process "auto"): the real
    # engines, whose kernels can kill the process that runs them (engines/child_engine.py)
    runs_in_child: bool = False
    # its input says what precision it ran at (a dump's manifest): compare's --dtype may be left out
    declares_precision: bool = False

    @classmethod
    def default_case(cls, options: dict) -> str | None:
        """The case its input names when --case is left out (a dump: its manifest's), or None."""
        return None

    @classmethod
    def parse_options(cls, raw: dict) -> dict:
        from corruptcheck.engines.options import COMMON, parse_options

        return parse_options(cls.name or cls.__name__, (*cls.options, *COMMON), raw)

    def available(self) -> tuple[bool, str]:
        return True, ""

    def installed(self) -> bool:
        """Installed, even where it cannot run (then installing its extra would not help)."""
        return False

    def weights_case(self, case: Case, **options) -> Case:
        """The case whose weights this run holds: the case itself, or, for an engine that rounds
        the case's weights as it stores them (a Q8_0 GGUF), the case variant whose weights are
        the numbers it really loads; compare runs the engine and the reference on that one."""
        return case

    def run(self, case: Case, precision: str, **options) -> Capture:  # pragma: no cover - interface
        raise NotImplementedError


class EngineWrapper(Engine):
    """An engine that runs `inner` with something around it (a fault, a recorder): `inner`'s
    extra, availability and serving, and `inner`'s name unless given another."""

    def __init__(self, inner: Engine, name: str | None = None):
        self.inner, self.name, self.extra = inner, name or inner.name, inner.extra

    def available(self) -> tuple[bool, str]:
        return self.inner.available()

    def installed(self) -> bool:
        return self.inner.installed()

    @property
    def serves(self) -> bool:
        return getattr(self.inner, "serves", False)

    def weights_case(self, case: Case, **options) -> Case:
        return self.inner.weights_case(case, **options)

"""The registry of defect hypotheses the diagnosis ranks (docs/diagnosis.md).

A hypothesis is a fault class of the catalog (corruptcheck/faults/) applied to the reference:
its `reference` implementation, at a magnitude m in [0, 1] that the diagnosis fits (m = 1 is
the re-enacted defect, m = 0 the reference itself; what m scales is the fault's `knob`). One
implementation of each idea: a hypothesis adds no arithmetic of its own, only the sub-block
kind it belongs to and, where one exists, the physical parameter its fitted m stands for (the
clamp restored, the scale factor, the fraction of rows).

`HYPOTHESES` (name -> Hypothesis) holds every model fault of the self-test, the routed and
shared halves of the SwiGLU clamp, and vLLM's dropped routed scaling (its reference form);
`hypotheses_for(names, without)` selects from it."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from corruptcheck.engines.patching import lerp, patched
from corruptcheck.errors import BadInput
from corruptcheck.faults import MODEL_FAULTS, Fault, FaultState
from corruptcheck.faults.attention import yarn_mscale
from corruptcheck.faults.base import LAYER_TRACKERS
from corruptcheck.faults.moe import RoutedExpertsNoClamp
from corruptcheck.faults.vllm import RoutedScalingIgnored
from corruptcheck.reference import ModelConfig


@dataclass(frozen=True)
class Hypothesis:
    """A defect hypothesis: `fault`'s reference implementation at a fitted magnitude m."""
    fault: Fault
    kind: str  # the sub-block kind it strikes: mhc, norm, attention, compressor, indexer, router, experts
    # m -> the physical parameters it stands for ({} when m itself is the parameter)
    physical: Callable[[float, ModelConfig], dict] | None = None

    @property
    def name(self) -> str:
        return self.fault.name

    def params(self, m: float, cfg: ModelConfig) -> dict:
        """The fitted parameters: the magnitude m and what it stands for."""
        return {"m": round(float(m), 4), **({k: round(float(v), 6) for k, v in self.physical(m, cfg).items()}
                                             if self.physical else {})}

    @contextmanager
    def active(self, cfg: ModelConfig, m: float):
        """The reference with this defect at magnitude m, inside the block; yields the fault's
        state (`fired` = 0: the defect's path was never taken, the hypothesis does not apply)."""
        state = FaultState()
        with patched() as p:
            LAYER_TRACKERS["reference"](p, state)
            self.fault.at(m).reference(p, state, cfg)
            yield state

    def describe(self) -> str:
        """One line (`corruptcheck hypotheses`)."""
        return f"{self.name}\t{self.kind}\t{self.fault.klass}\t{self.fault.summary}\t{self.fault.knob}"


_KIND = {
    "mhc-pre-hidden-guard": "mhc pre", "mhc-norm-sqrt2": "norm", "sinkhorn-19-iters": "mhc comb",
    "mhc-comb-transposed": "mhc post", "router-split-k-tail": "router", "routing-weights-biased": "router",
    "shared-expert-no-clamp": "shared expert", "yarn-on-sliding": "attention rope",
    "yarn-mscale-softmax": "attention core", "csa-prev-window-lost": "compressor", "indexer-rope-neox": "indexer",
    "window-off-by-one": "attention mask", "hca-causal-off-by-one": "attention mask",
}

_PHYSICAL = {
    "yarn-mscale-softmax": lambda m, cfg: {"softmax_scale_factor": lerp(1.0, yarn_mscale(cfg.yarn_factor) ** 2, m)},
    "router-split-k-tail": lambda m, cfg: {"tail_weight": 1.0 - m},
    "csa-prev-window-lost": lambda m, cfg: {"previous_half_weight": 1.0 - m},
    "window-off-by-one": lambda m, cfg: {"rows_with_window_plus_one": m},
    "hca-causal-off-by-one": lambda m, cfg: {"rows_seeing_own_block": m},
    "shared-expert-no-clamp": lambda m, cfg: {"clamped_part_restored": m},
    "routed-experts-no-clamp": lambda m, cfg: {"clamped_part_restored": m},
    "vllm-routed-scaling-ignored": lambda m, cfg: {"routed_scaling_factor": lerp(cfg.route_scale, 1.0, m)},
}


def _build() -> dict:
    faults = [*MODEL_FAULTS, RoutedExpertsNoClamp(), RoutedScalingIgnored()]
    kinds = {**_KIND, "routed-experts-no-clamp": "experts", "vllm-routed-scaling-ignored": "router"}
    return {f.name: Hypothesis(f, kinds[f.name], _PHYSICAL.get(f.name)) for f in faults}


HYPOTHESES: dict[str, Hypothesis] = _build()


def hypotheses_for(names=None, without=()) -> list[Hypothesis]:
    """The hypotheses named (default: all), less those in `without`, in registry order."""
    for n in [*(names or ()), *without]:
        if n not in HYPOTHESES:
            raise BadInput(f"unknown hypothesis {n!r}; known: {', '.join(HYPOTHESES)}")
    chosen = list(names) if names else list(HYPOTHESES)
    return [h for n, h in HYPOTHESES.items() if n in chosen and n not in set(without)]

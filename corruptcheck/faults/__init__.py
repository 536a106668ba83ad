"""Deterministic re-enactments of real silent-corruption bugs (docs/faults.md).

The mechanism (`Fault`, `FaultState`, `Patcher`, `FaultyEngine`) is in `base`; the faults of
the `hf` and `reference` engines are grouped by the part of the model they strike (`mhc`,
`moe`, `attention`); vLLM's own faults are in `vllm`, the faults only a served model shows in
`serving`. This module holds the one registry, `FAULTS` (every fault by name), and its views:
`faults_for(engine, served)` (the faults implemented for an engine, of one kind), `get_fault(name)`.
"""
from __future__ import annotations

from corruptcheck.errors import BadInput
from corruptcheck.faults.attention import (CsaPrevWindowLost, HcaCausalOffByOne, IndexerRopeLayout,
                                           WindowOffByOne, YarnMscaleSoftmax, YarnOnSliding, half_split,
                                           yarn_mscale)
from corruptcheck.engines.patching import Patcher, patched
from corruptcheck.faults.base import ENGINES, HF_MODULE, Fault, FaultState, FaultyEngine, hf_module
from corruptcheck.faults.mhc import MhcCombTransposed, MhcNormSqrt2, MhcPreHiddenGuard, SinkhornShort
from corruptcheck.faults.moe import RouterSplitKTail, RoutingWeightsBiased, SharedExpertNoClamp
from corruptcheck.faults.serving import SERVING_FAULTS, ServingFault
from corruptcheck.faults.vllm import VLLM_FAULTS, VLLMFault
from corruptcheck.faults.llamacpp import LLAMACPP_FAULTS

MODEL_FAULTS: tuple[Fault, ...] = (
    MhcPreHiddenGuard(), RouterSplitKTail(), MhcNormSqrt2(), SharedExpertNoClamp(), RoutingWeightsBiased(),
    YarnOnSliding(), YarnMscaleSoftmax(), SinkhornShort(), CsaPrevWindowLost(), IndexerRopeLayout(),
    WindowOffByOne(), HcaCausalOffByOne(), MhcCombTransposed(),
)
FAULTS: dict[str, Fault] = {f.name: f for f in (*MODEL_FAULTS, *SERVING_FAULTS, *VLLM_FAULTS, *LLAMACPP_FAULTS)}


def faults_for(engine: str, served: bool = False) -> dict[str, Fault]:
    """The faults implemented for `engine`, in registry order: those any run shows
    (served=False: the self-test's matrix and the sensitivity families) or those only a served
    run shows (served=True)."""
    return {n: f for n, f in FAULTS.items() if engine in f.engines and f.served == served}


def get_fault(name: str) -> Fault:
    try:
        return FAULTS[name]
    except KeyError:
        raise BadInput(f"unknown fault {name!r}; known faults: {', '.join(FAULTS)}") from None


__all__ = [
    "ENGINES", "FAULTS", "HF_MODULE", "MODEL_FAULTS", "SERVING_FAULTS", "VLLM_FAULTS", "CsaPrevWindowLost", "Fault", "FaultState",
    "FaultyEngine", "HcaCausalOffByOne", "IndexerRopeLayout", "MhcCombTransposed", "MhcNormSqrt2",
    "MhcPreHiddenGuard", "Patcher", "RouterSplitKTail", "RoutingWeightsBiased", "ServingFault",
    "SharedExpertNoClamp", "SinkhornShort", "VLLMFault", "WindowOffByOne", "YarnMscaleSoftmax", "YarnOnSliding",
    "faults_for", "get_fault", "half_split", "hf_module", "patched", "yarn_mscale",
]

"""Deterministic re-enactments of real silent-corruption bugs (docs/faults.md).

The mechanism (`Fault`, `FaultState`, `Patcher`, `FaultyEngine`) is in `base`; the faults of
the `hf` and `reference` engines are grouped by the part of the model they strike (`mhc`,
`moe`, `attention`); vLLM's own faults are in `vllm`, the faults only a served model shows in
`serving`. This module holds the registries: `FAULTS` (hf / reference), `faults_for(engine)`,
`get_fault(name)`.
"""
from __future__ import annotations

from corruptcheck.errors import BadInput
from corruptcheck.faults.attention import (CsaPrevWindowLost, HcaCausalOffByOne, IndexerRopeLayout,
                                           WindowOffByOne, YarnMscaleSoftmax, YarnOnSliding, half_split,
                                           yarn_mscale)
from corruptcheck.faults.base import (ENGINES, HF_MODULE, Fault, FaultState, FaultyEngine, Patcher, hf_module,
                                      patched)
from corruptcheck.faults.mhc import MhcCombTransposed, MhcNormSqrt2, MhcPreHiddenGuard, SinkhornShort
from corruptcheck.faults.moe import RouterSplitKTail, RoutingWeightsBiased, SharedExpertNoClamp
from corruptcheck.faults.serving import SERVING_FAULTS, ServingFault
from corruptcheck.faults.vllm import VLLM_FAULTS, VLLMFault
from corruptcheck.faults.llamacpp import LLAMACPP_FAULTS

FAULTS: dict[str, Fault] = {f.name: f for f in (
    MhcPreHiddenGuard(), RouterSplitKTail(), MhcNormSqrt2(), SharedExpertNoClamp(), RoutingWeightsBiased(),
    YarnOnSliding(), YarnMscaleSoftmax(), SinkhornShort(), CsaPrevWindowLost(), IndexerRopeLayout(),
    WindowOffByOne(), HcaCausalOffByOne(), MhcCombTransposed(),
)}


def faults_for(engine: str) -> dict[str, Fault]:
    """The registry of faults implemented for `engine`: FAULTS for hf / reference, the vLLM
    faults (`corruptcheck.faults.vllm.VLLM_FAULTS`, patches of vLLM's own code) for vllm."""
    if engine == "vllm":
        return VLLM_FAULTS
    if engine == "llamacpp":
        return LLAMACPP_FAULTS
    return FAULTS


def get_fault(name: str) -> Fault:
    known = {**FAULTS, **VLLM_FAULTS, **LLAMACPP_FAULTS}
    try:
        return known[name]
    except KeyError:
        raise BadInput(f"unknown fault {name!r}; known faults: {', '.join(known)}") from None


__all__ = [
    "ENGINES", "FAULTS", "HF_MODULE", "SERVING_FAULTS", "VLLM_FAULTS", "CsaPrevWindowLost", "Fault", "FaultState",
    "FaultyEngine", "HcaCausalOffByOne", "IndexerRopeLayout", "MhcCombTransposed", "MhcNormSqrt2",
    "MhcPreHiddenGuard", "Patcher", "RouterSplitKTail", "RoutingWeightsBiased", "ServingFault",
    "SharedExpertNoClamp", "SinkhornShort", "VLLMFault", "WindowOffByOne", "YarnMscaleSoftmax", "YarnOnSliding",
    "faults_for", "get_fault", "half_split", "hf_module", "patched", "yarn_mscale",
]

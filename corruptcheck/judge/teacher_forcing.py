"""The teacher-forcing runner: the reference's sub-blocks (a layer's attention half, its FFN
half, the head) and one of them run on given inputs, usually an engine's own captured input
to it (docs/design.md §3). Localization (localize.py), the local noise (noise.py) and the
release check's units (release/unit_check.py) all run sub-blocks through here."""
from __future__ import annotations

import torch

from corruptcheck.cases import Case
from corruptcheck.points import MTP, point
from corruptcheck.reference import ModelConfig
from corruptcheck.reference.model import run_part


def sub_blocks(cfg: ModelConfig, unit: str | None = None) -> list[tuple]:
    """(part, layer, input point) of every teacher-forcible sub-block, in order; or only those of
    one release-check `unit` ("layers.<i>", "mtp.0" or "head")."""
    if unit == "head":
        return [("head", None, point(cfg.num_layers - 1, "out"))]
    if unit is not None:
        layer = MTP if unit == MTP else int(unit.split(".")[1])
        parts = [("attn", layer, point(layer, "attn_hc.in")), ("ffn", layer, point(layer, "ffn_hc.in"))]
        return parts + ([("head", MTP, point(MTP, "out"))] if layer == MTP else [])
    layers = list(range(cfg.num_layers)) + ([MTP] if cfg.num_mtp_layers else [])
    out = [(part, layer, point(layer, f"{part}_hc.in")) for layer in layers for part in ("attn", "ffn")]
    out.append(("head", None, point(cfg.num_layers - 1, "out")))
    if cfg.num_mtp_layers:
        out.append(("head", MTP, point(MTP, "out")))
    return out


def experts_point(layer) -> str:
    """The point holding a layer's (main index or "mtp.0") chosen expert ids."""
    return point(layer, "moe.experts")


def choice_dependent(cfg: ModelConfig, part: str, layer) -> bool:
    """Does the sub-block's output depend on a learned expert choice (an FFN sub-block of a
    learned-routing layer)? There an honest run may pick another of two near-equal experts."""
    if part != "ffn":
        return False
    return not cfg.is_hash_layer(cfg.num_layers if layer == MTP else layer)


def local_points(case: Case, part: str, layer, inputs: torch.Tensor, precision, choices: dict | None = None) -> dict:
    """Teacher-forced outputs of one sub-block on `inputs`, without the input point itself.
    `choices` (a dict of points holding the layer's `moe.experts`): the expert ids an FFN
    sub-block runs instead of its router's own (`reference.moe.given_choices`)."""
    experts = (choices or {}).get(experts_point(layer)) if part == "ffn" else None
    out = run_part(case.config, case.params(), part, layer, inputs, case.sequences(), precision,
                   experts=experts if isinstance(experts, torch.Tensor) else None)
    out.pop(point(layer, "attn_hc.in" if part == "attn" else "ffn_hc.in"), None)
    return out

"""Write a case's weights as a DeepSeek V4 release checkpoint (docs/checkpoints.md): the format
release/reader.py reads, written by this code so that nothing is downloaded.

Stored as the post-trained releases store them: FP8 linears F8_E4M3 with F8_E8M0 128x128
block scales; routed experts MXFP4 (I8, two e2m1 per byte, low nibble first, F8_E8M0 per 32
columns) or, with `experts="fp8"`, F8_E4M3 with F32 128x128 scales as the Base checkpoints
ship them; embedding, head, router, compressor and indexer projections and every RMSNorm
weight BF16; mHC, sinks, compressor position biases and router biases F32; `tid2eid` I64.
The shards are balanced by bytes in parameter order; the index and config.json are written
last, and the whole directory is built aside and moved into place, so an interrupted write
never leaves a checkpoint that looks complete.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from corruptcheck.engines.checkpoint import checkpoint_config
from corruptcheck.errors import BadInput
from corruptcheck.reference.quant import fp8_block_quantize, mxfp4_quantize
from corruptcheck.release.reader import CONFIG, INDEX, ReleaseCheckpoint
from corruptcheck.weights import is_fp8_linear, is_routed_expert

EXPERT_FORMATS = ("fp4", "fp8")


def _scale_name(name: str) -> str:
    return name[: -len(".weight")] + ".scale"


def stored_format(name: str, t: torch.Tensor, experts: str) -> str:
    """How the release stores a parameter (module docstring): int64, mxfp4, fp8 (E8M0 scales),
    fp8-f32 (F32 scales: the Base releases' FP8 experts), bf16 or f32."""
    if not t.is_floating_point():
        return "int64"
    if is_routed_expert(name):
        return "mxfp4" if experts == "fp4" else "fp8-f32"
    if is_fp8_linear(name, t):
        return "fp8"
    return "bf16" if name.endswith(".weight") else "f32"


# bytes per value of each format, scales included (planning only)
BYTES_PER_VALUE = {"int64": 8, "mxfp4": 0.5 + 1 / 32, "fp8": 1, "fp8-f32": 1, "bf16": 2, "f32": 4}


def encode(name: str, t: torch.Tensor, experts: str) -> dict[str, torch.Tensor]:
    """The stored tensors of one parameter (the weight and, quantized, its scale)."""
    fmt = stored_format(name, t, experts)
    if fmt == "int64":
        return {name: t.to(torch.int64).contiguous()}
    if fmt == "mxfp4":
        packed, scale = mxfp4_quantize(t)
        return {name: packed.contiguous(), _scale_name(name): scale.contiguous()}
    if fmt in ("fp8", "fp8-f32"):
        q, scale = fp8_block_quantize(t)
        stored_scale = scale if fmt == "fp8-f32" else scale.to(torch.float8_e8m0fnu)
        return {name: q, _scale_name(name): stored_scale.contiguous()}
    return {name: t.to(torch.bfloat16 if fmt == "bf16" else torch.float32).contiguous()}


def plan_shards(sizes: list[tuple[str, int]], shards: int) -> list[list[str]]:
    """Parameter names in order, cut into `shards` runs of about equal bytes (none empty)."""
    if shards < 1 or shards > len(sizes):
        raise BadInput(f"--shards must be between 1 and {len(sizes)} (the number of parameters)")
    total = sum(s for _, s in sizes)
    plan: list[list[str]] = [[]]
    done = 0
    for i, (name, size) in enumerate(sizes):
        left = len(sizes) - i  # parameters not yet placed, this one included
        need = shards - len(plan)  # shards still to open after the current one
        if plan[-1] and need and (done >= total * len(plan) / shards or left <= need):
            plan.append([])
        plan[-1].append(name)
        done += size
    return plan


def write_release_checkpoint(case, out_dir, experts: str = "fp4", shards: int = 4) -> dict:
    """Write `case`'s weights to `out_dir` in the release format; read it back and say how far
    its values are from the case's (0 for the release-exact cases). Returns a summary."""
    if experts not in EXPERT_FORMATS:
        raise BadInput(f"--experts must be one of {', '.join(EXPERT_FORMATS)}, not {experts!r}")
    params = case.params()
    names = list(params)
    plan = plan_shards([(n, params[n].numel() * BYTES_PER_VALUE[stored_format(n, params[n], experts)])
                        for n in names], shards)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        weight_map, total = {}, 0
        for k, group in enumerate(plan, 1):
            fname = f"model-{k:05d}-of-{len(plan):05d}.safetensors"
            tensors = {}
            for n in group:
                tensors.update(encode(n, params[n], experts))
            save_file(tensors, str(build / fname), metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update({key: fname for key in tensors})
            del tensors
        conf = checkpoint_config(case.config, "fp8")
        conf["expert_dtype"] = experts
        (build / CONFIG).write_text(json.dumps(conf, indent=1))
        (build / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        worst = max_difference(ReleaseCheckpoint(build), params)
        build.chmod(0o755)  # mkdtemp makes it private; a checkpoint is read by every worker
        for f in build.iterdir():
            f.chmod(0o644)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, trash / out.name)
            shutil.rmtree(trash)
        os.replace(build, out)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return {"path": str(out), "case": case.name, "experts": experts, "shards": len(plan), "bytes": total,
            "tensors": len(weight_map), "max_rel_difference": worst, "exact": worst == 0.0}


def max_difference(ckpt: ReleaseCheckpoint, params: dict) -> float:
    """The largest relative difference (max |stored - case| / max |case|) over all parameters."""
    worst = 0.0
    for name, t in params.items():
        got = ckpt.tensor(name)
        if not torch.equal(got, t.to(got.dtype)):
            worst = max(worst, float((got.double() - t.double()).abs().max() / t.double().abs().max().clamp_min(1e-300)))
    return worst

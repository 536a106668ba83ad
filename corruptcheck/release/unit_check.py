"""One unit of `corruptcheck check` (docs/checkpoints.md): a layer, the embedding, the head or
the MTP block, checked by teacher forcing against a release checkpoint.

A unit needs only the engine's captured input to each of its sub-blocks, the engine's outputs
of the unit, and the unit's weights: the sub-blocks run in float64 on the engine's own inputs
(reference/model.py `run_part`), the same sub-blocks run the honest ways of the engine's
declared precision (noise.variants) on the same inputs to measure the local noise, and every
output point is judged against its local tolerance (differ.judge_point). Nothing else of the
model or the dump is read, which is what lets units run anywhere (check.py, ray_runner.py).
The same function runs in-process and as a Ray task.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field

import torch

from corruptcheck.judge.coverage import layer_coverage
from corruptcheck.judge.differ import judge_point
from corruptcheck.errors import BadInput
from corruptcheck.judge.noise import merge_point_noise, variants
from corruptcheck.judge.teacher_forcing import experts_point, sub_blocks
from corruptcheck.points import MTP, block, capture_points, layer_of
from corruptcheck.reference import ModelConfig
from corruptcheck.reference.model import run_part
from corruptcheck.release.reader import ReleaseCheckpoint
from corruptcheck.verdicts import Verdict


@dataclass
class UnitResult:
    unit: str
    points: dict = field(default_factory=dict)  # name -> results.Point (local judgement)
    coverage: dict | None = None  # the layer's coverage entry (coverage.layer_coverage)
    notes: list = field(default_factory=list)  # sub-blocks that could not run, and why
    produced: list = field(default_factory=list)  # every name the reference recorded (finer data included)
    seconds: float = 0.0
    peak_rss: int | None = None  # bytes: the process's high-water mark while it ran the unit
    weight_bytes: int = 0  # the unit's weights as stored in the checkpoint
    worker: str = ""
    error: str | None = None  # set: the unit could not be checked (never a pass)
    attempts: int = 1

    @property
    def failed(self) -> list[str]:
        """The names of its failing points, sorted."""
        return sorted(n for n, p in self.points.items() if p.verdict == Verdict.FAIL)

    @property
    def verdict(self) -> Verdict:
        """unchecked (the unit could not run), fail (a point fails) or pass."""
        return Verdict.UNCHECKED if self.error else (Verdict.FAIL if self.failed else Verdict.PASS)


def units(cfg: ModelConfig) -> list[str]:
    """The units of a model, in topological order."""
    return ["embed"] + [block(i) for i in range(cfg.num_layers)] + ["head"] + (
        [MTP] if cfg.num_mtp_layers else [])


def unit_of(point: str) -> str:
    """The unit that judges a point (layers.i.attn_hc.in is layers.{i-1}.out; layer 0's is the
    embedding copied into every stream)."""
    parts = point.split(".")
    if point == "embed" or point == "layers.0.attn_hc.in":
        return "embed"
    if parts[0] in ("layers", "mtp"):
        return ".".join(parts[:2])
    return "head"


def needed_points(cfg: ModelConfig, unit: str, available) -> list[str]:
    """The engine's points a unit reads: its sub-blocks' inputs and every point it judges."""
    names = {inp for _, _, inp in sub_blocks(cfg, unit)} if unit != "embed" else set()
    names |= {n for n in available if unit_of(n) == unit}
    return sorted(n for n in names if n in available)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the resident high-water mark
        return True
    except OSError:
        return False


def _peak_rss() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _judge(specs: dict, engine: dict, local: dict, precision: str, noise: dict, out: dict) -> None:
    for name in local:
        spec = specs.get(name)
        if spec is None or name not in engine:
            continue
        if tuple(engine[name].shape) != tuple(local[name].shape):
            raise BadInput(f"point {name}: engine shape {tuple(engine[name].shape)} does not match the "
                           f"reference's {tuple(local[name].shape)}")
        out[name] = judge_point(spec, engine, local, precision, noise, "local")


def _embed(params: dict, engine: dict, sequences, cfg: ModelConfig, precision: str, specs: dict, out: dict) -> None:
    ids = torch.cat([torch.as_tensor(s, dtype=torch.long) for s in sequences])
    e = params["embed.weight"][ids].double()
    local = {"embed": e, "layers.0.attn_hc.in": e[:, None, :].expand(-1, cfg.hc_mult, -1)}
    _judge(specs, engine, local, precision, {}, out)  # a table lookup: no honest noise, the floor


def run_unit(ckpt: ReleaseCheckpoint, unit: str, engine: dict, sequences, precision: str) -> UnitResult:
    """Check one unit; `engine` holds (at least) needed_points(...) of the engine's capture."""
    start, can_peak = time.perf_counter(), _reset_peak()
    cfg = ckpt.config
    specs = {s.name: s for s in capture_points(cfg)}
    params = ckpt.unit_params(unit)
    res = UnitResult(unit, weight_bytes=ckpt.stored_bytes(ckpt.unit_names(unit)),
                     worker=f"{socket.gethostname()}:{os.getpid()}")
    if unit == "embed":
        _embed(params, engine, sequences, cfg, precision, specs, res.points)
    recorded: dict = {}
    for part, layer, inp in sub_blocks(cfg, unit) if unit != "embed" else []:
        if inp not in engine:
            res.notes.append(f"{part} sub-block not run: the engine did not capture {inp}")
            continue
        # a fresh copy: SIMD kernels sum in an order that can depend on the address alignment, and
        # the same tensor arrives memory-mapped from a dump file here and from Ray's object store there
        given = engine[inp].clone()
        # the engine's own expert ids where it exposes them, for the float64 run and the honest
        # ones alike: the output is judged on arithmetic, the choice at moe.experts (localize.py)
        experts = engine.get(experts_point(layer)) if part == "ffn" else None
        local = run_part(cfg, params, part, layer, given.to(torch.float64), sequences, "float64", experts=experts)
        local.pop(inp, None)
        noise: dict = {}
        if precision != "float64":
            for prec in variants(precision):
                honest = run_part(cfg, params, part, layer, given, sequences, prec, experts=experts)
                for name in local:
                    if name in honest:
                        merge_point_noise(noise, name, honest[name], local[name], honest, local)
                del honest
        _judge(specs, engine, local, precision, noise, res.points)
        recorded.update(local)
    res.produced = sorted(set(recorded) | set(res.points))
    if unit.startswith(("layers.", "mtp.")) and f"{unit}.out" in recorded:
        key = layer_of(unit + ".out")
        res.coverage = layer_coverage(cfg, key, recorded, [len(s) for s in sequences], None)
    res.seconds = time.perf_counter() - start
    res.peak_rss = _peak_rss() if can_peak else None
    return res


# torch threads a unit computes with, wherever it runs: a CPU GEMM's float64 sums depend on how
# many threads split it, and a unit's numbers must not depend on the runner (Ray gives each task
# one CPU); the parallelism is across units
UNIT_THREADS = 1


def check_unit(root: str, unit: str, names: list, sequences, precision: str, *tensors) -> UnitResult:
    """Entry point of a worker (a Ray task or the local loop): open the checkpoint (headers
    only), run the unit on the engine tensors given as `names` / `tensors`. A problem with the
    inputs or the checkpoint makes the unit unchecked, with the one-line reason."""
    threads = torch.get_num_threads()
    torch.set_num_threads(UNIT_THREADS)
    try:
        with torch.no_grad():
            return run_unit(ReleaseCheckpoint(root), unit, dict(zip(names, tensors)), sequences, precision)
    except BadInput as exc:
        return UnitResult(unit, error=str(exc), worker=f"{socket.gethostname()}:{os.getpid()}")
    finally:
        torch.set_num_threads(threads)

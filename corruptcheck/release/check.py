"""`corruptcheck check`: an engine dump against a release checkpoint, unit by unit, without a
full forward (docs/checkpoints.md).

Teacher forcing makes every layer's check independent (release/unit_check.py), so the model is cut
into units (embedding, each layer, head, MTP) that run in this process one after the other or
as Ray tasks (ray_runner.py). The dump is read lazily: a unit's tensors are read when the unit
is submitted and dropped when it is done, so no process needs the whole dump (the dump format
merges tensor-parallel shards per point). The results are assembled into the same Comparison
and report as `compare`: every judged point carries its local result, the culprit is the
first point whose local error exceeds its local tolerance, and a unit that could not be
checked leaves its points `unchecked` with the reason — never passed.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from corruptcheck.cases import Case
from corruptcheck.judge.coverage import exercised, summarize
from corruptcheck.judge.differ import Comparison, layer_key
from corruptcheck.judge.results import Point, Report
from corruptcheck.storage.dump import load_dump, read_manifest
from corruptcheck.errors import BadInput
from corruptcheck.release.unit_check import UnitResult, check_unit, needed_points, unit_of, units
from corruptcheck.judge.localize import attach, prev_out
from corruptcheck.points import block, capture_points
from corruptcheck.reference import REFERENCE_VERSION, ModelConfig
from corruptcheck.release.reader import ReleaseCheckpoint
from corruptcheck.verdicts import Verdict


@dataclass
class Job:
    unit: str
    names: list  # the engine points it reads
    memory: int  # bytes it is expected to need (a Ray task's memory requirement)


def _dump_case(manifest: dict, ckpt: ReleaseCheckpoint, where: str) -> Case:
    """The dump's model and tokens as a Case (weights: the checkpoint's, not a seed's)."""
    if not isinstance(manifest.get("config"), dict):
        raise BadInput(f"{where}: the manifest has no model config; check needs it to match the checkpoint")
    try:
        cfg = ModelConfig.from_dict(manifest["config"])
    except (TypeError, ValueError, KeyError) as exc:
        raise BadInput(f"{where}: model config is not valid ({exc})") from None
    if cfg != ckpt.config:
        diff = next(k for k, v in cfg.to_dict().items() if k != "name" and v != ckpt.config.to_dict()[k])
        raise BadInput(f"{where}: the dump's model differs from the checkpoint's ({diff}: dump "
                       f"{cfg.to_dict()[diff]!r}, checkpoint {ckpt.config.to_dict()[diff]!r})")
    seqs = (manifest.get("inputs") or {}).get("sequences")
    if (not isinstance(seqs, list) or not seqs or not all(isinstance(s, list) and s for s in seqs)
            or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < cfg.vocab_size for s in seqs for t in s)):
        raise BadInput(f"{where}: inputs.sequences must list each sequence's token ids (0 <= id < {cfg.vocab_size})")
    return Case(name=manifest["case"], description="engine dump checked against a release checkpoint",
                config=cfg, seed=0, seq_lens=tuple(len(s) for s in seqs), tokens=tuple(tuple(s) for s in seqs),
                tokens_note="the dump's inputs")


def select_units(cfg: ModelConfig, layers: str | None) -> list[str]:
    """--layers: comma-separated layer indices, ranges (2-5) and unit names (embed, head, mtp.0)."""
    every = units(cfg)
    if not layers:
        return every
    chosen = set()
    for item in (x.strip() for x in layers.split(",") if x.strip()):
        if item in every:
            chosen.add(item)
            continue
        lo, _, hi = item.partition("-")
        if not (lo.isdigit() and (not hi or hi.isdigit())):
            raise BadInput(f"--layers: {item!r} is not a layer index, a range (2-5) or one of embed, head, mtp.0")
        for i in range(int(lo), int(hi or lo) + 1):
            if i >= cfg.num_layers:
                raise BadInput(f"--layers: layer {i} does not exist (the model has {cfg.num_layers})")
            chosen.add(block(i))
    return [u for u in every if u in chosen]


def memory_estimate(ckpt: ReleaseCheckpoint, unit: str, input_bytes: int) -> int:
    """Bytes a unit needs: its dense weights in fp32 and their float64 copy (12 bytes per
    parameter), one routed expert in float64 twice over (one in use, the next being cast), its
    engine tensors seven times (as read, in float64, the float64 and honest outputs beside them;
    on Ray the object store's pages of the inputs count in the worker too) and 1 GiB for the
    worker process itself. Calibrated on pro-release (docs/checkpoints.md §5): peak RSS of a
    layer unit 7.2-7.7 GiB in one process, 8.0-8.7 GiB on a Ray worker, against 9.7-10.0 GiB
    estimated; the head 1.6 / 2.2 against 2.3."""
    names = ckpt.unit_names(unit)
    dense = sum(math.prod(ckpt.shapes[n]) for n in names if ".experts." not in n)
    experts = 3 * max((math.prod(ckpt.shapes[n]) for n in names if ".experts." in n), default=0)  # w1, w3, w2
    return dense * 12 + experts * 16 + input_bytes * 7 + (1 << 30)


def plan(ckpt: ReleaseCheckpoint, points, selected: list[str]) -> list[Job]:
    from corruptcheck.storage.lazy_points import shape_of

    jobs = []
    for unit in selected:
        names = needed_points(ckpt.config, unit, points)
        size = sum(shape_of(points, n).numel() * shape_of(points, n).element_size() for n in names)
        jobs.append(Job(unit, names, memory_estimate(ckpt, unit, size)))
    return jobs


def run_local(root: str, jobs: list[Job], points, sequences, precision: str, on_done) -> dict:
    out = {}
    for job in jobs:
        tensors = [points[n] for n in job.names]
        out[job.unit] = check_unit(root, job.unit, job.names, sequences, precision, *tensors)
        del tensors
        on_done(out[job.unit])
    return out


def assemble(cfg: ModelConfig, engine_names, results: dict, selected: list[str], precision: str, seq_lens) -> tuple:
    """(Comparison, coverage) from the units' results, in topological order."""
    entries = [r.coverage for r in results.values() if r.coverage]
    coverage = summarize(cfg, entries, seq_lens) if entries else {"layers": []}
    judged: dict = {}
    for r in results.values():
        judged.update(r.points)
    out = []
    for spec in capture_points(cfg):
        unit = unit_of(spec.name)
        res = results.get(unit)
        if unit not in selected:
            if spec.name in engine_names:
                out.append(Point(spec.name, Verdict.SKIPPED, spec.layer, spec.kind, reason="unit not selected (--layers)"))
            continue
        if res is not None and res.error:
            out.append(Point(spec.name, Verdict.UNCHECKED, spec.layer, spec.kind, reason=f"{unit} unchecked: {res.error}"))
            continue
        prev = prev_out(cfg, spec.name)
        p = judged.get(spec.name) or (judged.get(prev) if prev else None)
        if p is not None:
            p = Point(spec.name, p.verdict, spec.layer, spec.kind, p.metrics, p.tolerance, p.ratio,
                      p.reason if p.name == spec.name else f"the same tensor as {prev}")
            if (p.verdict == Verdict.PASS and spec.layer is not None
                    and not exercised(coverage, layer_key(spec), spec.mechanism)):
                p.verdict, p.reason = Verdict.NOT_EXERCISED, f"the case did not exercise {spec.mechanism} here"
            p.local = {"verdict": p.verdict, "ratio": p.ratio, "tolerance": p.tolerance, "reason": p.reason,
                       "rel_l2": p.metrics.get("rel_l2"), "norm_ratio": p.metrics.get("norm_ratio")}
            out.append(p)
        elif spec.name not in engine_names:
            out.append(Point(spec.name, Verdict.MISSING if spec.required else Verdict.SKIPPED, spec.layer, spec.kind,
                             reason="engine did not capture this point" if spec.required else
                             "finer point the engine does not expose"))
        elif res is not None and res.notes:
            out.append(Point(spec.name, Verdict.UNCHECKED, spec.layer, spec.kind, reason="; ".join(res.notes)))
        else:
            out.append(Point(spec.name, Verdict.SKIPPED, spec.layer, spec.kind,
                             reason="no teacher-forced sub-block computes this point"))
    # a name no capture point has and no checked unit's reference recorded is bad input (as in
    # compare); names of units not selected or not run are not looked at
    known = {s.name for s in capture_points(cfg)} | {n for r in results.values() for n in r.produced}
    ran = {u for u, r in results.items() if not r.error}
    unknown = sorted(n for n in set(engine_names) - known if unit_of(n) in ran)
    return Comparison(out, precision, unknown), coverage


def check(checkpoint: str, dump: str, layers: str | None = None, ray: str | None = None, progress=None) -> Report:
    """The report of `dump` checked against `checkpoint` (the compare report's schema). `ray`:
    None (this process), "auto" or a cluster address; `progress`: started(n) / finished(unit
    result)."""

    t0 = time.perf_counter()
    ckpt = ReleaseCheckpoint(checkpoint)
    manifest = read_manifest(dump)
    case = _dump_case(manifest, ckpt, f"{dump}/manifest.json")
    points, _ = load_dump(dump, case)
    precision = manifest["precision"]
    selected = select_units(case.config, layers)
    jobs = plan(ckpt, points, selected)
    sequences = [list(s) for s in case.tokens]
    progress = progress or _Silent()
    progress.started(len(jobs))
    done = progress.finished
    t1 = time.perf_counter()
    if ray:
        from corruptcheck.release.ray_runner import run_on_ray

        results, cluster = run_on_ray(ray, str(ckpt.root), jobs, points, sequences, precision, done)
    else:
        results, cluster = run_local(str(ckpt.root), jobs, points, sequences, precision, done), None
    t2 = time.perf_counter()
    comp, coverage = assemble(case.config, set(points), results, selected, precision, case.seq_lens)
    culprit = attach(comp, {p.name: p.local for p in comp.points if p.local})
    units_doc = [_unit_doc(results[j.unit], j) for j in jobs]
    meta = {**(manifest.get("engine") or {}), "check": {
        "checkpoint": str(ckpt.root), "expert_dtype": ckpt.release_config.get("expert_dtype"),
        "runner": f"ray ({ray})" if ray else "local (one process)", "cluster": cluster, "units": units_doc}}
    return Report.judged(
        comp, case=case, engine=(manifest.get("engine") or {}).get("name", "dump"), coverage=coverage,
        reference={"version": REFERENCE_VERSION, "precision": "float64",
                   "source": f"release checkpoint {ckpt.root} (teacher-forced per unit)", "golden_digest": None},
        engine_info=meta,
        timings={"open_s": t1 - t0, "units_s": t2 - t1, "unit_s_sum": sum(u["seconds"] for u in units_doc)},
        noise_model=("float64: floor tolerance (exact engine)" if precision == "float64" else
                     f"measured per unit: honest {precision} runs of each sub-block on the engine's own inputs"),
        culprit=culprit, teacher_forcing="per unit (every point is judged on the engine's own inputs)",
    )


class _Silent:
    """The progress interface `check` reports to: started(number of units), finished(UnitResult)."""

    def started(self, total: int) -> None:
        pass

    def finished(self, res: UnitResult) -> None:
        pass


def _unit_doc(r: UnitResult, job: Job) -> dict:
    return {"unit": r.unit, "verdict": r.verdict,
            "error": r.error, "notes": r.notes, "attempts": r.attempts, "seconds": r.seconds, "peak_rss": r.peak_rss,
            "weight_bytes": r.weight_bytes, "memory_requested": job.memory, "worker": r.worker,
            "points_judged": len(r.points), "failed": r.failed[:10]}

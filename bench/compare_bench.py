"""Where a compare spends its time, what a dump compare holds in memory, how long one
teacher-forced layer takes at V4-Pro width, and (when installed) a real engine's start and run."""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import child_json, gb

_SPLIT = ("engine_s", "reference_s", "noise_s", "diff_s", "localize_s")


def _split(timings: dict) -> str:
    total = sum(timings.get(k, 0.0) for k in _SPLIT)
    parts = "  ".join(f"{k[:-2]} {timings.get(k, 0.0):6.2f}s" for k in _SPLIT)
    return f"total {total:6.2f}s = {parts}"


def compare_split(case: str, engine: str, precision: str | None) -> None:
    """precision None: the engine's own (a real engine declares what it serves at)."""
    code = f"""
import json
from corruptcheck.cases import get_case
from corruptcheck.compare import compare
rep = compare(get_case({case!r}), {engine!r}, {precision!r}, teacher_forcing="always").report
print(json.dumps({{"verdict": rep.verdict, "timings": rep.timings, "engine": rep.engine_info.get("timings", {{}})}}))
"""
    try:
        out = child_json(code)
    except RuntimeError as exc:
        print(f"  {engine:6s} {case:13s} could not run: {exc}")
        return
    eng = out["engine"]
    extra = (f"   (engine start {eng['engine_start_s']:.1f}s, run {eng['generate_s']:.1f}s)"
             if "engine_start_s" in eng else "")
    print(f"  {engine:6s} {case:13s} {out['verdict']:5s} {_split(out['timings'])}{extra}", flush=True)


def _largest_tensor(dump: Path) -> int:
    from safetensors import safe_open
    largest = 0
    for f in dump.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                sl = sf.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                largest = max(largest, n * {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4}.get(sl.get_dtype(), 4))
    return largest


def dump_memory(case: str) -> None:
    """Peak RSS of `compare --engine dump` above the process's RSS once the case's weights, its
    golden cache and the differ's compiled kernel are loaded (the kernel's high-water mark is
    reset first: /proc/self/clear_refs), against the largest single tensor the compare reads
    (the float64 reference's largest point)."""
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "dump"
        subprocess.run([sys.executable, "-m", "corruptcheck", "dump", "--engine", "reference", "--case", case,
                        "--dtype", "float32", "--out", str(dump)], check=True, capture_output=True)
        code = f"""
import json
from corruptcheck.cases import get_case
from corruptcheck.compare import compare
from corruptcheck.judge.reference_data import reference_for

def status(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

case = get_case({case!r}); case.params()
ref = reference_for(case)  # builds the golden cache once, outside the measurement
largest_ref = max(ref.points[n].numel() * ref.points[n].element_size() for n in ref.points)
del ref
import torch
from corruptcheck.judge.metrics import float_metrics
float_metrics(torch.ones(2, 2), torch.ones(2, 2))  # the compiled kernel's code is loaded: not data
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
rep = compare(case, "dump", None, path={str(dump)!r}, teacher_forcing="never").report
print(json.dumps({{"verdict": rep.verdict, "base": base, "peak": status("VmHWM"), "largest_ref": largest_ref,
                  "source": rep.reference["source"]}}))
"""
        out = child_json(code)
        largest_dump = _largest_tensor(dump)
        total = sum(f.stat().st_size for f in dump.glob("*.safetensors"))
    grew = out["peak"] - out["base"]
    largest = max(largest_dump, out["largest_ref"])
    print(f"  {case}: dump {gb(total)} (largest tensor {gb(largest_dump)}), reference {out['source']} "
          f"(largest tensor {gb(out['largest_ref'])})")
    print(f"  peak RSS grew by {gb(grew)} during the compare = {grew / largest:.2f}x the largest single tensor "
          f"(goal <= 1.5x; verdict {out['verdict']})")


def teacher_forced_layer(case_name: str = "pro-engine", tokens: int = 512, layer: int = 1) -> None:
    """One layer's teacher-forced check (attention + FFN halves, float64, judged) on `tokens`."""
    from corruptcheck.cases import get_case
    from corruptcheck.judge.differ import judge_point
    from corruptcheck.judge.teacher_forcing import local_points
    from corruptcheck.points import capture_points
    from corruptcheck.reference import run
    from corruptcheck.schedule import decoded_case

    base = get_case(case_name)
    ids = torch.randint(0, base.config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0))
    case = decoded_case(base, [ids.tolist()])
    cfg = case.config
    engine = run(cfg, case.params(), case.sequences(), "float32", mtp=False).points
    specs = {s.name: s for s in capture_points(cfg)}
    t = time.perf_counter()
    for part in ("attn", "ffn"):
        inp = engine[f"layers.{layer}.{part}_hc.in"].to(torch.float64)
        loc = local_points(case, part, layer, inp, "float64")
        for name in loc:
            if name in specs and name in engine:
                judge_point(specs[name], engine, loc, "float32", {}, "local")
    dt = time.perf_counter() - t
    print(f"  {case_name} layer {layer} (hidden {cfg.hidden_size}, {cfg.num_heads} heads, "
          f"{cfg.n_routed_experts} experts top-{cfg.experts_per_tok}), {tokens} tokens: {dt:.2f} s "
          f"(goal <= 10 s)", flush=True)


def report(engines: list[str], dump_case: str = "pro-slice") -> None:
    print("\n== compare wall time split (teacher forcing always), one process each")
    compare_split("flash-slice", "hf", "float32")
    for eng in engines:
        compare_split("flash-engine", eng, None)
    print("\n== dump compare memory")
    try:
        dump_memory(dump_case)
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"  could not run: {exc}")
    print("\n== teacher-forced check of one V4-Pro-width layer")
    teacher_forced_layer()

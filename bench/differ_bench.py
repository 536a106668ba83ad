"""The differ against memcpy and its peers, on the same tensors in the same run: one fp32 engine
tensor of width 7168 (V4-Pro hidden) against its float64 reference. GB/s counts the engine
tensor's bytes, as the peers' own speed claims do."""
from __future__ import annotations

import logging

import torch

from bench.common import best_of
from corruptcheck.judge.metrics import float_metrics


def _polygraphy():
    """Polygraphy's CompareFunc.simple as a callable on (engine, reference) arrays, or None."""
    try:
        from polygraphy.comparator import CompareFunc
        from polygraphy.comparator.struct import IterationResult
        from polygraphy.logger import G_LOGGER
    except ImportError:
        return None
    G_LOGGER.module_severity = G_LOGGER.ERROR
    logging.getLogger("polygraphy").setLevel(logging.ERROR)
    compare = CompareFunc.simple(rtol=1e-2, atol=1e-2)
    return lambda e, r: compare(IterationResult({"x": e}, runner_name="engine"),
                                IterationResult({"x": r}, runner_name="reference"))


def run(megabytes: int = 256, repeat: int = 3) -> list[tuple]:
    rows = megabytes * 2**20 // (4 * 7168)
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(rows, 7168, generator=g, dtype=torch.float64)
    eng = (ref * (1 + 1e-3 * torch.randn(rows, 7168, generator=g, dtype=torch.float64))).float()
    nbytes = eng.numel() * eng.element_size()
    dst = torch.empty_like(eng)
    float_metrics(eng[:4], ref[:4])  # compile / load the kernel outside the timing
    lines = [("memcpy (torch copy_ into a preallocated tensor)", best_of(lambda: dst.copy_(eng), repeat)),
             ("corruptcheck float_metrics (all metrics, float64 sums)", best_of(lambda: float_metrics(eng, ref), repeat)),
             ("naive float64 norm: vector_norm(e.double() - r)", best_of(lambda: torch.linalg.vector_norm(eng.double() - ref), repeat)),
             ("torch.testing.assert_close (float64)",
              best_of(lambda: torch.testing.assert_close(eng.double(), ref, rtol=1e-2, atol=1e-2), repeat))]
    poly = _polygraphy()
    if poly is not None:
        e_np, r_np = eng.numpy(), ref.numpy()
        lines.append(("Polygraphy CompareFunc.simple", best_of(lambda: poly(e_np, r_np), 1)))
    else:
        lines.append(("Polygraphy CompareFunc.simple", None))
    return [(name, (nbytes / s / 1e9) if s else None, s) for name, s in lines], nbytes


def report(megabytes: int = 256, repeat: int = 3) -> None:
    lines, nbytes = run(megabytes, repeat)
    print(f"\n== differ: one {nbytes / 2**20:.0f} MiB fp32 tensor [*, 7168] against float64, "
          f"{torch.get_num_threads()} threads (GB/s of the engine tensor)")
    memcpy, ours = lines[0][1], lines[1][1]
    for name, gbs, s in lines:
        if gbs is None:
            print(f"  {name:58s} not installed (pip install polygraphy)")
            continue
        rel = f"corruptcheck is {ours / gbs:6.1f}x" if name != lines[1][0] else f"{ours / memcpy * 100:5.1f}% of memcpy"
        print(f"  {name:58s} {gbs:7.3f} GB/s  {s:8.3f} s   {rel}")

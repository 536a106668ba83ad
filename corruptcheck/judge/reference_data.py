"""The float64 reference of a case, and the goldens made from it: computed now (`reference_run`),
or read from the golden when present and valid (`reference_for`); `generate` and `verify` run
the reference and the noise measurement and hand the results to golden.py, which only stores
and checks them (docs/golden.md)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from corruptcheck.cases import Case
from corruptcheck.judge.coverage import coverage
from corruptcheck.storage.golden import (GoldenDrift, GoldenTampered, build_golden, check_against_sketches, check_against_tensors,
                                 commits_tensors, golden_root, load_committed_tensors, load_manifest,
                                 load_sketches, read_cache, write_cache)
from corruptcheck.engines.llamacpp_gguf import check_config
from corruptcheck.judge.noise import NOISE_FORMAT, measure, variants
from corruptcheck.reference import run

NOISE_PRECISIONS = ("float32", "bfloat16")
# engine-matched profiles -> why the engine cannot load a case's config (empty: it can):
# ggml-float32 is llama.cpp's float32 (reference/precision.py)
ENGINE_MATCHED = {"ggml-float32": check_config}
# engine cases (FP8-exact weights) are judged at the precision FP8 serving engines run
ENGINE_NOISE_PRECISIONS = ("fp8-serving",)


def reference_run(case: Case):
    """Compute the float64 reference now: (points, coverage)."""
    res = run(case.config, case.params(), case.sequences(), "float64")
    return res.points, coverage(case.config, res.points, case.seq_lens, case.params())


def regenerate(case: Case):
    """Run the float64 reference on the case: (points, coverage). Tests patch this to
    simulate drift."""
    return reference_run(case)


@dataclass
class ReferenceData:
    points: dict
    coverage: dict
    source: str  # "golden (committed)", "golden (cache)", "golden (regenerated)", "computed (...)"
    digest: str | None = None
    noise: dict = field(default_factory=dict)  # precision -> noise model, from the golden


def noise_precisions(case: Case) -> tuple:
    """The precisions whose noise the case's golden holds: the generic ones, and the
    engine-matched profiles of the engines that load the case (others measure at compare time)."""
    generic = ENGINE_NOISE_PRECISIONS if case.weight_format == "fp8" else NOISE_PRECISIONS
    return generic + tuple(p for p, cannot_load in ENGINE_MATCHED.items() if not cannot_load(case.config))


def noise_for(case: Case, ref: ReferenceData, precision: str) -> tuple[dict | None, str]:
    """The noise model for `precision`: from the golden, else measured now (slower)."""
    if precision == "float64":
        return None, "float64: floor tolerance (exact engine)"
    stored = ref.noise.get(precision)
    current = [v.label for v in variants(precision)]
    if stored is not None and stored.get("format") == NOISE_FORMAT and stored.get("variants") not in (None, current):
        # the golden measured another set of honest variants than noise.variants runs now:
        # judging with it would miss the variants added since; measure now (regenerate the golden)
        return measure(case, ref.points, precision), (f"measured now (the golden's noise model ran {stored.get('variants')}, "
                                                      f"the current one runs {current})")
    if stored is not None and stored.get("format") == NOISE_FORMAT:
        return stored, "golden"
    if stored is not None and stored.get("format") == 1:
        # format 1 measured local runs on their own expert choices only: that is the
        # `local_own_choice` of format 2, and an upper bound for `local`
        return {**stored, "local_own_choice": stored.get("local", {})}, "golden (format 1: local noise on own choices)"
    why = "no golden noise model" if stored is None else f"the golden's noise model is format {stored.get('format')}"
    return measure(case, ref.points, precision), f"measured now ({why})"


def golden_noise(case: Case, precision: str) -> dict | None:
    """The noise model that the golden of `case`'s built-in case (same model and weights; a
    served, decoded or re-lengthed variant of it) holds for `precision`, or None. A crashed
    engine's partial capture is judged with it: the honest error per point of that model at that
    precision, without measuring it again on the few tokens delivered."""
    from corruptcheck.cases import CASES

    base = CASES.get(case.name.split("@")[0])
    if base is None or base.config != case.config or base.seed != case.seed or base.weight_format != case.weight_format:
        return None
    try:
        stored = load_manifest(base).manifest.get("tolerances", {}).get(precision)
    except (FileNotFoundError, GoldenTampered):
        return None
    return stored if stored is not None and stored.get("format") == NOISE_FORMAT else None


def generate(case: Case, root: Path | None = None, with_noise: bool = True) -> dict:
    """Run the reference (and measure the noise models), then write the case's golden."""
    points, cov = regenerate(case)
    root = root or golden_root()
    noise = {p: measure(case, points, p) for p in noise_precisions(case)} if with_noise else {}
    full = commits_tensors(case.name)
    manifest = build_golden(case, points, cov, root / case.name, full=full, noise=noise)
    if not full:
        write_cache(case, manifest, points)
    return manifest


@dataclass
class VerifyResult:
    case: str
    worst_point: str
    worst_rel: float
    points: int
    regenerated_vs_tensors: float | None  # worst rel. error vs committed full tensors


def verify(case: Case, root: Path | None = None) -> VerifyResult:
    """Check integrity, regenerate, and compare every point with the golden.

    GoldenTampered (exit 2) for a missing/corrupt/edited file, GoldenDrift (exit 1) naming the
    first point whose regeneration moved. Refreshes the cache for cases kept out of git."""
    g = load_manifest(case, root)
    sketches = load_sketches(g)
    committed = load_committed_tensors(g) if g.manifest["full_tensors"] == "committed" else None
    points, _ = regenerate(case)
    errors = check_against_sketches(g, points, sketches)
    worst_full = None
    if committed is not None:
        worst_full = check_against_tensors(committed, points)
    else:
        write_cache(case, g.manifest, points)
    worst = max(errors, key=errors.get)
    return VerifyResult(case.name, worst, errors[worst], len(errors), worst_full)


def _computed(case: Case, why: str) -> ReferenceData:
    points, cov = regenerate(case)
    return ReferenceData(points, cov, f"computed ({why})")


def reference_for(case: Case, root: Path | None = None) -> ReferenceData:
    """The float64 reference points of a case: from its golden when present and valid, else
    computed (and the reason is said)."""
    try:
        g = load_manifest(case, root)
        sketches = load_sketches(g)
    except FileNotFoundError:
        return _computed(case, "no golden for this case")
    except GoldenTampered as exc:
        return _computed(case, f"golden unusable: {exc}")
    noise = g.manifest.get("tolerances", {})
    if g.manifest["full_tensors"] == "committed":
        try:
            return ReferenceData(load_committed_tensors(g), g.coverage, "golden (committed)", g.digest, noise)
        except GoldenTampered as exc:
            return _computed(case, f"golden unusable: {exc}")
    cached = read_cache(g)
    if cached is not None:
        try:
            check_against_sketches(g, cached, sketches)
            return ReferenceData(cached, g.coverage, "golden (cache)", g.digest, noise)
        except GoldenDrift:
            pass
    points, cov = regenerate(case)
    try:
        check_against_sketches(g, points, sketches)
    except GoldenDrift as exc:
        return ReferenceData(points, cov, f"computed (regeneration does not match the golden: {exc})")
    write_cache(case, g.manifest, points)
    # judged from the cache, read point by point when used: the float64 points of a wide case
    # (pro-engine: over 10 GB) leave memory before the engine's capture is compared with them
    lazy = read_cache(g)
    return ReferenceData(points if lazy is None else lazy, g.coverage, "golden (regenerated into the cache)",
                         g.digest, noise)

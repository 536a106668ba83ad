"""Golden hidden states: versioned, pinned in git, reproducible across machines (docs/golden.md).

A golden is a directory `golden/<case>/` holding

* `manifest.json` — the case spec (config, seed, inputs, batch layout), reference and format
  versions, coverage, and for every capture point its shape, dtype, summary statistics and the
  sha256 of its sketch (and of its full tensor where committed); a digest per point entry and
  one over the whole manifest;
* `sketch.safetensors` — per point a compact sketch that pins the tensor to ~1e-12 relative
  without storing it (below); discrete points (top-k ids, expert ids) are stored exactly;
* `tensors.safetensors` — the full float64 tensors, only for cases small enough for git.

Larger cases regenerate their tensors on demand into a cache directory
(`$CORRUPTCHECK_CACHE`, else `$XDG_CACHE_HOME/corruptcheck`, else `~/.cache/corruptcheck`) and
are checked against the committed sketch before use.

Sketch scheme (float64): for a point with leading dim R (tokens, or compressed entries) and F
values per row, the sketch is [R, 1 + K]: the L2 norm of each row, then K = 8 projections of the
row onto fixed Gaussian vectors (N(0, 1) entries, seeded from the point name). A perturbation of
relative size e changes the sketch by about e relative (Johnson-Lindenstrauss), so comparing
sketches to 1e-12 pins the tensor to ~1e-12 while storing 9 numbers per row. Float64 results
are not bit-identical across machines (BLAS reduction order), hence a numeric sketch and not a
byte hash.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from corruptcheck.storage.atomic import atomic_replace, atomic_write
from corruptcheck.cases import Case
from corruptcheck.errors import BadInput
from corruptcheck.storage.jsonio import loads_finite
from corruptcheck.storage.lazy_points import LazyPoints, RowSource, file_tensors, read_tensor
from corruptcheck.points import capture_points
from corruptcheck.reference import REFERENCE_VERSION

GOLDEN_FORMAT = 1
SKETCH_PROJECTIONS = 8
SKETCH_BLOCK = 1 << 20  # elements of a point sketched at a time
# regenerations must agree with the committed sketch to this relative error
SKETCH_RTOL = 1e-12
# cases whose full float64 tensors are committed (the rest regenerate into the cache)
COMMITTED_TENSORS = {"tiny"}
MANIFEST = "manifest.json"
SKETCH_FILE = "sketch.safetensors"
TENSOR_FILE = "tensors.safetensors"


class GoldenTampered(BadInput):
    """A stored golden file does not match its recorded hash (exit 2)."""


class GoldenDrift(Exception):
    """A regenerated point no longer matches the committed golden (exit 1)."""

    def __init__(self, point: str, rel: float):
        super().__init__(f"point {point} drifted from the golden: sketch relative error {rel:.3g} > {SKETCH_RTOL:g}")
        self.point, self.rel = point, rel


def commits_tensors(case_name: str) -> bool:
    """Whether a case's full tensors are kept in git (else regenerated into the cache)."""
    return case_name in COMMITTED_TENSORS


def golden_root() -> Path:
    """$CORRUPTCHECK_GOLDEN_DIR, else the source tree's golden/, else the copy installed with
    the package (golden/ is shipped as `corruptcheck.goldens` package data)."""
    env = os.environ.get("CORRUPTCHECK_GOLDEN_DIR")
    if env:
        return Path(env)
    source = Path(__file__).resolve().parents[1] / "golden"
    if source.is_dir():
        return source
    from importlib import resources

    return Path(str(resources.files("corruptcheck.goldens")))


def cache_root() -> Path:
    env = os.environ.get("CORRUPTCHECK_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "corruptcheck"


# --------------------------------------------------------------------------------------------
# hashing and sketches

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    return sha256_bytes(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _digest(obj) -> str:
    return sha256_bytes(canonical_json(obj).encode())


def _projection(name: str, width: int) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(f"sketch:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)
    return torch.randn(width, SKETCH_PROJECTIONS, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def sketch(name: str, t: torch.Tensor) -> torch.Tensor:
    """[R, 1 + K] float64 sketch of a float point; discrete points are kept exactly."""
    if not t.is_floating_point():
        return t.to(torch.int64).clone()
    x = t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1)
    proj = _projection(name, x.shape[1])
    rows = max(1, SKETCH_BLOCK // max(x.shape[1], 1))  # a block of rows at a time: no float64 copy of t
    parts = []
    for block in x.split(rows):
        b = block.to(torch.float64)
        b = torch.where(torch.isfinite(b), b, 0.0)
        parts.append(torch.cat([b.norm(dim=1, keepdim=True), b @ proj], 1))
    return torch.cat(parts) if parts else torch.zeros(0, 1 + SKETCH_PROJECTIONS, dtype=torch.float64)


def sketch_error(new: torch.Tensor, old: torch.Tensor) -> float:
    """Relative difference of two sketches (exact equality for discrete points)."""
    if new.shape != old.shape:
        return math.inf
    if not old.is_floating_point():
        return 0.0 if torch.equal(new, old) else math.inf
    denom = float(old.norm())
    diff = float((new - old).norm())
    return diff / denom if denom > 0 else (0.0 if diff == 0 else math.inf)


def tensor_error(new: torch.Tensor, old: torch.Tensor) -> float:
    """Relative L2 difference of two full tensors; non-finite entries must sit at the same
    places with the same values (e.g. -inf for masked indexer scores)."""
    if new.shape != old.shape:
        return math.inf
    if not old.is_floating_point():
        return 0.0 if torch.equal(new, old) else math.inf
    new, old = new.to(torch.float64), old.to(torch.float64)
    fin = torch.isfinite(old)
    if not torch.equal(fin, torch.isfinite(new)) or not torch.equal(new[~fin], old[~fin]):
        return math.inf
    return sketch_error(new[fin], old[fin])


def stats(t: torch.Tensor) -> dict:
    if not t.is_floating_point():
        return {"min": int(t.min()) if t.numel() else 0, "max": int(t.max()) if t.numel() else 0,
                "none": int((t < 0).sum())}
    x = t.to(torch.float64).flatten()
    finite = torch.isfinite(x)
    x = x[finite]
    if not x.numel():
        return {"nonfinite": int((~finite).sum()), "l2": 0.0}
    return {"mean": float(x.mean()), "std": float(x.std()) if x.numel() > 1 else 0.0,
            "min": float(x.min()), "max": float(x.max()), "l2": float(x.norm()),
            "nonfinite": int((~finite).sum())}


# --------------------------------------------------------------------------------------------
# writing

def _kind(name: str, t: torch.Tensor) -> str:
    if not t.is_floating_point():
        return "index"
    return "entries" if name.endswith(("compressed_kv", "indexer_keys")) else "float"


def _ordered(case: Case, points: dict) -> list[str]:
    """Capture-point order, then any reference-only extras (scores used for tie analysis)."""
    order = [s.name for s in capture_points(case.config) if s.name in points]
    return order + sorted(set(points) - set(order))


def _point_entries(names: list, points: dict, sketches: dict, full: bool) -> tuple[dict, dict]:
    """({point: manifest entry}, {tensor key: full tensor to store} (empty unless `full`))."""
    entries, tensors, seen = {}, {}, {}
    for n in names:
        t = points[n]
        entry = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "kind": _kind(n, t),
                 "stats": stats(t), "sketch_sha256": tensor_sha256(sketches[n])}
        if full:
            full_t = t.contiguous()
            h = tensor_sha256(full_t)
            entry["tensor_sha256"] = h
            if h in seen:  # identical tensors (a layer's out == next layer's attn_hc.in) stored once
                entry["tensor_key"] = seen[h]
            else:
                seen[h] = entry["tensor_key"] = n
                tensors[n] = full_t
        entry["digest"] = _digest(entry)
        entries[n] = entry
    return entries, tensors


def build_golden(case: Case, points: dict, cov: dict, out_dir: Path, full: bool, noise: dict | None = None) -> dict:
    """Write manifest, sketch (and, if `full`, tensors) for `points`; returns the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = _ordered(case, points)
    sketches = {n: sketch(n, points[n]).contiguous() for n in names}
    entries, tensors = _point_entries(names, points, sketches, full)
    _atomic_save(sketches, out_dir / SKETCH_FILE)
    files = {SKETCH_FILE: {"sha256": sha256_file(out_dir / SKETCH_FILE), "bytes": (out_dir / SKETCH_FILE).stat().st_size}}
    if full:
        _atomic_save(tensors, out_dir / TENSOR_FILE)
        files[TENSOR_FILE] = {"sha256": sha256_file(out_dir / TENSOR_FILE), "bytes": (out_dir / TENSOR_FILE).stat().st_size}
    elif (out_dir / TENSOR_FILE).exists():
        (out_dir / TENSOR_FILE).unlink()
    spec = case.spec()
    spec["inputs"] = [s.tolist() for s in case.sequences()]
    spec["layout"] = "sequences run unpadded, each from position 0; points flatten tokens in order"
    manifest = {
        "format": GOLDEN_FORMAT,
        "reference_version": REFERENCE_VERSION,
        "torch_version": torch.__version__.split("+")[0],
        "case": spec,
        "coverage": cov,
        "sketch": {"scheme": "row L2 norm + K Gaussian projections (N(0,1), seed sha256('sketch:'+point))",
                   "projections": SKETCH_PROJECTIONS, "rtol": SKETCH_RTOL},
        "full_tensors": "committed" if full else "cache",
        "files": files,
        "points": entries,
        "tolerances": noise or {},  # noise model per declared precision (noise.py)
    }
    manifest["manifest_digest"] = _digest({k: v for k, v in manifest.items() if k != "manifest_digest"})
    atomic_write(out_dir / MANIFEST, json.dumps(manifest, indent=1, allow_nan=False) + "\n")
    return manifest


def _atomic_save(tensors: dict, path: Path) -> None:
    atomic_replace(path, lambda tmp: save_file(tensors, tmp, metadata={"format": str(GOLDEN_FORMAT)}))


# --------------------------------------------------------------------------------------------
# loading and integrity

@dataclass
class Golden:
    case: Case
    dir: Path
    manifest: dict

    @property
    def points(self) -> dict:
        return self.manifest["points"]

    @property
    def coverage(self) -> dict:
        return self.manifest["coverage"]

    @property
    def digest(self) -> str:
        return self.manifest["manifest_digest"]


def manifest_path(case_name: str, root: Path | None = None) -> Path:
    return (root or golden_root()) / case_name / MANIFEST


def load_manifest(case: Case, root: Path | None = None) -> Golden:
    """Parse the manifest and check its digests; GoldenTampered names the edited point."""
    path = manifest_path(case.name, root)
    if not path.exists():
        raise FileNotFoundError(f"no golden for case {case.name!r} ({path})")
    try:
        manifest = loads_finite(path.read_text())
        recorded = manifest["manifest_digest"]
        entries = manifest["points"]
    except (ValueError, KeyError, TypeError, OSError) as exc:  # JSONDecodeError, UnicodeDecodeError: ValueError
        raise GoldenTampered(f"{path}: corrupt manifest ({exc})") from None
    if not isinstance(entries, dict):
        raise GoldenTampered(f"{path}: corrupt manifest (points is not a table)")
    for name, entry in entries.items():
        if not isinstance(entry, dict) or entry.get("digest") != _digest({k: v for k, v in entry.items() if k != "digest"}):
            raise GoldenTampered(f"{path}: the entry of point {name} was edited (digest mismatch)")
    if recorded != _digest({k: v for k, v in manifest.items() if k != "manifest_digest"}):
        changed = [k for k in ("case", "coverage", "files", "sketch", "tolerances", "format",
                               "reference_version", "full_tensors") if k in manifest]
        raise GoldenTampered(f"{path}: manifest was edited outside the point entries "
                             f"(manifest digest mismatch; sections: {', '.join(changed)})")
    if manifest.get("format") != GOLDEN_FORMAT:
        raise GoldenTampered(f"{path}: golden format {manifest.get('format')} (this tool reads {GOLDEN_FORMAT})")
    problem = _structure_problem(manifest)
    if problem:
        raise GoldenTampered(f"{path}: corrupt manifest ({problem})")
    if manifest["case"].get("config") != case.config.to_dict() or manifest["case"].get("seed") != case.seed \
            or manifest["case"].get("seq_lens") != list(case.seq_lens):
        raise GoldenTampered(f"{path}: golden was made for a different case definition; regenerate it")
    return Golden(case, path.parent, manifest)


_NUMBER = (int, float)
_COVERAGE = {"sequences": int, "tokens": int, "tokens_beyond_window": int, "window": int, "compressed_entries": int,
             "indexer_pruning_fraction": _NUMBER, "clamp_hits": int, "attention_types": list, "routing_types": list,
             "layers": list}
_COVERAGE_LAYER = {"layer": str, "attention": str, "routing": str, "tokens": int, "compressed_entries": int,
                   "indexer_pruning_queries": int, "indexer_pruning_fraction": _NUMBER, "clamp_hits": int,
                   "experts_used": int, "experts_total": int}
_ENTRY = {"shape": list, "dtype": str, "kind": str, "stats": dict, "sketch_sha256": str}


def _typed(table, schema: dict) -> str | None:
    """The first key of `schema` that `table` lacks or holds with another type."""
    if not isinstance(table, dict):
        return "not a table"
    for key, kind in schema.items():
        value = table.get(key)
        if isinstance(value, bool) or not isinstance(value, kind):
            return f"{key!r} missing or not {getattr(kind, '__name__', 'a number')}"
    return None


def _structure_problem(m: dict) -> str | None:
    """What a well-digested manifest may still get wrong (e.g. written by another version)."""
    for key, kind in (("case", dict), ("files", dict), ("tolerances", dict)):
        if not isinstance(m.get(key), kind):
            return f"{key} is not a table"
    if m.get("full_tensors") not in ("committed", "cache"):
        return "full_tensors must be 'committed' or 'cache'"
    why = _typed(m.get("coverage"), _COVERAGE)
    if why:
        return f"coverage: {why}"
    for layer in m["coverage"]["layers"]:
        why = _typed(layer, _COVERAGE_LAYER)
        if why:
            return f"coverage layer: {why}"
    for name, info in m["files"].items():
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
            return f"file {name}: no sha256"
    committed = m["full_tensors"] == "committed"
    for name, entry in m["points"].items():
        why = _typed(entry, {**_ENTRY, **({"tensor_key": str, "tensor_sha256": str} if committed else {})})
        if why:
            return f"point {name}: {why}"
    for precision, model in m["tolerances"].items():
        if not isinstance(model, dict) or not all(isinstance(model.get(s, {}), dict) for s in ("free", "local")):
            return f"noise model {precision} is not a table of free / local points"
        for scope in ("free", "local", "local_own_choice"):
            for point, noise in model.get(scope, {}).items():
                if not isinstance(noise, dict) or not all(
                        isinstance(v, _NUMBER) and not isinstance(v, bool) for v in noise.values()):
                    return f"noise model {precision} {scope} {point}: values must be numbers"
    return None


def _load_checked(g: Golden, filename: str, hash_key: str, key_of=lambda name, e: name) -> dict:
    """Load a stored safetensors file, checking the file hash; on mismatch name the point."""
    path = g.dir / filename
    info = g.manifest["files"].get(filename)
    if info is None:
        raise GoldenTampered(f"{path}: not recorded in the manifest")
    if not path.exists():
        raise GoldenTampered(f"{path}: missing (recorded in the manifest)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise GoldenTampered(f"{path}: corrupt file ({exc})") from None
    if sha256_file(path) != info["sha256"]:
        for name, entry in g.points.items():
            if hash_key not in entry:
                continue
            key = key_of(name, entry)
            if key not in tensors or tensor_sha256(tensors[key]) != entry[hash_key]:
                raise GoldenTampered(f"{path}: stored data of point {name} does not match its recorded sha256")
        raise GoldenTampered(f"{path}: file sha256 does not match the manifest (header or metadata changed)")
    return tensors


def load_sketches(g: Golden) -> dict:
    return _load_checked(g, SKETCH_FILE, "sketch_sha256")


def load_committed_tensors(g: Golden) -> dict:
    stored = _load_checked(g, TENSOR_FILE, "tensor_sha256", key_of=lambda name, e: e["tensor_key"])
    return {name: stored[e["tensor_key"]] for name, e in g.points.items()}


def check_against_sketches(g: Golden, points: dict, sketches: dict) -> dict:
    """Relative sketch error per point; raises GoldenDrift at the first point (in capture
    order) beyond SKETCH_RTOL, BadInput when a point is absent."""
    errors = {}
    for name, entry in g.points.items():
        if name not in points:
            raise GoldenDrift(name, math.inf)
        t = points[name]
        if list(t.shape) != entry["shape"]:
            raise GoldenDrift(name, math.inf)
        err = sketch_error(sketch(name, t), sketches[name])
        errors[name] = err
        if not err <= SKETCH_RTOL:
            raise GoldenDrift(name, err)
    extra = set(points) - set(g.points)
    if extra:
        raise GoldenDrift(sorted(extra)[0], math.inf)
    return errors


def check_against_tensors(committed: dict, points: dict) -> float:
    """Worst relative error of `points` against the committed full tensors; raises GoldenDrift
    at the first point beyond SKETCH_RTOL."""
    worst = 0.0
    for name, t in committed.items():
        err = tensor_error(points[name], t)
        if not err <= SKETCH_RTOL:
            raise GoldenDrift(name, err)
        worst = max(worst, err)
    return worst


# --------------------------------------------------------------------------------------------
# cache for cases whose tensors are not in git

def _cache_file(case: Case, digest: str) -> Path:
    return cache_root() / "golden" / case.name / f"{digest[:24]}.safetensors"


def write_cache(case: Case, manifest: dict, points: dict) -> Path:
    path = _cache_file(case, manifest["manifest_digest"])
    path.parent.mkdir(parents=True, exist_ok=True)
    unique, keys = {}, {}
    for name in manifest["points"]:
        t = points[name].contiguous()
        h = tensor_sha256(t)
        if h not in unique:
            unique[h] = name
        keys[name] = unique[h]
    _atomic_save({n: points[n].contiguous() for n in set(keys.values())}, path)
    atomic_write(path.with_suffix(".keys.json"), json.dumps(keys))
    return path


def read_cache(g: Golden) -> dict | None:
    path = _cache_file(g.case, g.digest)
    keys_path = path.with_suffix(".keys.json")
    if not path.exists() or not keys_path.exists():
        return None
    try:
        stored = file_tensors(path)  # headers only: each point's data is read when it is used
        keys = json.loads(keys_path.read_text())
        sources = {name: keys[name] for name in g.points}
        if any(k not in stored for k in sources.values()):
            return None
    except (BadInput, OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None  # a damaged cache is simply rebuilt
    return LazyPoints({name: partial(read_tensor, path, key) for name, key in sources.items()},
                      {name: stored[key].to("meta") for name, key in sources.items()},
                      {name: RowSource(path, key, stored[key].shape, stored[key].dtype)
                       for name, key in sources.items() if stored[key].dim()})

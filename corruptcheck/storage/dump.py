"""The dump format (docs/design.md §5, docs/dump.md): how any engine hands its tensors over.

A dump is a directory with `manifest.json` and one or more `*.safetensors` files whose keys
are canonical point names:

    {"format": "corruptcheck-dump", "version": 1,
     "case": "tiny", "config": {...model config...},
     "inputs": {"sequences": [[token ids], ...]},          # each sequence from position 0
     "engine": {"name": "...", "version": "..."},
     "precision": "bfloat16",                              # declared; drives the tolerances
     "files": ["rank0.safetensors", "rank1.safetensors"],
     "layout": {"<key>": {"tokens": "flat" | "batch",     # [T, ...] or [B, S_max, ...] right-padded
                          "merge": "sum" | "concat", "dim": -1}}}   # how per-rank shards combine

The merge words are corruptcheck/storage/shards.py's vocabulary (the one the SGLang import and the
engine capture use too); docs/dump.md is the format's reference.

Reading validates everything against the case (case name, config, token ids, file paths,
shapes, dtypes) and raises `BadInput` with one clear line; nothing is unpickled.
"""
from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file

from corruptcheck.storage.batch_layout import fits_batch, unpad
from corruptcheck.cases import Case
from corruptcheck.errors import BadInput
from corruptcheck.storage.jsonio import loads_finite
from corruptcheck.storage.lazy_points import LazyPoints, RowSource, file_tensors, read_tensor, safetensors_file
from corruptcheck.reference import Precision
from corruptcheck.storage.shards import CONCAT, SUM, MergeRule, ShardError, merge_shards

DUMP_FORMAT = "corruptcheck-dump"
DUMP_VERSION = 1
MANIFEST = "manifest.json"
MERGES = (SUM, CONCAT)  # the rules a dump may name (shards.py); replicated keys appear in one file
FIELD_TYPES = {"case": (str, "a string"), "precision": (str, "a string"), "files": (list, "a list of file names"),
               "inputs": (dict, "a table"), "layout": (dict, "a table"), "engine": (dict, "a table"),
               "config": (dict, "a table")}
OPTIONAL = ("inputs", "layout", "engine")  # may be null


def write_dump(points: dict, case: Case, out_dir: str | Path, *, engine: dict, precision: str,
               layout: dict | None = None, shards: list[dict] | None = None) -> Path:
    """Write `points` (or per-rank `shards`) as a dump of `case`. Files are written under
    temporary names and renamed, the manifest last, so a failed write never leaves a dump
    that looks complete."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = shards if shards is not None else [points]
    names = ["points.safetensors"] if shards is None else [f"rank{r}.safetensors" for r in range(len(parts))]
    for name, part in zip(names, parts):
        tmp = out / f".{name}.tmp"
        save_file(_unshared(part), str(tmp))
        os.replace(tmp, out / name)
    manifest = {
        "format": DUMP_FORMAT, "version": DUMP_VERSION, "case": case.name, "config": case.config.to_dict(),
        "inputs": {"sequences": [s.tolist() for s in case.sequences()]},
        "engine": engine, "precision": Precision.of(precision).name, "files": names, "layout": layout or {},
    }
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, allow_nan=False))
    os.replace(tmp, out / MANIFEST)
    return out


def _unshared(points) -> dict:
    """Contiguous tensors, each with its own memory: an engine may hand the same tensor under two
    names (layers.{i-1}.out is layers.i.attn_hc.in), which safetensors refuses to store twice."""
    out, seen = {}, set()
    for k, v in points.items():
        v = v.contiguous()
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def read_manifest(path: str | Path) -> dict:
    root = Path(path)
    if not root.exists():
        raise BadInput(f"dump {root} does not exist")
    if not root.is_dir():
        raise BadInput(f"dump {root} is not a directory")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BadInput(f"dump {root} has no {MANIFEST}")
    try:
        manifest = loads_finite(mpath.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInput(f"{mpath}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != DUMP_FORMAT:
        raise BadInput(f"{mpath}: not a corruptcheck dump manifest (format must be {DUMP_FORMAT!r})")
    if manifest.get("version") != DUMP_VERSION:
        raise BadInput(f"{mpath}: dump version {manifest.get('version')!r}; this tool reads {DUMP_VERSION}")
    for key in ("case", "precision", "files"):
        if key not in manifest:
            raise BadInput(f"{mpath}: missing field {key!r}")
    for key, kind in FIELD_TYPES.items():
        if key in manifest and not isinstance(manifest[key], kind[0]) and not (manifest[key] is None and key in OPTIONAL):
            raise BadInput(f"{mpath}: field {key!r} must be {kind[1]}, not {type(manifest[key]).__name__}")
    try:
        Precision.of(manifest["precision"])
    except ValueError as exc:
        raise BadInput(f"{mpath}: {exc}") from None
    return manifest


def _check_case(manifest: dict, case: Case, root: Path) -> None:
    where = root / MANIFEST
    if manifest["case"] != case.name:
        raise BadInput(f"{where}: dump is of case {manifest['case']!r}, not {case.name!r}")
    if "config" in manifest and manifest["config"] != case.config.to_dict():
        raise BadInput(f"{where}: model config differs from case {case.name!r}")
    seqs = (manifest.get("inputs") or {}).get("sequences")
    if seqs is not None and seqs != [s.tolist() for s in case.sequences()]:
        raise BadInput(f"{where}: input token ids differ from case {case.name!r}")


def _unbatch(key: str, t: torch.Tensor, seq_lens) -> torch.Tensor:
    """[B, S_max, ...] right-padded -> [T, ...]."""
    if not fits_batch(t, seq_lens):
        raise BadInput(f"point {key}: batch layout {tuple(t.shape)} does not fit {len(seq_lens)} sequences "
                       f"of lengths {list(seq_lens)}")
    return unpad(t, seq_lens)


def load_dump(path: str | Path, case: Case) -> tuple[LazyPoints, dict]:
    """(points, manifest) of a dump, merged across ranks and flattened to [T, ...].

    Everything is validated here from the files' headers (merge rules, shapes, batch layout,
    dtypes; no tensor data is read); each point's data is read when it is used (LazyPoints), so
    a compare holds about one point of the dump in memory, not the dump."""
    root = Path(path)
    manifest = read_manifest(root)
    _check_case(manifest, case, root)
    files = manifest["files"]
    if not isinstance(files, list) or not files:
        raise BadInput(f"{root / MANIFEST}: 'files' must list at least one .safetensors file")
    layout = manifest.get("layout") or {}
    if not isinstance(layout, dict):
        raise BadInput(f"{root / MANIFEST}: 'layout' must be a table")
    sources: dict[str, list] = {}  # key -> [(file, shape-only tensor)] in rank order
    for name in files:
        full = safetensors_file(root, name, root / MANIFEST, "dump file")
        for key, t in file_tensors(full).items():
            sources.setdefault(key, []).append((full, torch.empty(t.shape, dtype=t.dtype, device="meta")))
    if not sources:
        raise BadInput(f"dump {root} contains no tensors")
    loaders, shapes, streams = {}, {}, {}
    for key, parts in sources.items():
        spec = layout.get(key, {})
        if not isinstance(spec, dict):
            raise BadInput(f"{root / MANIFEST}: layout of {key} must be a table")
        if spec.get("tokens", "flat") not in ("flat", "batch"):
            raise BadInput(f"{root / MANIFEST}: layout of {key}: tokens must be 'flat' or 'batch', "
                           f"not {spec.get('tokens')!r}")
        shape_only = _assemble(key, [m for _, m in parts], spec, case.seq_lens)
        if shape_only.dtype == torch.bool or shape_only.is_complex():
            raise BadInput(f"point {key}: unsupported dtype {shape_only.dtype}")
        loaders[key] = partial(_read_point, key, [f for f, _ in parts], spec, tuple(case.seq_lens))
        shapes[key] = shape_only
        if len(parts) == 1 and spec.get("tokens", "flat") == "flat" and shape_only.dim():  # stored as compared
            streams[key] = RowSource(parts[0][0], key, shape_only.shape, shape_only.dtype)
    return LazyPoints(loaders, shapes, streams), manifest


def _assemble(key: str, parts: list, spec: dict, seq_lens) -> torch.Tensor:
    """The rank pieces of a point merged and, for a batch layout, flattened to [T, ...]."""
    t = _merge(key, parts, spec)
    return _unbatch(key, t, seq_lens) if spec.get("tokens", "flat") == "batch" else t


def _read_point(key: str, files: list, spec: dict, seq_lens) -> torch.Tensor:
    return _assemble(key, [read_tensor(f, key) for f in files], spec, seq_lens)


def _merge(key: str, parts: list, spec: dict) -> torch.Tensor:
    merge = spec.get("merge")
    if len(parts) == 1:
        if merge is not None and merge not in MERGES:
            raise BadInput(f"layout of {key}: merge must be one of {MERGES}, not {merge!r}")
        return parts[0]
    if merge not in MERGES:
        raise BadInput(f"point {key} appears in {len(parts)} files but its layout has no merge rule "
                       f"(sum for partial sums, concat with a dim for shards)")
    dim = spec.get("dim", -1)
    if merge == CONCAT and (not isinstance(dim, int) or isinstance(dim, bool)):
        raise BadInput(f"layout of {key}: dim must be an integer")
    try:
        return merge_shards(parts, MergeRule(merge, dim if merge == CONCAT else -1))
    except ShardError as exc:
        raise BadInput(f"point {key}: {exc}") from None

"""Import the files SGLang's own `dumper` writes (python/sglang/srt/debug_utils/dumper.py;
docs/engine-capture.md §2.3):

* one `torch.save({"value": tensor, "meta": {...}})` file per tensor, named by `key=value`
  tags joined with `___`: `step=0___rank=0___dump_index=7___name=<name>___layer_id=3.pt`;
* `name` is either an explicit dump (we accept canonical point names, e.g. a source patch doing
  `dumper.dump("layers.3.attn_hc.collapsed", x)`) or a non-intrusive module hook
  `non_intrusive__<module path>.output` / `.inputs.<i|kw>`; core fields `input_ids`,
  `positions`, `seq_lens` describe the batch;
* tensor-parallel shards carry a dims string (`"t h(tp,partial)"`, `"t h(tp)"`) in the meta,
  as SGLang's comparator uses them: `partial` -> sum over ranks, `tp` -> concatenate on that dim
  (translated to corruptcheck/storage/shards.py's rules `sum` / `concat:<dim>`, merged there).

Files are loaded with `torch.load(weights_only=True)`: anything but tensors and plain values
is refused.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from corruptcheck.cases import Case
from corruptcheck.errors import BadInput
from corruptcheck.points import capture_points
from corruptcheck.reference import Precision
from corruptcheck.storage.shards import CONCAT, SUM, MergeRule, ShardError, merge_shards, replicas_agree

# SGLang DeepSeek V4 module paths (docs/engine-capture.md §2.1, §6) -> canonical points
_MODULE_MAP = [
    (r"model\.embed_tokens\.output", "embed"),
    (r"model\.layers\.(\d+)\.inputs\.hidden_states", "layers.{0}.attn_hc.in"),
    (r"model\.layers\.(\d+)\.input_layernorm\.output", "layers.{0}.attn_norm"),
    (r"model\.layers\.(\d+)\.self_attn\.output(?:\.0)?", "layers.{0}.attn.out"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.output", "layers.{0}.ffn_norm"),
    (r"model\.layers\.(\d+)\.mlp\.gate\.output(?:\.0)?", "layers.{0}.moe.router_logits"),
    (r"model\.layers\.(\d+)\.mlp\.output", "layers.{0}.moe.out"),
    (r"model\.layers\.(\d+)\.output", "layers.{0}.out"),
    (r"model\.norm\.output", "head.norm"),
]
_CORE = ("input_ids", "positions", "seq_lens")
_DIMS = re.compile(r"^(\w+)(?:\(([\w,]+)\))?$")


def parse_filename(name: str) -> dict:
    if not name.endswith(".pt"):
        raise ValueError("not a .pt file")
    tags = {}
    for part in name[:-3].split("___"):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"tag {part!r} is not key=value")
        tags[key] = value
    for key in ("step", "rank", "name"):
        if key not in tags:
            raise ValueError(f"missing tag {key!r}")
    for key in ("step", "rank"):
        if not tags[key].isdigit() or len(tags[key]) > 9:
            raise ValueError(f"tag {key}={tags[key]!r} is not a non-negative integer")
    return tags


def canonical_name(name: str, known: set) -> str | None:
    if name in known:
        return name
    if name.startswith("non_intrusive__"):
        path = name[len("non_intrusive__"):]
        for pattern, target in _MODULE_MAP:
            m = re.fullmatch(pattern, path)
            if m:
                return target.format(*m.groups())
    return None


def _load(path: Path) -> tuple[torch.Tensor, dict]:
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise BadInput(f"{path}: refused to unpickle (only tensors and plain values are read): "
                       f"{str(exc).splitlines()[0]}") from None
    except Exception as exc:  # noqa: BLE001 - torch's restricted unpickler raises anything on damaged bytes
        raise BadInput(f"{path}: corrupt or truncated ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("value"), torch.Tensor):
        raise BadInput(f"{path}: not an SGLang dumper file (expected {{'value': tensor, 'meta': ...}})")
    meta = obj.get("meta") or {}
    return obj["value"], meta if isinstance(meta, dict) else {}


def dims_rule(dims) -> MergeRule | None:
    """The merge rule (shards.py) a dims annotation states: the first axis marked `partial`
    -> sum, marked `tp` / `ep` / `sp` / `cp` -> concat on that axis; None if none is marked."""
    if not isinstance(dims, str):
        return None
    for axis, token in enumerate(dims.split()):
        m = _DIMS.match(token)
        mods = set((m.group(2) or "").split(",")) if m else set()
        if "partial" in mods:
            return MergeRule(SUM)
        if mods & {"tp", "ep", "sp", "cp"}:
            return MergeRule(CONCAT, axis)
    return None


def _merge(name: str, shards: list[tuple[int, torch.Tensor, dict]]) -> torch.Tensor:
    shards.sort(key=lambda s: s[0])
    tensors = [t for _, t, _ in shards]
    dims = shards[0][2].get("dims")
    rule = dims_rule(dims) if len(tensors) > 1 else None
    if rule is not None:
        try:
            merged = merge_shards(tensors, rule)
        except ShardError as exc:
            raise BadInput(f"point {name}: {exc} (dims {dims!r})") from None
        return merged.to(torch.float32) if rule.kind == SUM else merged  # sums come back float32
    if len(tensors) == 1 or replicas_agree(tensors):
        return tensors[0]  # replicated
    raise BadInput(f"point {name}: {len(tensors)} ranks differ and the dump has no dims annotation "
                   f"(e.g. 't h(tp,partial)') saying how to merge them")


def _find_files(root: Path) -> list[Path]:
    if not root.is_dir():
        raise BadInput(f"SGLang dump {root} is not a directory")
    files = sorted(root.glob("*.pt"))
    if not files:
        subdirs = [d for d in root.iterdir() if d.is_dir()]
        if len(subdirs) == 1:  # <DUMPER_DIR>/<exp_name>/
            files = sorted(subdirs[0].glob("*.pt"))
    if not files:
        raise BadInput(f"SGLang dump {root} contains no .pt files")
    return files


def load_sglang_dump(path, case: Case, precision: str | None = None, step: int | None = None):
    """(points, meta) from an SGLang dumper directory, validated against `case`."""
    root = Path(path)
    known = {s.name for s in capture_points(case.config)}
    entries = []
    for f in _find_files(root):
        try:
            tags = parse_filename(f.name)
        except ValueError as exc:
            raise BadInput(f"{f}: not an SGLang dumper file name ({exc})") from None
        entries.append((f, tags))
    steps = sorted({int(t["step"]) for _, t in entries})
    step = steps[0] if step is None else step
    groups: dict[str, list] = {}
    core: dict[str, torch.Tensor] = {}
    ignored = []
    for f, tags in entries:
        if int(tags["step"]) != step:
            continue
        value, meta = _load(f)
        name = tags["name"]
        if name in _CORE:
            core.setdefault(name, value)
            continue
        canon = canonical_name(name, known)
        if canon is None:
            ignored.append(name)
            continue
        groups.setdefault(canon, []).append((int(tags["rank"]), value, meta))
    if not groups:
        raise BadInput(f"SGLang dump {root}: no tensor maps to a corruptcheck capture point "
                       f"(ignored: {', '.join(sorted(set(ignored))[:5]) or 'none'})")
    _check_core(core, case, root)
    points = {name: _merge(name, shards) for name, shards in groups.items()}
    if precision is None:
        dtypes = {t.dtype for t in points.values() if t.is_floating_point()}
        precision = "bfloat16" if torch.bfloat16 in dtypes else ("float32" if torch.float32 in dtypes else "float64")
    meta = {"path": str(root), "format": "sglang dumper", "step": step, "precision": Precision.of(precision).name,
            "ignored_names": sorted(set(ignored))}
    return points, meta


def _check_core(core: dict, case: Case, root: Path) -> None:
    expected = torch.cat(case.sequences())
    for name, t in core.items():
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise BadInput(f"SGLang dump {root}: {name} must be integer, not {t.dtype}")
    if "input_ids" in core and not torch.equal(core["input_ids"].flatten().long(), expected):
        raise BadInput(f"SGLang dump {root}: input_ids differ from case {case.name!r}")
    if "seq_lens" in core and core["seq_lens"].flatten().tolist() != list(case.seq_lens):
        raise BadInput(f"SGLang dump {root}: seq_lens {core['seq_lens'].tolist()} differ from case {list(case.seq_lens)}")
    if "positions" in core:
        expected_pos = torch.cat([torch.arange(n) for n in case.seq_lens])
        if not torch.equal(core["positions"].flatten().long(), expected_pos):
            raise BadInput(f"SGLang dump {root}: positions differ from the case's (each sequence from 0)")

"""Points read from safetensors files when they are used, not all at once.

A dump of a wide model, or the float64 reference of a wide case, is many times larger than any
one of its tensors. `LazyPoints` maps point names to loaders: each access memory-maps the file
(safetensors reads no data up front) and builds the tensor; nothing is kept. Once the caller
drops a tensor its pages leave the process, so the differ's memory follows the largest point
(its engine and reference tensors) rather than the whole dump. A point read twice is mapped
twice (from the page cache): callers hold a point once. It is a mutable mapping: a stored
tensor replaces a loader.
"""
from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from corruptcheck.errors import BadInput


def read_safetensors(path: Path, fn):
    """fn(open safetensors file), memory-mapped; a damaged file is BadInput."""
    try:
        with safe_open(str(path), "pt") as f:
            return fn(f)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BadInput(f"file {path} is corrupt or truncated ({exc})") from None


def safetensors_file(root: Path, name, listing: Path, kind: str) -> Path:
    """The file `name` that `listing` (a manifest or index) names inside `root`, checked: a
    non-empty relative path that stays inside root, a .safetensors file (pickles are never
    read), present. `kind`: "dump file", "checkpoint shard" (the words of the messages)."""
    owner, noun = kind.split()
    if not isinstance(name, str) or not name:
        raise BadInput(f"{listing}: {noun} entries must be non-empty strings")
    p = Path(name)
    if p.is_absolute() or ".." in p.parts:
        raise BadInput(f"{listing}: {noun} {name!r} is outside the {owner}")
    full = root / p
    if not full.resolve().is_relative_to(root.resolve()):
        raise BadInput(f"{listing}: {noun} {name!r} resolves outside the {owner}")
    if full.suffix != ".safetensors":
        raise BadInput(f"{listing}: {noun} {name!r} is not a .safetensors file (pickles are not read)")
    if not full.is_file():
        raise BadInput(f"{kind} {full} is missing")
    return full


def read_tensor(path: Path, key: str) -> torch.Tensor:
    """One tensor of a safetensors file."""
    return read_safetensors(path, lambda f: f.get_tensor(key))


def file_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a file (no data is read until a tensor is used)."""
    return read_safetensors(path, lambda f: {k: f.get_tensor(k) for k in f.keys()})


@dataclass(frozen=True)
class RowSource:
    """A point stored whole in one file, read a block of rows at a time (`rows(a, b)`): the
    differ streams it (metrics.float_metrics) instead of holding it."""
    path: Path
    key: str
    shape: torch.Size
    dtype: torch.dtype

    def rows(self, a: int, b: int) -> torch.Tensor:
        return read_safetensors(self.path, lambda f: f.get_slice(self.key)[a:b])


class LazyPoints(MutableMapping):
    """`loaders`: {name: () -> tensor}; `sources`: {name: RowSource} for the points that can be
    streamed; `shapes`: {name: tensor on the meta device} (shape and dtype without data)."""

    def __init__(self, loaders: dict[str, Callable[[], torch.Tensor]], shapes: dict | None = None,
                 sources: dict | None = None):
        self._items: dict = dict(loaders)
        self._shapes = dict(shapes or {})
        self._sources = dict(sources or {})

    def __getitem__(self, name: str) -> torch.Tensor:
        item = self._items[name]
        return item if isinstance(item, torch.Tensor) else item()

    def shape_of(self, name: str) -> torch.Tensor:
        """The point's shape and dtype as a meta tensor (reads no data)."""
        item = self._items[name]
        if isinstance(item, torch.Tensor):
            return item
        meta = self._shapes.get(name)
        return meta if meta is not None else item().to("meta")

    def source(self, name: str):
        """A RowSource when the point can be streamed, else the tensor."""
        item = self._items[name]
        return item if isinstance(item, torch.Tensor) else self._sources.get(name) or item()

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self._items[name] = value

    def __delitem__(self, name: str) -> None:
        del self._items[name]
        self._shapes.pop(name, None)
        self._sources.pop(name, None)

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name) -> bool:
        return name in self._items


def shape_of(points, name: str) -> torch.Tensor:
    """Shape and dtype of a point of any mapping (a LazyPoints reads no data for it)."""
    return points.shape_of(name) if isinstance(points, LazyPoints) else points[name]


def source_of(points, name: str):
    """What the differ reads a point from: a RowSource when it can stream it, else the tensor."""
    return points.source(name) if isinstance(points, LazyPoints) else points[name]

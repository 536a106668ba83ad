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
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from corruptcheck.errors import BadInput


def read_tensor(path: Path, key: str) -> torch.Tensor:
    """One tensor of a safetensors file, memory-mapped; a damaged file is BadInput."""
    try:
        with safe_open(str(path), "pt") as f:
            return f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BadInput(f"file {path} is corrupt or truncated ({exc})") from None


def file_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a file, memory-mapped (no data is read until a tensor is used)."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BadInput(f"file {path} is corrupt or truncated ({exc})") from None


class LazyPoints(MutableMapping):
    def __init__(self, loaders: dict[str, Callable[[], torch.Tensor]]):
        self._items: dict = dict(loaders)

    def __getitem__(self, name: str) -> torch.Tensor:
        item = self._items[name]
        return item if isinstance(item, torch.Tensor) else item()

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self._items[name] = value

    def __delitem__(self, name: str) -> None:
        del self._items[name]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name) -> bool:
        return name in self._items

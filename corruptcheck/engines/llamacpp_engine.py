"""The `llamacpp` engine: llama.cpp's own DeepSeek V4 (`deepseek4` architecture), CPU, through
llama-cpp-python 0.3.36 (docs/engines.md, "llama.cpp").

The case is written as a GGUF (`llamacpp_gguf.py`, cached under the corruptcheck cache), a
child process (`llamacpp_worker.py`) loads it and runs the case's sequences through
`llama_decode` with an eval callback that copies every named node it needs
(`llamacpp_capture.py`); here the rows are placed by request and turned into canonical points.
Prefill-only: each sequence alone, split by llama.cpp into n_ubatch pieces. Served (the case's
schedule): prompts in chunks, staggered arrivals, greedy decode steps, equal-length pieces of
several sequences in one call.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from corruptcheck.cases import Case
from corruptcheck.engines import child
from corruptcheck.engines.alignment import align_requests, served_rows
from corruptcheck.engines.base import Capture, Engine
from corruptcheck.engines.canonical import capture_meta, finalize
from corruptcheck.engines.llamacpp_capture import SKIPPED, canonical_of, parse_name, per_token
from corruptcheck.engines.llamacpp_gguf import WEIGHT_TYPES, check_config, gguf_module, hparams, write_gguf
from corruptcheck.engines.options import Option, one_of, positive_int
from corruptcheck.engines.ranks import merge_ranks
from corruptcheck.engines.recorder import RawCapture
from corruptcheck.engines.child import ChildLimits
from corruptcheck.errors import EngineCrashed, EngineUnavailable
from corruptcheck.weights import GGUF_ROUNDINGS

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"  # the release whose vendored llama.cpp was read (docs/engines.md)
GGUF_FORMAT = 1  # bump when the writer changes what it writes (cache key)
KV_TYPES = ("f32", "f16", "q8_0")


def installed_version() -> str | None:
    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return None


def precision_profile(weights: str, kv_type: str, flash_attn_resolved: str) -> str:
    """The profile a run declares (llamacpp_precision.py; derivation in docs/engines.md)."""
    from corruptcheck.engines.llamacpp_precision import profile_name

    return profile_name(weights, kv_type, flash_attn_resolved)


class LlamaCppEngine(Engine):
    name = "llamacpp"
    extra = "llamacpp"
    serves = True
    # its run is a worker process (llamacpp_worker.py), watched by engines/child.py's supervisor:
    # a signal, a non-zero exit, no progress for --engine-timeout, memory over --engine-memory
    supervises_own_child = True
    options = ()  # set below (_options)

    def available(self) -> tuple[bool, str]:
        if installed_version() is None:
            return False, f"{PACKAGE} is not installed (make install-llamacpp)"
        if gguf_module() is None:
            return False, ("the gguf package vendored in llama-cpp-python's sdist (with DeepSeek V4) is not "
                           "installed (make install-llamacpp)")
        try:
            import llama_cpp  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - a broken build says why
            return False, f"llama_cpp does not import: {exc}"
        return True, ""

    def installed(self) -> bool:
        return installed_version() is not None

    def weights_case(self, case: Case, **options) -> Case:
        """Q8_0 and MXFP4 weights are not the case's numbers: the run and the reference use the
        case's weights as the GGUF holds them (weights.GGUF_ROUNDINGS; F32 and BF16 are exact)."""
        w = options.get("weights")
        if w not in GGUF_ROUNDINGS or "+" in case.weight_format:
            return case
        return dataclasses.replace(case, name=f"{case.name}+{w}", weight_format=f"{case.weight_format}+{w}",
                                   golden=False)

    def run(self, case: Case, precision: str, schedule=None, **options) -> Capture:
        ok, why = self.available()
        if not ok:
            raise EngineUnavailable(why)
        problems = check_config(case.config)
        if problems:
            raise EngineUnavailable(f"llama.cpp's deepseek4 cannot run case {case.name}: {'; '.join(problems)}")
        faults = options.pop("_faults", None) or []  # the self-test's faults (faults/llamacpp.py)
        limits = options.pop("_limits", None) or ChildLimits()
        opts = self.parse_options(options)
        points, meta = launch(case, schedule, opts, faults, limits)
        meta["requested_precision"] = precision
        prof = precision_profile(opts.get("weights", "f32"), opts.get("kv_type", "f32"),
                                 meta["settings"]["flash_attn_resolved"])
        return Capture(points, self.name, prof, meta)


def _options():
    return (
        Option("weights", one_of(*WEIGHT_TYPES), "GGUF weight types: f32 (exact), bf16 (exact), q8_0, mxfp4 (experts)"),
        Option("kv_type", one_of(*KV_TYPES), "KV cache type, type_k = type_v (default f32; llama.cpp's own default f16)"),
        Option("flash_attn", one_of("auto", "on", "off"),
               "flash attention (default off: on, it casts K/V to F16, so the run is no longer float32; "
               "llama.cpp's own default auto resolves to on for the CPU)"),
        Option("n_ubatch", positive_int, "physical batch: a prompt runs in pieces of this many tokens (default 512)"),
        Option("n_batch", positive_int, "logical batch: tokens per llama_decode call (default 4096)"),
        Option("threads", positive_int, "CPU threads (default: the machine's cores, at most 8)"),
    )


LlamaCppEngine.options = _options()


def gguf_path(case: Case, weights: str) -> Path:
    """The cached GGUF of a case (written once per case spec, weights and writer format)."""
    from corruptcheck.storage.golden import cache_root

    # the weights depend on config, seed and weight format only (a served / partnered / decoded
    # variant of a case shares its GGUF)
    spec = json.dumps({"config": case.config.to_dict(), "seed": case.seed, "format": case.weight_format},
                      sort_keys=True) + f"|{weights}|{GGUF_FORMAT}"
    digest = hashlib.sha256(spec.encode()).hexdigest()[:16]
    return cache_root() / "llamacpp" / f"{case.config.name}-{weights}-{digest}.gguf"


def ensure_gguf(case: Case, weights: str) -> tuple[Path, dict]:
    path = gguf_path(case, weights)
    info_path = path.with_suffix(".json")
    if path.exists() and info_path.exists():
        return path, json.loads(info_path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    info = write_gguf(case, tmp, weights)
    info["path"] = str(path)
    info.pop("tensor_types", None)
    os.replace(tmp, path)
    info_path.write_text(json.dumps(info))
    return path, info


def launch(case: Case, schedule, opts: dict, faults: list, limits: ChildLimits = ChildLimits()) -> tuple[dict, dict]:
    started = time.perf_counter()
    weights = opts.get("weights", "f32")
    path, ginfo = ensure_gguf(case, weights)
    written = time.perf_counter()
    prompts = [s.tolist() for s in case.sequences()]
    threads = opts.get("threads") or min(os.cpu_count() or 1, 8)
    job = {"gguf": str(path), "prompts": prompts, "n_ubatch": opts.get("n_ubatch", 512),
           "n_batch": opts.get("n_batch", 4096), "threads": threads, "kv_type": opts.get("kv_type", "f32"),
           "flash_attn": opts.get("flash_attn", "off"), "faults": faults, "parent": os.getpid(),
           "chunk": schedule.chunk if schedule else None, "decode_steps": schedule.decode_steps if schedule else 0,
           "arrivals": list(schedule.arrivals) if schedule and schedule.arrivals else None}
    workdir = child.new_workdir()
    try:
        job["out"] = str(workdir)
        job_path = workdir / "job.json"
        job_path.write_text(json.dumps(job))
        end = child.supervise(child.python_argv("corruptcheck.engines.llamacpp_worker", str(job_path)), workdir,
                              limits, child.child_env())
        if not end.finished:
            raise EngineCrashed({**end.crash, "exit_code": end.returncode, "pid": end.pid, "wall_s": round(end.wall_s, 3),
                                 "peak_rss_mib": round(end.peak_rss_bytes / (1 << 20), 1),
                                 "stderr_tail": end.stderr_tail}, None, "llamacpp")
        meta_in = json.loads((workdir / "passes.json").read_text())
        done = time.perf_counter()
        raw, batches, extra = _raw_capture(case, meta_in, str(workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    sequences = meta_in["sequences"]
    align = align_requests([(p["ids"], p["pos"]) for p in raw.passes], batches, sequences)
    points, info = finalize(merge_ranks([raw]), case.config, sequences, align)
    meta = capture_meta(raw, info)
    meta["capture"]["skipped"] = dict(SKIPPED)
    meta["capture"]["finer_nodes"] = extra
    problems = check_loaded(case, meta_in["loaded"])
    if problems:
        raise RuntimeError("llama.cpp loaded a different model than the case: " + "; ".join(problems))
    meta.update({
        "version": f"{PACKAGE} {installed_version()} (vendored llama.cpp, ggml {_ggml_version()})",
        "build": "cpu", "system_info": meta_in["system_info"].strip(),
        "gguf": {k: v for k, v in ginfo.items() if k != "path"},
        "loaded": meta_in["loaded"], "settings": meta_in["settings"],
        "fault_hits": meta_in.get("fault_hits", {}),
        "timings": {"gguf_s": round(written - started, 2), **meta_in["timings"],
                    "worker_s": round(done - written, 2)},
    })
    if schedule is not None:
        meta["served"] = {"sequences": sequences, "rows": served_rows(align, sequences, [len(p) for p in prompts]),
                          "batching": _batching(meta_in["calls"], raw.passes)}
    return points, meta


def _ggml_version() -> str:
    try:
        import llama_cpp

        return llama_cpp.__version__
    except Exception:  # noqa: BLE001
        return "?"


def _raw_capture(case: Case, meta_in: dict, out: str) -> tuple[RawCapture, list, dict]:
    """The worker's passes (one file each in `out`) as a RawCapture (canonical names,
    [rows, ...] tensors) and, per pass, [(sequence, rows)] in row order for align_requests."""
    from safetensors import safe_open

    raw = RawCapture()
    batches = []
    extra: dict = {}
    for k, p in enumerate(meta_in["passes"]):
        rows = len(p["ids"])
        pts = {}
        with safe_open(os.path.join(out, p["file"]), "np") as tensors:
            named = {key: tensors.get_tensor(key) for key in tensors.keys()}
        for name, occ, _shape in p["names"]:
            t = named.pop(f"{name}|{occ}")
            base, il = parse_name(name)
            targets = canonical_of(base, il, occ)
            if not targets:
                extra[name] = extra.get(name, 0) + 1
                continue
            a = per_token(name, t, rows)
            for target in targets:
                if target == "embed":
                    pts[target] = torch.from_numpy(a.reshape(rows, case.config.hc_mult, -1)[:, 0].copy())
                elif target.endswith("attn_hc.in") and target != "layers.0.attn_hc.in" and base == "l_last":
                    if il + 1 < case.config.num_layers:
                        pts[target] = torch.from_numpy(a.copy())
                else:
                    pts[target] = torch.from_numpy(a.copy())
        pts = _discrete(case, pts, p)
        raw.passes.append({"ids": torch.tensor(p["ids"]), "pos": torch.tensor(p["pos"]), "points": pts})
        runs = []
        for s in p["seq"]:
            if runs and runs[-1][0] == f"seq{s}":
                runs[-1][1] += 1
            else:
                runs.append([f"seq{s}", 1])
        batches.append([tuple(r) for r in runs])
    raw.notes["tp_ranks"] = 1
    return raw, batches, extra


def _discrete(case: Case, pts: dict, p: dict) -> dict:
    """Expert ids as long; indexer picks beyond the query's causal limit (entries llama.cpp's
    top-k took from masked, -inf scores: no-ops in its attention) become -1, as the reference
    writes them, and a ubatch whose cache holds fewer entries than index_topk (llama.cpp's top-k
    is then min(entries, index_topk) wide) is padded with -1 to the reference's width;
    weights [T, k, 1] -> [T, k]."""
    cfg = case.config
    pos = torch.tensor(p["pos"])
    for name in list(pts):
        t = pts[name]
        if name.endswith("moe.experts"):
            pts[name] = t.reshape(t.shape[0], -1).long()
        elif name.endswith("moe.weights"):
            pts[name] = t.reshape(t.shape[0], -1)
        elif name.endswith("attn.indexer_topk"):
            idx = t.reshape(t.shape[0], -1).long()
            limit = ((pos + 1) // cfg.csa_ratio)[:, None]
            idx = torch.where((idx >= 0) & (idx < limit), idx, -1)
            pts[name] = torch.nn.functional.pad(idx, (0, max(cfg.index_topk - idx.shape[1], 0)), value=-1)
    return pts


def check_loaded(case: Case, loaded: dict) -> list[str]:
    """The loaded model's hyper-parameters against the case config (what llama.cpp reports)."""
    want = hparams(case.config)
    checks = {"n_embd": want["n_embd"], "n_layer": want["n_layer"], "n_head": want["n_head"],
              "n_head_kv": want["n_head_kv"], "n_vocab": want["n_vocab"],
              "n_embd_out": want["n_embd"] * want["hc_mult"], "n_layer_nextn": 0}
    problems = [f"{k}: loaded {loaded.get(k)}, case {v}" for k, v in checks.items() if loaded.get(k) != v]
    meta = loaded.get("meta", {})
    ratios = meta.get("deepseek4.attention.compress_ratios")
    if ratios is not None and ratios.replace(" ", "") not in (str(want["compress_ratios"]).replace(" ", ""),):
        pass  # llama_model_meta_val_str renders arrays loosely; the tensors' shapes checked them
    return problems


def _batching(calls: list, passes: list) -> str:
    multi = sum(len(c) > 1 for c in calls)
    return (f"llama.cpp: {len(calls)} llama_decode calls, {len(passes)} ubatches (forward passes), "
            f"{multi} calls with several sequences in one ubatch")

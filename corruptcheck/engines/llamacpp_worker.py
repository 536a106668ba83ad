"""The llama.cpp run itself, in a child process (`python -m corruptcheck.engines.llamacpp_worker
JOB.json`): loads the GGUF through llama-cpp-python's low-level API, feeds the planned calls to
`llama_decode` with an eval callback that copies the named nodes (llamacpp_capture.py), and
writes every forward pass's rows to `OUT/pass-K.safetensors` as soon as its llama_decode call
is done (streamed: the worker holds one call's passes), and `OUT/passes.json` at the end.

A child process because llama.cpp aborts the whole process on a failed GGML_ASSERT (the
parent then reports the log's last lines, one line, instead of dying), and because its model
(mmap) and compute buffers are then gone before the parent loads the float64 reference.

Passes: llama.cpp splits each `llama_decode` into ubatches (`llama_kv_cache_dsv4::init_batch`);
one ubatch is one graph compute, one pass here. The plan makes that split predictable: a
call holds one sequence (split into consecutive n_ubatch pieces) or several sequences with the
same number of tokens and no more than n_ubatch in all (one `split_equal` ubatch, rows grouped
by sequence). Every pass is then checked: its `hc_init` rows must be the embedding rows of the
tokens the plan says it ran, else the run fails (never a silent misalignment).
"""
from __future__ import annotations

import ctypes
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

from corruptcheck.engines import child
from corruptcheck.engines import llamacpp_capture as lc

GGML_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}
FLASH = {"auto": -1, "off": 0, "on": 1}


class _Run:
    def __init__(self, job: dict):
        self.job = job
        self.passes: list = []
        self.cur: dict | None = None
        self.faults = []
        if job.get("faults"):
            from corruptcheck.faults.llamacpp import make_fault

            self.faults = [make_fault(f) for f in job["faults"]]
        self.fault_hits: dict = {}
        self.errors: list = []
        self.pending: list = []  # planned passes of the running llama_decode, in order
        self.flushed = 0  # passes below this one are on disk (flush)
        # the attention path llama.cpp's graph really took: the non-flash path names its
        # softmax node `kq_soft_max-il` (llm_graph_context::build_attn_mha); the flash path
        # (ggml_flash_attn_ext, K/V cast to F16) names none
        self.softmax_nodes = 0

    # -- eval callback ----------------------------------------------------------------------
    def callback(self, t_ptr, ask, _user):
        try:
            t = lc.GGMLTensor.from_address(t_ptr)
            name = t.name.decode(errors="replace")
            if ask:
                if name.startswith("kq_soft_max"):
                    self.softmax_nodes += 1
                return lc.wanted(name) or any(f.targets(name) for f in self.faults)
            if name == "hc_init":  # the first captured node of every ubatch: the next planned pass
                if not self.pending:
                    self.errors.append("llama.cpp ran more ubatches than planned")
                    self.cur = None
                    return True
                self.cur = self.passes[self.pending.pop(0)]
            if self.cur is None:
                return True
            base, il = lc.parse_name(name)
            occ = self.cur["seen"].get(name, 0)
            self.cur["seen"][name] = occ + 1
            for f in self.faults:
                if f.targets(name) and f.occurrence in (None, occ):
                    if f.apply(lc.writable_view(t), self.cur, il):
                        self.fault_hits[f.name] = self.fault_hits.get(f.name, 0) + 1
            if lc.wanted(name):
                self.cur["raw"].setdefault(name, []).append(lc.read_tensor(t))
        except Exception as exc:  # an exception must not cross into C
            self.errors.append(f"{type(exc).__name__}: {exc}")
        return True


def main(job_path: str) -> int:
    job = json.loads(open(job_path).read())
    out = job["out"]
    if job.get("parent"):
        child.die_with_parent(job["parent"])  # a killed tool takes its llama.cpp worker with it
    mark(out, "load", 0)
    import llama_cpp as L

    L.llama_backend_init()
    quiet = L.llama_log_callback(lambda level, text, user: None)
    if not job.get("verbose"):
        L.llama_log_set(quiet, None)
    run = _Run(job)
    cb = L.ggml_backend_sched_eval_callback(run.callback)

    t0 = time.perf_counter()
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    model = L.llama_model_load_from_file(job["gguf"].encode(), mp)
    if not model:
        raise SystemExit("llama_model_load_from_file failed (see the log)")
    loaded = _loaded_hparams(L, model)
    cp = L.llama_context_default_params()
    n_seq = max(1, len(job["prompts"]))
    total = max(len(p) for p in job["prompts"]) + job.get("decode_steps", 0) + 8
    cp.n_ctx = int(n_seq * (-(-total // 256) * 256))
    # a call holds at most every prompt's next piece: the logical batch must hold that
    job["n_batch"] = max(int(job["n_batch"]), sum(len(p) for p in job["prompts"]) + len(job["prompts"]))
    cp.n_batch = int(job["n_batch"])
    cp.n_ubatch = int(job["n_ubatch"])
    cp.n_seq_max = n_seq
    cp.n_threads = cp.n_threads_batch = int(job["threads"])
    cp.type_k = cp.type_v = GGML_TYPES[job["kv_type"]]
    cp.flash_attn_type = FLASH[job["flash_attn"]]
    cp.cb_eval = cb
    cp.cb_eval_user_data = None
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise SystemExit("llama_init_from_model failed (see the log)")
    t1 = time.perf_counter()
    emb = _embedding(job["gguf"])
    sequences, calls = serve(L, ctx, run, job, emb)
    t2 = time.perf_counter()
    L.llama_free(ctx)
    L.llama_model_free(model)
    _write(out, run, sequences, calls, loaded, {"engine_start_s": round(t1 - t0, 2), "run_s": round(t2 - t1, 2)},
           {"n_ctx": int(cp.n_ctx), "n_batch": int(cp.n_batch), "n_ubatch": int(cp.n_ubatch), "n_seq_max": n_seq,
            "threads": int(job["threads"]), "kv_type": job["kv_type"], "flash_attn": job["flash_attn"],
            "flash_attn_resolved": "off" if run.softmax_nodes else "on"},
           L.llama_print_system_info().decode(errors="replace"))
    child.write_json(Path(out) / child.DONE, {"passes": len(run.passes),
                                              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
    return 0


def mark(out: str, phase: str, n: int) -> None:
    """The progress mark the supervisor watches (engines/child.py): a changing `n` is progress."""
    child.write_json(Path(out) / child.PROGRESS, {"phase": phase, "n": n})


def _loaded_hparams(L, model) -> dict:
    """What llama.cpp loaded, from its own API and GGUF metadata (checked by the parent)."""
    def meta(key):
        buf = ctypes.create_string_buffer(256)
        n = L.llama_model_meta_val_str(model, key.encode(), buf, 256)
        return buf.value.decode() if n >= 0 else None

    keys = ["deepseek4.attention.compress_ratios", "deepseek4.hash_layer_count", "deepseek4.expert_gating_func",
            "deepseek4.attention.sliding_window", "deepseek4.rope.scaling.type", "deepseek4.indexer.top_k",
            "deepseek4.hyper_connection.count", "deepseek4.expert_weights_scale", "deepseek4.swiglu_clamp_exp"]
    return {"n_embd": L.llama_model_n_embd(model), "n_layer": L.llama_model_n_layer(model),
            "n_head": L.llama_model_n_head(model), "n_head_kv": L.llama_model_n_head_kv(model),
            "n_embd_out": L.llama_model_n_embd_out(model),
            "n_vocab": L.llama_vocab_n_tokens(L.llama_model_get_vocab(model)),
            "n_layer_nextn": L.llama_model_n_layer_nextn(model),
            "meta": {k: meta(k) for k in keys}}


def _embedding(path: str) -> np.ndarray:
    """token_embd rows as float32, read back from the GGUF (to check each pass's rows)."""
    import gguf

    r = gguf.GGUFReader(path)
    for t in r.tensors:
        if t.name == "token_embd.weight":
            data = np.asarray(t.data)
            if t.tensor_type == gguf.GGMLQuantizationType.BF16:
                data = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
            return np.array(data, dtype=np.float32).reshape(-1, int(t.shape[0]))
    raise RuntimeError("token_embd.weight not in the GGUF")


def serve(L, ctx, run: _Run, job: dict, emb: np.ndarray):
    """Feed the prompts (chunked, staggered) and greedy decode steps. Returns (sequences fed,
    [per llama_decode call: [(seq, n)]])."""
    prompts = [list(p) for p in job["prompts"]]
    chunk = job.get("chunk")
    steps = job.get("decode_steps", 0)
    arrivals = job.get("arrivals") or [0] * len(prompts)
    n_ubatch = int(job["n_ubatch"])
    seqs = [[] for _ in prompts]  # tokens fed so far (prompt, then greedy)
    fed = [0] * len(prompts)
    pending_next: dict = {}  # seq -> greedy token to feed next
    done = [False] * len(prompts)
    calls: list = []
    batch = L.llama_batch_init(max(int(job["n_batch"]), len(prompts)), 0, 1)
    while not all(done):
        running = [s for s in range(len(prompts)) if not done[s] and arrivals[s] <= len(run.passes)]
        if not running:
            running = [min((s for s in range(len(prompts)) if not done[s]), key=lambda s: arrivals[s])]
        pieces = []
        for s in running:
            if fed[s] < len(prompts[s]):
                n = min(chunk or len(prompts[s]), len(prompts[s]) - fed[s])
                pieces.append((s, prompts[s][fed[s]: fed[s] + n], fed[s]))
            else:
                pieces.append((s, [pending_next[s]], fed[s]))
        # one call per group of equal-length pieces (llama.cpp's split_equal batches only
        # equal-length pieces of several sequences together)
        groups: dict = {}
        for p in pieces:
            groups.setdefault(len(p[1]), []).append(p)
        for group in groups.values():
            _decode(L, ctx, run, batch, group, n_ubatch, emb, seqs, fed, pending_next, prompts, steps, done)
            calls.append([(p[0], len(p[1])) for p in group])
            flush(job["out"], run, len(run.passes))
            mark(job["out"], "decode" if all(fed[p[0]] > len(prompts[p[0]]) for p in group) else "prefill",
                 len(run.passes))
    L.llama_batch_free(batch)
    return seqs, calls


def _decode(L, ctx, run, batch, group, n_ubatch, emb, seqs, fed, pending_next, prompts, steps, done):
    """One llama_decode of `group` [(seq, tokens, start)], its expected passes recorded and
    checked, then each sequence's next greedy token taken from its last row's logits."""
    rows = [(s, tok, start + j) for s, toks, start in group for j, tok in enumerate(toks)]
    batch.n_tokens = len(rows)
    for i, (s, tok, pos) in enumerate(rows):
        batch.token[i] = int(tok)
        batch.pos[i] = int(pos)
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = int(s)
        batch.logits[i] = 1
    # the passes this call will run: one sequence in consecutive n_ubatch pieces; several
    # sequences of equal length (split_equal) in ubatches of n_ubatch // n_seqs tokens of each,
    # rows grouped by sequence
    per = n_ubatch // len(group)
    if per < 1:
        raise RuntimeError(f"n_ubatch {n_ubatch} is smaller than the {len(group)} sequences of one call")
    n = len(group[0][1])
    expected = []
    for i in range(0, n, per):
        expected.append([(s, toks[j], start + j) for s, toks, start in group for j in range(i, min(i + per, n))])
    first = len(run.passes)
    for exp in expected:
        run.passes.append({"ids": [r[1] for r in exp], "pos": [r[2] for r in exp],
                           "seq": [r[0] for r in exp], "raw": {}, "seen": {}})
    # llama.cpp computes the ubatches in order; the callback moves to the next planned pass
    # when a ubatch's hc_init node is computed
    run.cur, run.pending = None, list(range(first, len(run.passes)))
    rc = L.llama_decode(ctx, batch)
    run.cur = None
    if rc != 0:
        raise RuntimeError(f"llama_decode returned {rc}")
    if run.pending:
        raise RuntimeError(f"{len(run.pending)} planned ubatches never ran (llama.cpp split the call differently)")
    if run.errors:
        raise RuntimeError("capture callback: " + "; ".join(run.errors[:3]))
    for k in range(first, len(run.passes)):
        p = run.passes[k]
        init = p["raw"].get("hc_init")
        if not init:
            raise RuntimeError(f"pass {k}: hc_init not captured")
        got = init[0].reshape(len(p["ids"]), -1, emb.shape[1])[:, 0, :]
        if not np.array_equal(got, emb[np.asarray(p["ids"])]):
            raise RuntimeError(f"pass {k}: its rows are not the planned tokens' embeddings (row order differs)")
    for s, toks, start in group:
        fed[s] += len(toks)
        seqs[s].extend(int(t) for t in toks)
        if fed[s] >= len(prompts[s]):
            generated = fed[s] - len(prompts[s])
            if generated >= steps:
                done[s] = True
                continue
            # the row of this sequence's last token in the last pass holding it
            for k in range(len(run.passes) - 1, first - 1, -1):
                p = run.passes[k]
                idx = [i for i, (sq, pos) in enumerate(zip(p["seq"], p["pos"])) if sq == s and pos == fed[s] - 1]
                if idx:
                    logits = p["raw"]["result_output"][0].reshape(len(p["ids"]), -1)[idx[0]]
                    pending_next[s] = int(np.argmax(logits))
                    break


def flush(out: str, run: _Run, upto: int) -> None:
    """Write every finished pass below `upto` to OUT/pass-K.safetensors and drop its rows: the
    worker then holds one llama_decode call's passes at a time, not the whole run (streamed)."""
    import torch
    from safetensors.torch import save_file

    for k in range(run.flushed, upto):
        p = run.passes[k]
        tensors, names = {}, []
        for name, arrs in p["raw"].items():
            for occ, a in enumerate(arrs):
                tensors[f"{name}|{occ}"] = torch.from_numpy(np.ascontiguousarray(a))
                names.append([name, occ, list(a.shape)])
        save_file(tensors, os.path.join(out, f"pass-{k}.safetensors"))
        p["names"], p["raw"] = names, {}
    run.flushed = max(run.flushed, upto)


def _write(out, run, sequences, calls, loaded, timings, settings, sysinfo):
    flush(out, run, len(run.passes))
    meta = {"passes": [{"ids": p["ids"], "pos": p["pos"], "seq": p["seq"], "names": p["names"],
                        "file": f"pass-{k}.safetensors"} for k, p in enumerate(run.passes)],
            "sequences": sequences, "calls": calls, "loaded": loaded, "timings": timings, "settings": settings,
            "system_info": sysinfo, "fault_hits": run.fault_hits}
    with open(os.path.join(out, "passes.json"), "w") as f:
        json.dump(meta, f)


def run_worker(job_path: str) -> int:
    """main, with a Python exception written where the supervisor reads it (exception.json:
    the crash kind `exception`, its type and message) before the traceback and exit 1."""
    try:
        return main(job_path)
    except Exception as exc:  # noqa: BLE001 - the parent's result
        import traceback

        out = json.loads(open(job_path).read()).get("out", os.path.dirname(job_path))
        child.write_json(Path(out) / child.EXCEPTION, {"type": type(exc).__name__,
                                                       "message": (str(exc).splitlines() or [""])[0][:300]})
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(run_worker(sys.argv[1]))

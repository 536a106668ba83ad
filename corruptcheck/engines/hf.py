"""The `hf` engine: transformers' `DeepseekV4ForCausalLM`, run on the case's weights and
captured like every other engine: `capture_taps()` (taps.py) attached by the `Recorder`
(recorder.py), one recorded pass per model call (DESIGN.md §4).

transformers is imported lazily so the rest of corruptcheck works without it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from corruptcheck.batch_layout import is_entry_point, pad_right, rows_per_sequence, unpad
from corruptcheck.cases import Case
from corruptcheck.engines.recorder import Recorder
from corruptcheck.engines.taps import Tap, TokenSource
from corruptcheck.errors import EngineUnavailable
from corruptcheck.reference import ModelConfig, Precision

HF_LAYER_TYPE = {"sliding": "sliding_attention", "csa": "compressed_sparse_attention",
                 "hca": "heavily_compressed_attention"}


def require_transformers():
    try:
        import transformers
        from transformers import DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise EngineUnavailable(
            f"the hf engine needs transformers>=5.24 with DeepseekV4ForCausalLM ({exc}); "
            "install it with: pip install 'corruptcheck[hf]'") from None
    return transformers


def hf_config(cfg: ModelConfig, attn_impl: str = "eager"):
    """The transformers config equivalent to `cfg` (explicit layer schedule, spec §1.3)."""
    require_transformers()
    from transformers import DeepseekV4Config

    types = [cfg.layer_type(i) for i in range(cfg.num_layers)]
    hca = {cfg.compress_ratio(i) for i in range(cfg.num_layers) if types[i] == "hca"}
    if len(hca) > 1:
        raise ValueError("transformers supports a single HCA ratio per model")
    hc = cfg.hc_mult
    conf = DeepseekV4Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.moe_inter_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=1,
        head_dim=cfg.head_dim, q_lora_rank=cfg.q_lora_rank, num_experts_per_tok=cfg.experts_per_tok,
        n_routed_experts=cfg.n_routed_experts, n_shared_experts=1, scoring_func="sqrtsoftplus",
        norm_topk_prob=True, routed_scaling_factor=cfg.route_scale,
        max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
        layer_types=[HF_LAYER_TYPE[t] for t in types],
        mlp_layer_types=["hash_moe" if cfg.is_hash_layer(i) else "moe" for i in range(cfg.num_layers)],
        compress_rates={"compressed_sparse_attention": cfg.csa_ratio,
                        "heavily_compressed_attention": hca.pop() if hca else 128},
        compress_rope_theta=cfg.compress_rope_theta, hc_mult=hc, hc_sinkhorn_iters=cfg.hc_sinkhorn_iters,
        hc_eps=cfg.hc_eps, swiglu_limit=cfg.swiglu_limit, sliding_window=cfg.window, o_groups=cfg.o_groups,
        o_lora_rank=cfg.o_lora_rank, index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim,
        index_topk=cfg.index_topk, rms_norm_eps=cfg.rms_eps, partial_rotary_factor=cfg.rope_dim / cfg.head_dim,
        rope_parameters={"rope_type": "yarn", "factor": cfg.yarn_factor,
                         "original_max_position_embeddings": cfg.yarn_original_max_pos,
                         "beta_fast": cfg.yarn_beta_fast, "beta_slow": cfg.yarn_beta_slow},
        tie_word_embeddings=False, num_nextn_predict_layers=cfg.num_mtp_layers,
    )
    conf._attn_implementation = attn_impl
    conf._experts_implementation = "eager"
    return conf


# DeepSeek checkpoint name -> transformers module name (spec §8.1, HF conversion_mapping)
_LAYER_RENAMES = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("hc_attn_fn", "attn_hc.fn"), ("hc_attn_base", "attn_hc.base"), ("hc_attn_scale", "attn_hc.scale"),
    ("hc_ffn_fn", "ffn_hc.fn"), ("hc_ffn_base", "ffn_hc.base"), ("hc_ffn_scale", "ffn_hc.scale"),
    ("attn.wq_a.weight", "self_attn.q_a_proj.weight"), ("attn.q_norm.weight", "self_attn.q_a_norm.weight"),
    ("attn.wq_b.weight", "self_attn.q_b_proj.weight"), ("attn.wkv.weight", "self_attn.kv_proj.weight"),
    ("attn.kv_norm.weight", "self_attn.kv_norm.weight"), ("attn.wo_a.weight", "self_attn.o_a_proj.weight"),
    ("attn.wo_b.weight", "self_attn.o_b_proj.weight"), ("attn.attn_sink", "self_attn.sinks"),
    ("attn.compressor.wkv.weight", "self_attn.compressor.kv_proj.weight"),
    ("attn.compressor.wgate.weight", "self_attn.compressor.gate_proj.weight"),
    ("attn.compressor.ape", "self_attn.compressor.position_bias"),
    ("attn.compressor.norm.weight", "self_attn.compressor.kv_norm.weight"),
    ("attn.indexer.wq_b.weight", "self_attn.compressor.indexer.q_b_proj.weight"),
    ("attn.indexer.weights_proj.weight", "self_attn.compressor.indexer.scorer.weights_proj.weight"),
    ("attn.indexer.compressor.wkv.weight", "self_attn.compressor.indexer.kv_proj.weight"),
    ("attn.indexer.compressor.wgate.weight", "self_attn.compressor.indexer.gate_proj.weight"),
    ("attn.indexer.compressor.ape", "self_attn.compressor.indexer.position_bias"),
    ("attn.indexer.compressor.norm.weight", "self_attn.compressor.indexer.kv_norm.weight"),
    ("ffn.gate.weight", "mlp.gate.weight"), ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"),
    ("ffn.gate.tid2eid", "mlp.gate.tid2eid"),
    ("ffn.shared_experts.w1.weight", "mlp.shared_experts.gate_proj.weight"),
    ("ffn.shared_experts.w3.weight", "mlp.shared_experts.up_proj.weight"),
    ("ffn.shared_experts.w2.weight", "mlp.shared_experts.down_proj.weight"),
]
_TOP_RENAMES = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight",
                "norm.weight": "model.norm.weight", "hc_head_fn": "model.hc_head.hc_fn",
                "hc_head_base": "model.hc_head.hc_base", "hc_head_scale": "model.hc_head.hc_scale"}


def export_state_dict(cfg: ModelConfig, params: dict) -> dict:
    """DeepSeek-named parameters -> a transformers state dict (MTP dropped: HF lacks it)."""
    out = {hf: params[ds] for ds, hf in _TOP_RENAMES.items()}
    for layer in range(cfg.num_layers):
        pre = f"layers.{layer}."
        for ds, hf in _LAYER_RENAMES:
            if pre + ds in params:
                out[f"model.layers.{layer}.{hf}"] = params[pre + ds]
        experts = range(cfg.n_routed_experts)
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([params[f"{pre}ffn.experts.{e}.w1.weight"], params[f"{pre}ffn.experts.{e}.w3.weight"]])
             for e in experts])
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(
            [params[f"{pre}ffn.experts.{e}.w2.weight"] for e in experts])
    return out


def norm_returns_input_dtype() -> bool:
    """Whether transformers' DeepseekV4RMSNorm with an fp32 weight returns a bf16 input's dtype."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RMSNorm

    with torch.no_grad():
        return DeepseekV4RMSNorm(2)(torch.ones(1, 2, dtype=torch.bfloat16)).dtype == torch.bfloat16


def build_model(case: Case, precision: str = "float32", attn_impl: str = "eager"):
    require_transformers()
    from transformers import DeepseekV4ForCausalLM

    prec = Precision.of(precision)
    conf = hf_config(case.config, attn_impl)
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(conf)
    model = model.to_empty(device="cpu")
    sd = export_state_dict(case.config, case.params())
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # rotary inv_freq buffers are non-persistent: rebuild them after to_empty
    for mod in model.modules():
        if type(mod).__name__ == "DeepseekV4RotaryEmbedding":
            for lt in mod.layer_types:
                fn = mod.compute_default_rope_parameters
                if mod.rope_type[lt] != "default":
                    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
                    fn = ROPE_INIT_FUNCTIONS[mod.rope_type[lt]]
                inv, scaling = fn(mod.config, None, layer_type=lt)
                getattr(mod, f"{lt}_inv_freq").copy_(inv)
                getattr(mod, f"{lt}_original_inv_freq").copy_(inv)
                setattr(mod, f"{lt}_attention_scaling", scaling)
    missing = [k for k in missing if "inv_freq" not in k]
    if missing or unexpected:
        raise RuntimeError(f"hf weight export mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    # keep HF's own fp32 modules (mHC, norms, sinks, biases) as HF does; cast the rest
    keep = tuple(model._keep_in_fp32_modules_strict)
    if prec.act == torch.bfloat16 and not norm_returns_input_dtype():
        # transformers < 5.24 keeps RMSNorm weights fp32 but returns `weight * x.to(input dtype)`,
        # i.e. fp32 into the next bf16 Linear: its own bf16 forward fails (docs/divergences.md
        # D8). Its bf16 norm weights (exact: the cases' weights are bf16) make it run as a bf16
        # port would; the run's meta says so.
        norms = {n for n, m in model.named_modules() if type(m).__name__ == "DeepseekV4RMSNorm"}
        keep = tuple(k for k in keep if not any(n.split(".")[-1] == k for n in norms))
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not t.is_floating_point():
            continue
        if "inv_freq" in name:  # RoPE frequencies stay fp32 as in transformers
            continue
        if prec.act == torch.bfloat16 and any(k in name.split(".") for k in keep):
            continue
        t.data = t.data.to(prec.act)
    model.eval()
    return model


# --------------------------------------------------------------------------------------------
# Capture: the same tap language and recorder as every other engine (taps.py, recorder.py)
# --------------------------------------------------------------------------------------------

L = "model.layers.{i}"
# DeepseekV4ForCausalLM(input_ids=..., ...): transformers derives positions from its cache
TOKENS = TokenSource(ids="in[input_ids|0]", pos=None, method=None)


def capture_taps(cfg: ModelConfig) -> list[Tap]:
    """Canonical point -> transformers' DeepseekV4ForCausalLM module (a layer's mHC modules
    return (post, comb, collapsed); the router returns (logits, weights, expert ids); a CSA /
    HCA layer's compressor returns its entries so far, [B, 1, n, d], first)."""
    taps = [Tap("model.embed_tokens", "embed", "out")]
    for hc in ("attn_hc", "ffn_hc"):
        taps += [Tap(f"{L}.{hc}", f"layers.{{i}}.{hc}.in", "in[0]"),
                 Tap(f"{L}.{hc}", f"layers.{{i}}.{hc}.post", "out[0]"),
                 Tap(f"{L}.{hc}", f"layers.{{i}}.{hc}.comb", "out[1]"),
                 Tap(f"{L}.{hc}", f"layers.{{i}}.{hc}.collapsed", "out[2]")]
    return taps + [
        Tap(f"{L}.input_layernorm", "layers.{i}.attn_norm", "out"),
        Tap(f"{L}.post_attention_layernorm", "layers.{i}.ffn_norm", "out"),
        Tap(f"{L}.self_attn.q_a_norm", "layers.{i}.attn.qr", "out"),
        Tap(f"{L}.self_attn", "layers.{i}.attn.out", "out[0]"),
        Tap(f"{L}.self_attn.o_a_proj", "layers.{i}.attn.core", "in[0]"),
        Tap(f"{L}.self_attn.compressor", "layers.{i}.attn.compressed_kv", "out[0]"),  # absent: sliding
        Tap(f"{L}.self_attn.compressor.indexer", "layers.{i}.attn.indexer_topk", "out"),  # CSA only
        Tap(f"{L}.mlp.gate", "layers.{i}.moe.router_logits", "out[0]"),
        Tap(f"{L}.mlp.gate", "layers.{i}.moe.experts", "out[2]"),
        Tap(f"{L}.mlp.gate", "layers.{i}.moe.weights", "out[1]"),
        Tap(f"{L}.mlp", "layers.{i}.moe.out", "out"),
        Tap(L, "layers.{i}.out", "out"),
        Tap("model.hc_head", "head.collapsed", "out"),
        Tap("model.norm", "head.norm", "out"),
        Tap("lm_head", "logits", "out"),
    ]


def _canonical_rows(points: dict, cfg: ModelConfig) -> dict:
    """One forward pass's raw tensors -> canonical rows: module outputs [B, S, ...] flattened to
    [B*S, ...] (the router already works on [B*S, ...]), attn.core split into heads, expert ids
    sorted (their weights in the same order), indexer top-k padded with -1 to index_topk;
    compressed entries stay per sequence, [B, n, d]."""
    out = {}
    for name, t in points.items():
        leaf = name.split(".", 2)[-1]
        if leaf == "attn.core":
            out[name] = t.reshape(-1, cfg.num_heads, cfg.head_dim)
        elif is_entry_point(name):
            out[name] = t[:, 0]
        elif leaf == "attn.indexer_topk":
            idx = _flat(t).long()
            pad = torch.full((idx.shape[0], cfg.index_topk - idx.shape[1]), -1, dtype=torch.long)
            out[name] = torch.cat([idx, pad], 1)
        elif leaf == "moe.experts":
            weights = name[: -len("experts")] + "weights"
            order = torch.sort(t.long(), dim=-1)
            out[name] = order.values
            out[weights] = points[weights].gather(1, order.indices)
        elif leaf == "moe.router_logits":
            out[name] = t
        elif leaf != "moe.weights":  # the weights are placed with their expert ids
            out[name] = _flat(t)
    return out


def _flat(t: torch.Tensor) -> torch.Tensor:
    """[B, S, ...] -> [B*S, ...]"""
    return t.reshape(-1, *t.shape[2:])


def _unpad(rows: dict, cfg: ModelConfig, lens: list[int], s_max: int) -> dict:
    """Drop the padding of a right-padded batch (batch_layout.unpad): token rows (b, s < len_b)
    in order; compressed entries i < len_b // ratio of each sequence."""
    out = {}
    for name, t in rows.items():
        if is_entry_point(name):  # [B, n, d]
            out[name] = unpad(t, rows_per_sequence(cfg, name, lens))
        else:  # [B*S_max, ...]
            out[name] = unpad(t.reshape(len(lens), s_max, *t.shape[1:]), lens)
    return out


@contextlib.contextmanager
def _capturing(model, cfg: ModelConfig, patches=()):
    """Output patches installed, then the recorder attached (so it records patched outputs);
    everything removed on exit. Yields the Recorder (one pass per model call)."""
    from corruptcheck.faults import patched

    recorder = Recorder(capture_taps(cfg), TOKENS, cfg.num_layers)
    with patched() as p:
        for patch in patches or ():
            patch.install(p, model)
        with recorder.attached(model):
            yield recorder


def _concat_rows(parts: list[dict]) -> dict:
    """Row dicts (sequences, or steps of one) concatenated, points in the first one's order."""
    return {n: torch.cat([s[n] for s in parts if n in s], 0) for n in parts[0]}


@dataclass(frozen=True)
class OutputPatch:
    """Modify one module's output during a run (fault injection): `fn(output) -> output`,
    applied to `output[index]` when the module returns a tuple. Installed through the faults'
    `Patcher` (faults.py) on that module instance's `forward`, and put back when the run ends."""
    module: str  # dotted path under the CausalLM, e.g. "model.layers.1.self_attn"
    fn: Callable
    index: int | None = None
    label: str = ""

    def __str__(self):
        return self.label or f"patch {self.module}"

    def apply(self, out):
        if self.index is None:
            return self.fn(out)
        out = list(out)
        out[self.index] = self.fn(out[self.index])
        return tuple(out)

    def install(self, p, model) -> None:
        """Wrap the module's forward through Patcher `p`."""
        def make(forward):
            def patched_forward(*args, **kwargs):
                return self.apply(forward(*args, **kwargs))
            return patched_forward
        p.wrap(model.get_submodule(self.module), "forward", make)


def run_hf(case: Case, precision: str = "float32", attn_impl: str = "eager", model=None, patches=(),
           batch: bool = False) -> dict:
    """Run the case through transformers; returns canonical points flattened over tokens.

    By default sequences run one at a time. `batch=True` runs them as one right-padded batch
    with an attention mask: right padding keeps every real token's computation (pad tokens
    only form compressed entries that no real query may see), while left padding would not
    (pads enter the compressor and shift positions, transformers#45938).
    `patches` (OutputPatch) are installed before the capture hooks, so captures see them."""
    model = model or build_model(case, precision, attn_impl)
    cfg, seqs = case.config, case.sequences()
    with _capturing(model, cfg, patches) as recorder, torch.no_grad():
        if batch:
            ids, mask = pad_right(seqs)
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            shapes = [([len(s) for s in seqs], ids.shape[1])]
        else:
            for ids in seqs:
                model(input_ids=ids[None], use_cache=False)
            shapes = [([len(s)], len(s)) for s in seqs]
    per_seq = [_unpad(_canonical_rows(p["points"], cfg), cfg, lens, s_max)
               for p, (lens, s_max) in zip(recorder.passes, shapes)]
    return _concat_rows(per_seq)


def run_hf_served(case: Case, schedule, precision: str = "float32", attn_impl: str = "eager", model=None,
                  patches=()) -> tuple[dict, dict]:
    """Serve the schedule's prompts through transformers' own cache (`DynamicCache`): each
    prompt prefilled in chunks, then greedy decode steps of one token, one sequence at a time
    (transformers has no continuous batching). Returns (points over every fed token, in
    sequence and position order; {"sequences": the token ids fed, "rows": (phase, index) per
    row}). Compressed entries are recorded as they close (the cache returns all so far)."""
    from corruptcheck.schedule import prompt_case, row_labels

    model = model or build_model(case, precision, attn_impl)
    per_seq, sequences = [], []
    with _capturing(model, case.config, patches) as recorder, torch.no_grad():
        for prompt in prompt_case(case, schedule).sequences():
            first = len(recorder.passes)
            sequences.append(_serve_prompt(model, prompt, schedule))
            per_seq.append(_served_rows(recorder.passes[first:], case.config))
    return _concat_rows(per_seq), {"sequences": sequences,
                                   "rows": row_labels(schedule, [len(s) for s in sequences])}


def _serve_prompt(model, prompt: torch.Tensor, schedule) -> list[int]:
    """One prompt through a fresh DynamicCache: prefill chunks, then greedy decode steps of
    one token. Returns the token ids fed (prompt + decoded)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids = prompt.tolist()

    def step(chunk: torch.Tensor) -> torch.Tensor:
        return model(input_ids=chunk[None], past_key_values=cache, use_cache=True).logits[0, -1]

    at = 0
    for c in schedule.prefill_chunks(len(ids)):
        last = step(prompt[at:at + c])
        at += c
    for _ in range(schedule.decode_steps):
        ids.append(int(last.argmax()))
        last = step(torch.tensor([ids[-1]]))
    return ids


def _served_rows(passes: list[dict], cfg: ModelConfig) -> dict:
    """One sequence's steps (one pass each) -> its rows: token rows of every step in order;
    compressed entries as they close (each step's cache returns all so far, [1, n, d])."""
    seen: dict = {}
    steps = []
    for p in passes:
        rows = {}
        for name, t in _canonical_rows(p["points"], cfg).items():
            if is_entry_point(name):
                rows[name] = t[0, seen.get(name, 0):]
                seen[name] = t.shape[1]
            else:
                rows[name] = t
        steps.append(rows)
    return _concat_rows(steps)

"""Fake DeepSeek V4 module trees with the real engines' module names, attribute paths and call
structure (docs/engine-capture.md §1, §2, §3; the engines' model files cited in
corruptcheck/engines/*_engine.py), to test the capture mapping without a GPU.

The fakes do not compute the model: each op returns the reference's own value for the point it
produces (an `Oracle` reads the float64 reference points in the engine's row order) in the
engine's layout ([T, hc, 1] post mixes, [T, hc*H] flattened streams, int32 indices in a shared
buffer, unsorted top-k, per-rank head shards, per-rank partial sums). Where an engine op consumes
another op's output, the fake checks it was fed the right reference value, so the fakes' data
flow is the engine's data flow (vLLM's fused post+pre op gets the previous layer's MoE output and
streams, TRT-LLM's deferred HCState carries them to the next layer, ...).
"""
from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass

import torch
from torch import nn


# --------------------------------------------------------------------------------------------
# Oracle and batch plans
# --------------------------------------------------------------------------------------------

class Oracle:
    """Reference points read in the current pass's row order (rows of -1: no reference row,
    e.g. a decode token; read as zeros)."""

    def __init__(self, cfg, ref: dict, strict: bool = True):
        self.cfg, self.ref, self.strict = cfg, ref, strict
        self.rows = torch.empty(0, dtype=torch.long)

    def get(self, name: str) -> torch.Tensor:
        src = self.ref[name]
        out = torch.zeros(len(self.rows), *src.shape[1:], dtype=src.dtype)
        ok = self.rows >= 0
        out[ok] = src[self.rows[ok]]
        return out

    def expect(self, value, name: str) -> None:
        """The fake op was fed the reference's value of `name` (engine layout allowed)."""
        if not self.strict:
            return
        ref = self.get(name)
        ok = self.rows >= 0
        got = value.reshape(ref.shape) if value.numel() == ref.numel() else value
        if got.shape != ref.shape or not torch.equal(got[ok], ref[ok]):
            raise AssertionError(f"fake engine op was fed something other than {name}")


@dataclass
class PassPlan:
    ids: torch.Tensor
    pos: torch.Tensor
    rows: torch.Tensor  # canonical row per engine row, -1 = none
    last: torch.Tensor  # engine rows whose logits the engine samples


def plan_pass(case, chunks) -> PassPlan:
    """chunks: (seq, start, end) slices of the case's sequences, in engine order, or
    ("decode", seq): one generated token after that sequence (matches no case token)."""
    seqs = case.sequences()
    offsets = [0]
    for s in seqs:
        offsets.append(offsets[-1] + len(s))
    ids, pos, rows, last = [], [], [], []
    n = 0
    for c in chunks:
        if c[0] == "decode":
            s = seqs[c[1]]
            ids.append(torch.tensor([(int(s[-1]) + 1) % case.config.vocab_size]))
            pos.append(torch.tensor([len(s)]))
            rows.append(torch.tensor([-1]))
            n += 1
            last.append(n - 1)
            continue
        s, a, b = c
        ids.append(seqs[s][a:b])
        pos.append(torch.arange(a, b))
        rows.append(offsets[s] + torch.arange(a, b))
        n += b - a
        if b == len(seqs[s]):
            last.append(n - 1)
    return PassPlan(torch.cat(ids), torch.cat(pos), torch.cat(rows), torch.tensor(last, dtype=torch.long))


def split_partial(t: torch.Tensor, bits: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """t = high + low exactly (high keeps `bits` fractional bits): two ranks' partial sums."""
    high = torch.floor(t * 2.0 ** bits) / 2.0 ** bits
    return high, t - high


class _Op(nn.Module):
    def __init__(self, oracle: Oracle, layer: int | None = None):
        super().__init__()
        self.oracle, self.layer = oracle, layer

    def p(self, leaf: str) -> str:
        return f"layers.{self.layer}.{leaf}"


class _Holder(nn.Module):
    """A weight holder the engine never calls as a module (vLLM q_norm, wo_a, ...)."""

    def __init__(self, *shape):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(*shape), requires_grad=False)

    def forward(self, *_a, **_k):  # pragma: no cover - must never run
        raise AssertionError("weight holder called as a module")


class _Returns(_Op):
    """Returns the reference value of one point (optionally checking its input first)."""

    def __init__(self, oracle, name, expects=None, tuple_out=False):
        super().__init__(oracle)
        self.name, self.expects, self.tuple_out = name, expects, tuple_out

    def forward(self, x, *_a, **_k):
        if self.expects:
            self.oracle.expect(x, self.expects)
        out = self.oracle.get(self.name)
        return (out, None) if self.tuple_out else out


def _unsorted_topk(oracle: Oracle, layer: int):
    """The reference's (sorted) expert ids and weights, reversed per token as engines keep
    them in selection order."""
    ids = oracle.get(f"layers.{layer}.moe.experts").flip(-1)
    w = oracle.get(f"layers.{layer}.moe.weights").flip(-1)
    return ids, w


# --------------------------------------------------------------------------------------------
# vLLM (vllm/model_executor/models/deepseek_v4.py, CUDA path `_forward_cuda`)
# --------------------------------------------------------------------------------------------

class VLLMMHCPre(_Op):
    """MHCPreOp(residual, fn, hc_scale, hc_base, ...) -> (post_mix, comb_mix, layer_input)."""

    def forward(self, residual, fn, hc_scale, hc_base, rms_eps, hc_pre_eps, hc_sinkhorn_eps,
                hc_post_mult_value, sinkhorn_repeat, n_splits=1, norm_weight=None, norm_eps=0.0):
        o = self.oracle
        o.expect(residual, self.p("attn_hc.in"))
        post = o.get(self.p("attn_hc.post"))[..., None]
        return post, o.get(self.p("attn_hc.comb")), o.get(self.p("attn_hc.collapsed"))


class VLLMMHCFusedPostPre(_Op):
    """MHCFusedPostPreOp(x, residual, post_mix, res_mix, fn, ...) -> (residual_cur,
    post_mix_cur, comb_mix_cur, layer_input_cur): the post of the block that produced x, then
    the pre of the block `fn` belongs to (fn marks (layer, 0=attention | 1=FFN) here)."""

    def forward(self, x, residual, post_layer_mix, comb_res_mix, fn, hc_scale, hc_base, rms_eps,
                hc_pre_eps, hc_sinkhorn_eps, hc_post_mult_value, sinkhorn_repeat, n_splits=1, tile_n=1,
                norm_weight=None, norm_eps=0.0):
        o = self.oracle
        layer, block = int(fn[0]), int(fn[1])
        if block == 0:  # previous layer's FFN post + this layer's attention pre
            prev = f"layers.{layer - 1}."
            o.expect(x, prev + "moe.out")
            o.expect(residual, prev + "ffn_hc.in")
            o.expect(post_layer_mix, prev + "ffn_hc.post")
            o.expect(comb_res_mix, prev + "ffn_hc.comb")
            names = ("attn_hc.in", "attn_hc.post", "attn_hc.comb", "attn_hc.collapsed")
        else:  # this layer's attention post + FFN pre
            o.expect(x, self.p("attn.out"))
            o.expect(residual, self.p("attn_hc.in"))
            o.expect(post_layer_mix, self.p("attn_hc.post"))
            names = ("ffn_hc.in", "ffn_hc.post", "ffn_hc.comb", "ffn_hc.collapsed")
        out = [o.get(f"layers.{layer}.{n}") for n in names]
        out[1] = out[1][..., None]
        return tuple(out)


class VLLMMHCPost(_Op):
    def forward(self, x, residual, post_layer_mix, comb_res_mix):
        o = self.oracle
        o.expect(x, self.p("moe.out"))
        o.expect(residual, self.p("ffn_hc.in"))
        return o.get(self.p("out"))


class VLLMHCHead(_Op):
    def forward(self, hidden_states, hc_fn, hc_scale, hc_base, rms_norm_eps, hc_eps):
        self.oracle.expect(hidden_states, f"layers.{self.oracle.cfg.num_layers - 1}.out")
        return self.oracle.get("head.collapsed")


class VLLMIndexer(_Op):
    """DeepseekV4Indexer: writes this layer's top-k into the buffer every CSA layer shares."""

    def __init__(self, oracle, layer, buffer):
        super().__init__(oracle, layer)
        self.buffer = buffer
        self.weights_proj, self.k_norm, self.wq_b = _Holder(1), _Holder(1), _Holder(1)

    def forward(self, hidden_states, qr, kv_score, weights, positions, rotary_emb):
        t = hidden_states.shape[0]
        self.buffer[:t] = self.oracle.get(self.p("attn.indexer_topk")).to(torch.int32)
        return None


class VLLMMLAWrapper(_Op):
    """DeepseekV4MultiHeadLatentAttentionWrapper: the custom attention op (indexer inside)
    then the FP8 wo_a einsum and wo_b."""

    def __init__(self, oracle, layer, indexer):
        super().__init__(oracle, layer)
        self.indexer = indexer  # alias of attn.indexer, as in vLLM
        self.q_head_norm = _Holder(1)

    def forward(self, positions, hidden_states, llama_4_scaling=None):
        self.oracle.expect(hidden_states, self.p("attn_norm"))
        if self.indexer is not None:
            self.indexer(hidden_states, None, None, None, positions, None)
        return self.oracle.get(self.p("attn.out"))


class VLLMAttention(_Op):
    def __init__(self, oracle, layer, csa: bool, buffer):
        super().__init__(oracle, layer)
        self.fused_wqa_wkv, self.q_norm, self.kv_norm = _Holder(1), _Holder(1), _Holder(1)
        self.wq_b, self.wo_a, self.wo_b = _Holder(1), _Holder(1), _Holder(1)
        self.indexer = VLLMIndexer(oracle, layer, buffer) if csa else None
        self.mla_attn = VLLMMLAWrapper(oracle, layer, self.indexer)

    def forward(self, positions, hidden_states, llama_4_scaling):
        return self.mla_attn(positions, hidden_states, llama_4_scaling)


class VLLMNormGate(_Op):
    """NormGateLinear (version A): fused ffn RMSNorm + router gate -> (normed_x, logits)."""

    def forward(self, hidden_states):
        self.oracle.expect(hidden_states, self.p("ffn_hc.collapsed"))
        return self.oracle.get(self.p("ffn_norm")), self.oracle.get(self.p("moe.router_logits"))


class VLLMFusedMoE(_Op):
    """FusedMoE with the shared expert inside: routes internally (version A / B), or the
    MegaMoE experts fed (x, topk_weights, topk_ids)."""

    def forward(self, hidden_states=None, router_logits=None, input_ids=None, *args, **kwargs):
        self.oracle.expect(hidden_states, self.p("ffn_norm"))
        return self.oracle.get(self.p("moe.out"))


class VLLMMegaMoEExperts(_Op):
    def forward(self, hidden_states, topk_weights, topk_ids, *, activation_clamp=None, fast_math=True):
        self.oracle.expect(hidden_states, self.p("ffn_norm"))
        return self.oracle.get(self.p("moe.out")) - self.oracle.get(self.p("moe.out"))  # shared added after


class VLLMMoE(_Op):
    def __init__(self, oracle, layer, variant: str):
        super().__init__(oracle, layer)
        self.variant = variant
        if variant in ("A", "mega"):
            self.norm_gate = VLLMNormGate(oracle, layer)
        else:  # B
            self.gate = _Returns(oracle, self.p("moe.router_logits"), expects=self.p("ffn_norm"), tuple_out=True)
        self.shared_experts = _Holder(1)
        self.experts = VLLMMegaMoEExperts(oracle, layer) if variant == "mega" else VLLMFusedMoE(oracle, layer)

    def forward(self, hidden_states, input_ids=None):
        o = self.oracle
        if self.variant == "A":
            normed, logits = self.norm_gate(hidden_states)
            return self.experts(hidden_states=normed, router_logits=logits, input_ids=input_ids)
        if self.variant == "B":
            logits, _ = self.gate(hidden_states)
            return self.experts(hidden_states=hidden_states, router_logits=logits, input_ids=input_ids)
        normed, logits = self.norm_gate(hidden_states)
        ids, w = _unsorted_topk(o, self.layer)
        out = self.experts(normed, w, ids.to(torch.int64), activation_clamp=10.0)
        return out + o.get(self.p("moe.out"))  # + shared expert output


class VLLMDecoderLayer(_Op):
    def __init__(self, oracle, layer, cfg, variant, buffer):
        super().__init__(oracle, layer)
        self.variant = variant
        self.attn = VLLMAttention(oracle, layer, cfg.layer_type(layer) == "csa", buffer)
        self.ffn = VLLMMoE(oracle, layer, variant)
        self.attn_norm = _Returns(oracle, self.p("attn_norm"), expects=self.p("attn_hc.collapsed"))
        if variant == "B":
            self.ffn_norm = _Returns(oracle, self.p("ffn_norm"), expects=self.p("ffn_hc.collapsed"))
        self.hc_attn_fn = nn.Parameter(torch.tensor([float(layer), 0.0]), requires_grad=False)
        self.hc_ffn_fn = nn.Parameter(torch.tensor([float(layer), 1.0]), requires_grad=False)
        self.hc_attn_scale = self.hc_attn_base = self.hc_ffn_scale = self.hc_ffn_base = None
        self.mhc_pre = VLLMMHCPre(oracle, layer)
        self.mhc_post = VLLMMHCPost(oracle, layer)
        self.mhc_fused_post_pre = VLLMMHCFusedPostPre(oracle, layer)

    def hc_pre(self, x, hc_fn, hc_scale, hc_base):
        post_mix, res_mix, layer_input = self.mhc_pre(
            residual=x, fn=hc_fn, hc_scale=hc_scale, hc_base=hc_base, rms_eps=1e-6, hc_pre_eps=1e-6,
            hc_sinkhorn_eps=1e-6, hc_post_mult_value=2.0, sinkhorn_repeat=20)
        return layer_input, post_mix, res_mix

    def hc_post(self, x, residual, post, comb):
        return self.mhc_post(x, residual, post, comb)

    def forward(self, x, positions, input_ids, post_mix=None, res_mix=None, residual=None):
        if residual is None:
            residual = x
            x, post_mix, res_mix = self.hc_pre(x, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base)
        else:
            residual, post_mix, res_mix, x = self.mhc_fused_post_pre(
                x, residual, post_mix, res_mix, self.hc_attn_fn, None, None, 1e-6, 1e-6, 1e-6, 2.0, 20)
        x = self.attn_norm(x)
        x = self.attn(positions, x, None)
        residual, post_mix, res_mix, x = self.mhc_fused_post_pre(
            x, residual, post_mix, res_mix, self.hc_ffn_fn, None, None, 1e-6, 1e-6, 1e-6, 2.0, 20)
        if self.variant == "B":
            x = self.ffn_norm(x)
        x = self.ffn(x, input_ids)
        return x, residual, post_mix, res_mix


class VLLMModel(_Op):
    """DeepseekV4Model; @support_torch_compile replaces __call__ so module hooks on the model
    itself never fire (docs/engine-capture.md §1.3): reproduced here."""

    def __init__(self, oracle, cfg, variant, max_tokens=512):
        super().__init__(oracle)
        self.topk_indices_buffer = torch.full((max_tokens, cfg.index_topk), 999, dtype=torch.int32)
        self.embed_tokens = _Returns(oracle, "embed")
        self.layers = nn.ModuleList(VLLMDecoderLayer(oracle, i, cfg, variant, self.topk_indices_buffer)
                                    for i in range(cfg.num_layers))
        self.norm = _Returns(oracle, "head.norm", expects="head.collapsed")
        self.hc_head_op = VLLMHCHead(oracle)
        self.hc_mult = cfg.hc_mult
        self._mtp_hidden_buffer = torch.zeros(max_tokens, cfg.hc_mult * cfg.hidden_size, dtype=torch.float64)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        hidden_states = self.embed_tokens(input_ids).unsqueeze(-2).repeat(1, self.hc_mult, 1)
        residual = post_mix = res_mix = None
        layer = None
        for layer in self.layers:
            hidden_states, residual, post_mix, res_mix = layer(hidden_states, positions, input_ids, post_mix,
                                                               res_mix, residual)
        hidden_states = layer.hc_post(hidden_states, residual, post_mix, res_mix)
        self._mtp_hidden_buffer[: hidden_states.shape[0]].copy_(hidden_states.flatten(1))
        hidden_states = self.hc_head_op(hidden_states, None, None, None, 1e-6, 1e-6)
        return self.norm(hidden_states)


class VLLMLogitsProcessor(_Op):
    def forward(self, lm_head, hidden_states):
        return self.oracle.get("logits")[self.sampled]


class VLLMForCausalLM(_Op):
    def __init__(self, oracle, cfg, variant="A"):
        super().__init__(oracle)
        self.model = VLLMModel(oracle, cfg, variant)
        self.lm_head = _Holder(1)
        self.logits_processor = VLLMLogitsProcessor(oracle)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states):
        return self.logits_processor(self.lm_head, hidden_states)


def run_vllm(root: VLLMForCausalLM, plans: list[PassPlan]) -> None:
    """vLLM's GPU model runner: model(input_ids=, positions=, ...), then compute_logits on the
    sampled rows."""
    for plan in plans:
        root.oracle.rows = plan.rows
        hidden = root(input_ids=plan.ids, positions=plan.pos, intermediate_tensors=None, inputs_embeds=None)
        root.logits_processor.sampled = plan.last
        root.compute_logits(hidden[plan.last])


# --------------------------------------------------------------------------------------------
# SGLang (python/sglang/srt/models/deepseek_v4.py)
# --------------------------------------------------------------------------------------------

TopKOutput = namedtuple("StandardTopKOutput", ["topk_weights", "topk_ids", "router_logits"])
LogitsProcessorOutput = namedtuple("LogitsProcessorOutput", ["next_token_logits"])


class SGLangMQALayer(_Op):
    def __init__(self, oracle, layer, csa: bool, tp_rank=0, tp_size=1):
        super().__init__(oracle, layer)
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.wq_a = _Returns(oracle, self.p("attn.qr"), tuple_out=True)  # stands in for wq_a's output
        self.q_norm = _Returns(oracle, self.p("attn.qr"))
        self.wkv, self.kv_norm, self.wo_a, self.attn_mqa = _Holder(1), _Holder(1), _Holder(1), _Holder(1)
        self.wq_b = _Holder(1)
        self.wo_b = _Holder(1)
        self.compressor = _Holder(1) if oracle.cfg.layer_type(layer) != "sliding" else None
        self.indexer = _Returns(oracle, self.p("attn.qr")) if csa else None

    def _compute_q_b(self, q, positions, q_out=None):
        self.oracle.expect(q, self.p("attn.qr"))
        heads = self.oracle.cfg.num_heads // self.tp_size
        return self.oracle.get(self.p("attn.q"))[:, self.tp_rank * heads:(self.tp_rank + 1) * heads]

    def forward(self, x, positions, forward_batch, x_quant=None):
        self.oracle.expect(x, self.p("attn_norm"))
        q_lora, _ = self.wq_a(x)
        q_lora = self.q_norm(q_lora)
        self._compute_q_b(q_lora, positions, None)
        if self.indexer is not None:
            self.indexer(q_lora)  # C4Indexer returns nothing useful (paged indices in metadata)
        return self.oracle.get(self.p("attn.out"))


class SGLangTopK(_Op):
    def forward(self, hidden_states, router_logits, *, input_ids=None, **_k):
        self.oracle.expect(router_logits, self.p("moe.router_logits"))
        ids, w = _unsorted_topk(self.oracle, self.layer)
        return TopKOutput(w / self.oracle.cfg.route_scale, ids.to(torch.int32), router_logits)


class SGLangMoE(_Op):
    """deepseek_v2.DeepseekV2MoE(is_deepseek_v4=True): gate -> topk -> experts + shared."""

    def __init__(self, oracle, layer):
        super().__init__(oracle, layer)
        self.gate = _Returns(oracle, self.p("moe.router_logits"), expects=self.p("ffn_norm"))
        self.topk = SGLangTopK(oracle, layer)
        self.experts, self.shared_experts = _Holder(1), _Holder(1)

    def forward(self, hidden_states, forward_batch=None, input_ids=None, input_ids_global=None):
        logits = self.gate(hidden_states)
        self.topk(hidden_states, logits, input_ids=input_ids)
        return self.oracle.get(self.p("moe.out"))


class SGLangDecoderLayer(_Op):
    def __init__(self, oracle, layer, cfg, norm_fused: bool, tp_rank=0, tp_size=1):
        super().__init__(oracle, layer)
        self.norm_fused = norm_fused
        self.self_attn = SGLangMQALayer(oracle, layer, cfg.layer_type(layer) == "csa", tp_rank, tp_size)
        self.mlp = SGLangMoE(oracle, layer)
        self.input_layernorm = _Returns(oracle, self.p("attn_norm"), expects=self.p("attn_hc.collapsed"))
        self.post_attention_layernorm = _Returns(oracle, self.p("ffn_norm"), expects=self.p("ffn_hc.collapsed"))
        self.hc_attn_fn = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.hc_ffn_fn = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.hc_attn_scale = self.hc_attn_base = self.hc_ffn_scale = self.hc_ffn_base = None
        self._attn_post = None

    def hc_pre(self, x, hc_fn, hc_scale, hc_base, norm=None):
        o = self.oracle
        block = "attn_hc" if hc_fn is self.hc_attn_fn else "ffn_hc"
        o.expect(x, self.p(f"{block}.in"))
        fused = self.norm_fused and norm is not None
        normed = {"attn_hc": "attn_norm", "ffn_hc": "ffn_norm"}[block]
        y = o.get(self.p(normed if fused else f"{block}.collapsed"))
        post = o.get(self.p(f"{block}.post"))
        if block == "attn_hc":
            self._attn_post = post
        return y, post, o.get(self.p(f"{block}.comb")), fused

    def hc_post(self, x, residual, post, comb):
        o = self.oracle
        if post is self._attn_post:  # call 0: the attention block's post
            o.expect(x, self.p("attn.out"))
            o.expect(residual, self.p("attn_hc.in"))
            return o.get(self.p("ffn_hc.in"))
        o.expect(x, self.p("moe.out"))
        o.expect(residual, self.p("ffn_hc.in"))
        return o.get(self.p("out"))

    def forward(self, positions, hidden_states, input_ids, forward_batch, input_ids_global):
        residual = hidden_states
        hidden_states, post, comb, norm_fused = self.hc_pre(hidden_states, self.hc_attn_fn, self.hc_attn_scale,
                                                            self.hc_attn_base, norm=self.input_layernorm)
        if not norm_fused:
            hidden_states = self.input_layernorm(hidden_states)
        hidden_states = self.self_attn(x=hidden_states, positions=positions, forward_batch=forward_batch, x_quant=None)
        hidden_states = self.hc_post(hidden_states, residual, post, comb)
        residual = hidden_states
        hidden_states, post, comb, norm_fused = self.hc_pre(hidden_states, self.hc_ffn_fn, self.hc_ffn_scale,
                                                            self.hc_ffn_base, norm=self.post_attention_layernorm)
        if not norm_fused:
            hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states, forward_batch, input_ids=input_ids, input_ids_global=input_ids_global)
        return self.hc_post(hidden_states, residual, post, comb)


class SGLangModel(_Op):
    def __init__(self, oracle, cfg, norm_fused, tp_rank=0, tp_size=1):
        super().__init__(oracle)
        self.embed_tokens = _Returns(oracle, "embed")
        self.layers = nn.ModuleList(SGLangDecoderLayer(oracle, i, cfg, norm_fused, tp_rank, tp_size)
                                    for i in range(cfg.num_layers))
        self.norm = _Returns(oracle, "head.norm", expects="head.collapsed")
        self.hc_mult = cfg.hc_mult
        self.hc_head_fn = nn.Parameter(torch.zeros(1), requires_grad=False)

    def hc_head(self, x, hc_fn, hc_scale, hc_base):
        self.oracle.expect(x, f"layers.{self.oracle.cfg.num_layers - 1}.out")
        return self.oracle.get("head.collapsed")

    def forward(self, input_ids, positions, forward_batch, input_embeds=None, pp_proxy_tensors=None):
        hidden_states = self.embed_tokens(input_ids).unsqueeze(1).repeat(1, self.hc_mult, 1)
        for layer in self.layers:
            hidden_states = layer(positions=positions, hidden_states=hidden_states, forward_batch=forward_batch,
                                  input_ids=input_ids, input_ids_global=input_ids)
        pre_hc_head = hidden_states.flatten(1)
        hidden_states = self.hc_head(hidden_states, self.hc_head_fn, None, None)
        return self.norm(hidden_states), pre_hc_head


class SGLangLogitsProcessor(_Op):
    def forward(self, input_ids, hidden_states, lm_head, forward_batch, aux_hidden_states=None,
                hidden_states_before_norm=None):
        return LogitsProcessorOutput(self.oracle.get("logits")[forward_batch["last"]])


class SGLangForCausalLM(_Op):
    def __init__(self, oracle, cfg, norm_fused=False, tp_rank=0, tp_size=1):
        super().__init__(oracle)
        self.model = SGLangModel(oracle, cfg, norm_fused, tp_rank, tp_size)
        self.lm_head = _Holder(1)
        self.logits_processor = SGLangLogitsProcessor(oracle)

    def forward(self, input_ids, positions, forward_batch, input_embeds=None, pp_proxy_tensors=None):
        hidden_states, pre_hc_head = self.model.forward(input_ids, positions, forward_batch, input_embeds,
                                                        pp_proxy_tensors)
        return self.logits_processor(input_ids, hidden_states, self.lm_head, forward_batch, None,
                                     hidden_states_before_norm=pre_hc_head)


def run_sglang(root: SGLangForCausalLM, plans: list[PassPlan]) -> None:
    """ModelRunner.forward_extend: model.forward(input_ids, positions, forward_batch) — called
    directly, not through nn.Module.__call__."""
    for plan in plans:
        root.oracle.rows = plan.rows
        root.forward(plan.ids, plan.pos, {"last": plan.last})


# --------------------------------------------------------------------------------------------
# TensorRT-LLM (tensorrt_llm/_torch/models/modeling_deepseekv4.py, modules/mhc)
# --------------------------------------------------------------------------------------------

class HCState:
    """tensorrt_llm/_torch/modules/mhc/hyper_connection.py: resolved or deferred."""

    def __init__(self, residual, post_mix=None, comb_mix=None, x_prev=None, deferred=False):
        self.residual, self.post_mix, self.comb_mix, self.x_prev = residual, post_mix, comb_mix, x_prev
        self.is_deferred = deferred

    @classmethod
    def resolved(cls, residual):
        return cls(residual)

    @classmethod
    def deferred(cls, residual, post_mix, comb_mix, x_prev):
        return cls(residual, post_mix, comb_mix, x_prev, deferred=True)


class TRTmHC(_Op):
    """mHC: parameters only, no forward; pre_mapping / fused_hc / post_mapping methods."""

    def __init__(self, oracle, layer, block):
        super().__init__(oracle, layer)
        self.block = block  # "attn" | "ffn"
        self.fn = nn.Parameter(torch.zeros(1), requires_grad=False)

    def _pre(self):
        b = f"{self.block}_hc"
        o = self.oracle
        return o.get(self.p(f"{b}.post"))[..., None], o.get(self.p(f"{b}.comb"))

    def pre_mapping(self, residual):
        o = self.oracle
        b = f"{self.block}_hc"
        o.expect(residual, self.p(f"{b}.in"))
        post, comb = self._pre()
        return post, comb, o.get(self.p(f"{b}.collapsed"))

    def fused_hc(self, x_prev, residual_prev, post_mix_prev, comb_mix_prev, norm_weight=None, norm_eps=None):
        o = self.oracle
        if self.block == "attn":  # previous layer's deferred FFN post + this attention pre (+ norm)
            prev = f"layers.{self.layer - 1}."
            o.expect(x_prev, prev + "moe.out")
            o.expect(residual_prev, prev + "ffn_hc.in")
            o.expect(post_mix_prev, prev + "ffn_hc.post")
            post, comb = self._pre()
            return o.get(self.p("attn_hc.in")), post, comb, o.get(self.p("attn_norm"))
        o.expect(x_prev, self.p("attn.out"))
        o.expect(residual_prev, self.p("attn_hc.in"))
        post, comb = self._pre()
        return o.get(self.p("ffn_hc.in")), post, comb, o.get(self.p("ffn_hc.collapsed"))

    def post_mapping(self, x, residual, post_layer_mix, comb_res_mix):
        o = self.oracle
        if self.block == "attn":
            o.expect(x, self.p("attn.out"))
            o.expect(residual, self.p("attn_hc.in"))
            return o.get(self.p("ffn_hc.in"))
        o.expect(x, self.p("moe.out"))
        o.expect(residual, self.p("ffn_hc.in"))
        return o.get(self.p("out"))


class TRTMQA(_Op):
    def __init__(self, oracle, layer, csa):
        super().__init__(oracle, layer)
        self.indexer = _Returns(oracle, self.p("attn.indexer_topk")) if csa else None
        self.compressor = _Holder(1) if oracle.cfg.layer_type(layer) != "sliding" else None
        self.attn_sink = nn.Parameter(torch.zeros(1), requires_grad=False)


class TRTAttention(_Op):
    """DeepseekV4Attention(MLA); `indexer` / `compressor` alias the sparse op's modules."""

    def __init__(self, oracle, layer, csa, partial_rank=None):
        super().__init__(oracle, layer)
        self.partial_rank = partial_rank  # PRE_MOE_FUSION at TP > 1: this rank's partial sum
        self.kv_a_proj_with_mqa, self.q_b_proj, self.o_b_proj = _Holder(1), _Holder(1), _Holder(1)
        self.q_a_layernorm, self.kv_a_layernorm = _Holder(1), _Holder(1)
        self.mqa = TRTMQA(oracle, layer, csa)
        self.indexer = getattr(self.mqa, "indexer", None)
        self.compressor = getattr(self.mqa, "compressor", None)

    def forward(self, position_ids, hidden_states, attn_metadata, all_reduce_params=None, **_kw):
        self.oracle.expect(hidden_states, self.p("attn_norm"))
        if self.mqa.indexer is not None:
            self.mqa.indexer(hidden_states)
        out = self.oracle.get(self.p("attn.out"))
        return out if self.partial_rank is None else split_partial(out)[self.partial_rank]


class TRTRoutingMethod:
    """DeepSeekV4MoeRoutingMethod (not a module): apply(logits, input_ids) -> (ids, weights)."""

    def __init__(self, oracle, layer):
        self.oracle, self.layer = oracle, layer

    def apply(self, router_logits, input_ids=None):
        self.oracle.expect(router_logits, f"layers.{self.layer}.moe.router_logits")
        ids, w = _unsorted_topk(self.oracle, self.layer)
        return ids.to(torch.int32), w


class TRTGate(_Returns):
    def __init__(self, oracle, layer):
        super().__init__(oracle, f"layers.{layer}.moe.router_logits", expects=f"layers.{layer}.ffn_norm")
        self._routing_method = TRTRoutingMethod(oracle, layer)

    @property
    def routing_method(self):
        return self._routing_method


class TRTExperts(_Op):
    def __init__(self, oracle, layer, routing_method):
        super().__init__(oracle, layer)
        self.routing_method = routing_method

    def forward(self, x, router_logits, input_ids=None, **_kw):
        self.routing_method.apply(router_logits, input_ids)
        return self.oracle.get(self.p("moe.out")) * 0.0  # routed part; shared added by the MoE


class TRTMoE(_Op):
    def __init__(self, oracle, layer):
        super().__init__(oracle, layer)
        self.gate = TRTGate(oracle, layer)
        self.experts = TRTExperts(oracle, layer, self.gate.routing_method)
        self.shared_experts = _Holder(1)

    def forward(self, hidden_states, hidden_states_fp4=None, input_ids=None, all_rank_num_tokens=None,
                final_all_reduce_params=None, do_finalize=True):
        logits = self.gate(hidden_states)
        routed = self.experts(hidden_states, logits, input_ids=input_ids)
        return routed + self.oracle.get(self.p("moe.out"))


class TRTDecoderLayer(_Op):
    def __init__(self, oracle, layer, cfg, fused_hc, pre_moe_fusion_rank=None):
        super().__init__(oracle, layer)
        self.enable_fused_hc = fused_hc
        self.pre_moe_fusion = pre_moe_fusion_rank is not None
        self.is_first_layer = layer == 0
        self.defer_post_mapping = fused_hc and layer < cfg.num_layers - 1  # post_load_weights
        self.hc_attn, self.hc_ffn = TRTmHC(oracle, layer, "attn"), TRTmHC(oracle, layer, "ffn")
        self.self_attn = TRTAttention(oracle, layer, cfg.layer_type(layer) == "csa", pre_moe_fusion_rank)
        self.mlp = TRTMoE(oracle, layer)
        self.input_layernorm = _Returns(oracle, self.p("attn_norm"), expects=self.p("attn_hc.collapsed"))
        self.norm_weight = nn.Parameter(torch.ones(1), requires_grad=False)  # input_layernorm.weight
        self.post_attention_layernorm = _Returns(oracle, self.p("ffn_norm"), expects=self.p("ffn_hc.collapsed"))
        # AllReduce(fusion_op=RMS_NORM): the reduced, normed FFN input under PRE_MOE_FUSION
        self.allreduce = _Returns(oracle, self.p("ffn_norm")) if self.pre_moe_fusion else None

    def _entry_boundary(self, hc_state):
        if not self.is_first_layer and hc_state.is_deferred:
            return self.hc_attn.fused_hc(x_prev=hc_state.x_prev, residual_prev=hc_state.residual,
                                         post_mix_prev=hc_state.post_mix, comb_mix_prev=hc_state.comb_mix,
                                         norm_weight=self.norm_weight, norm_eps=1e-6)
        residual = hc_state if self.is_first_layer else hc_state.residual
        post_mix, comb_mix, layer_input = self.hc_attn.pre_mapping(residual)
        return residual, post_mix, comb_mix, self.input_layernorm(layer_input)

    def forward(self, position_ids, hc_state, attn_metadata, spec_metadata=None, input_ids=None,
                engram_embeddings=None, **kwargs):
        residual, post_mix, comb_mix, layer_input = self._entry_boundary(hc_state)
        x_attn = self.self_attn(position_ids=position_ids, hidden_states=layer_input, attn_metadata=attn_metadata,
                                all_reduce_params=None)
        if self.pre_moe_fusion:  # the fake's downstream ops read the reduced reference value
            x_attn = self.oracle.get(self.p("attn.out"))
        if self.enable_fused_hc:
            residual, post_mix, comb_mix, layer_input = self.hc_ffn.fused_hc(
                x_prev=x_attn, residual_prev=residual, post_mix_prev=post_mix, comb_mix_prev=comb_mix)
        else:
            residual = self.hc_attn.post_mapping(x=x_attn, residual=residual, post_layer_mix=post_mix,
                                                 comb_res_mix=comb_mix)
            post_mix, comb_mix, layer_input = self.hc_ffn.pre_mapping(residual)
        if self.pre_moe_fusion:
            hidden = self.allreduce(layer_input)
        else:
            hidden = self.post_attention_layernorm(layer_input)
        x_ffn = self.mlp(hidden, None, input_ids=input_ids, all_rank_num_tokens=None, do_finalize=True)
        if self.defer_post_mapping:
            return HCState.deferred(residual=residual, post_mix=post_mix, comb_mix=comb_mix, x_prev=x_ffn)
        return HCState.resolved(self.hc_ffn.post_mapping(x=x_ffn, residual=residual, post_layer_mix=post_mix,
                                                         comb_res_mix=comb_mix))


class TRTHCHead(_Op):
    def forward(self, hidden_states):
        self.oracle.expect(hidden_states, f"layers.{self.oracle.cfg.num_layers - 1}.out")
        return self.oracle.get("head.collapsed")


class TRTModel(_Op):
    def __init__(self, oracle, cfg, fused_hc, pre_moe_fusion_rank=None, mtp_layers=1):
        super().__init__(oracle)
        self.num_hidden_layers, self.hc_mult = cfg.num_layers, cfg.hc_mult
        self.embed_tokens = _Returns(oracle, "embed")
        self.hc_head = TRTHCHead(oracle)
        self.layers = nn.ModuleList(TRTDecoderLayer(oracle, i, cfg, fused_hc, pre_moe_fusion_rank)
                                    for i in range(cfg.num_layers))
        # one-model MTP appends its layers after the main ones (never run by the main forward)
        self.layers.extend(_Holder(1) for _ in range(mtp_layers))
        self.norm = _Returns(oracle, "head.norm", expects="head.collapsed")

    def forward(self, attn_metadata, input_ids=None, position_ids=None, inputs_embeds=None, spec_metadata=None,
                **kwargs):
        hidden_states = self.embed_tokens(input_ids).unsqueeze(1).repeat(1, self.hc_mult, 1)
        hc_state = hidden_states
        for decoder_layer in self.layers[: self.num_hidden_layers]:
            hc_state = decoder_layer(position_ids=position_ids, hc_state=hc_state, attn_metadata=attn_metadata,
                                     spec_metadata=spec_metadata, input_ids=input_ids, engram_embeddings=None)
        return hc_state.residual.flatten(1)


class TRTLMHead(_Op):
    def forward(self, hidden_states):
        self.oracle.expect(hidden_states, "head.norm")
        return self.oracle.get("logits")


class TRTLogitsProcessor(_Op):
    """DeepseekV4LogitsProcessor: borrows model.hc_head and model.norm (not its submodules)."""

    def __init__(self, oracle, cfg, hc_head, norm):
        super().__init__(oracle)
        self.hc_mult, self.hidden = cfg.hc_mult, cfg.hidden_size
        object.__setattr__(self, "_hc_head", hc_head)
        object.__setattr__(self, "_norm", norm)

    def forward(self, hidden_states, lm_head, attn_metadata, return_context_logits=False):
        rows = torch.arange(len(hidden_states)) if return_context_logits else attn_metadata["last"]
        saved = self.oracle.rows
        self.oracle.rows = saved[rows]  # the head ops see only these rows
        try:
            hidden_states = hidden_states[rows].reshape(-1, self.hc_mult, self.hidden)
            hidden_states = self._norm(self._hc_head(hidden_states))
            return lm_head(hidden_states).float()
        finally:
            self.oracle.rows = saved


class TRTForCausalLM(_Op):
    def __init__(self, oracle, cfg, fused_hc=True, pre_moe_fusion_rank=None):
        super().__init__(oracle)
        self.model = TRTModel(oracle, cfg, fused_hc, pre_moe_fusion_rank)
        self.lm_head = TRTLMHead(oracle)
        self.logits_processor = TRTLogitsProcessor(oracle, cfg, self.model.hc_head, self.model.norm)

    def forward(self, attn_metadata, input_ids=None, position_ids=None, inputs_embeds=None, spec_metadata=None,
                return_context_logits=False, **kwargs):
        hidden_states = self.model(attn_metadata=attn_metadata, input_ids=input_ids, position_ids=position_ids,
                                   inputs_embeds=inputs_embeds, spec_metadata=spec_metadata)
        return self.logits_processor(hidden_states, self.lm_head, attn_metadata, return_context_logits)


def run_trtllm(root: TRTForCausalLM, plans: list[PassPlan], return_context_logits=True) -> None:
    """PyTorchModelEngine: model.forward(**inputs) with position_ids shaped [1, T]."""
    for plan in plans:
        root.oracle.rows = plan.rows
        root.forward(attn_metadata={"last": plan.last}, input_ids=plan.ids, position_ids=plan.pos[None],
                     return_context_logits=return_context_logits)

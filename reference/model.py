"""DeepSeek V4 forward pass (docs/v4-spec.md §2, §7) with capture of every canonical point.

`run()` takes parameters in DeepSeek's own checkpoint naming (docs/v4-spec.md §8.1), a list of token
sequences (the batch; each sequence starts at position 0, no padding) and a precision, and
returns every captured tensor flattened over the batch's tokens in order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import attention, sub
from .config import ModelConfig
from .mhc import collapse, hc_head_weights, hc_post, hc_pre
from .moe import moe
from .precision import Precision
from .primitives import gemm, linear, rms_norm, rope_frequencies

# points whose leading dim is compressed entries, not tokens
ENTRY_POINTS = ("compressed_kv", "indexer_keys")


class Recorder:
    """Collects named tensors under a prefix; a Recorder(None) records nothing."""

    def __init__(self, store: dict | None, prefix: str = ""):
        self.store, self.prefix = store, prefix

    def child(self, name: str) -> "Recorder":
        return Recorder(self.store, f"{self.prefix}{name}.")

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        if self.store is not None:
            self.store[self.prefix + name] = tensor.detach()


def rope_tables(cfg: ModelConfig) -> dict:
    """The two RoPE tables (docs/v4-spec.md §1.4): 'main' (rope_theta, no YaRN) for sliding layers and
    MTP; 'compress' (compress_rope_theta + YaRN) for every rotation in CSA/HCA layers."""
    return {
        "main": rope_frequencies(cfg.rope_dim, cfg.rope_theta),
        "compress": rope_frequencies(cfg.rope_dim, cfg.compress_rope_theta, cfg.yarn_factor,
                                     cfg.yarn_original_max_pos, cfg.yarn_beta_fast, cfg.yarn_beta_slow),
    }


def cast_params(params: dict, prec: Precision) -> dict:
    """Matrices to the activation dtype, fp32-held tensors (mHC, sinks, ape, biases, norms) to
    acc; integer tables untouched. Exact for the generated cases (bf16-representable). Routed
    experts stay as given: the MoE casts one expert at a time (`moe.expert_weights`), so a
    float64 run does not hold a float64 copy of every expert; an expert may be anything with
    `.to(dtype)` and `.is_floating_point()` (a checkpoint's expert, dequantized when cast)."""
    out = {}
    for name, t in params.items():
        if not t.is_floating_point() or ".experts." in name:
            out[name] = t
        elif t.dim() == 2 and name.endswith(".weight"):
            out[name] = t.to(prec.act)
        else:
            out[name] = t.to(prec.acc)
    return out


def precision_of(precision) -> Precision:
    """The precision (and with it the rounding policy) `run` and `run_part` compute at; the one
    place a harness overrides it (selftest: split-K)."""
    return Precision.of(precision)


def _hc_args(cfg: ModelConfig, prec: Precision) -> dict:
    return dict(n=cfg.hc_mult, iters=cfg.hc_sinkhorn_iters, hc_eps=cfg.hc_eps, norm_eps=cfg.rms_eps, acc=prec.acc,
                lanes=prec.policy.hc_mix_lanes)


def _hc_params(p: dict, part: str) -> tuple:
    """(fn [(2+n)n, nD], scale [3], base [(2+n)n]) of the 'attn' or 'ffn' mHC."""
    return p[f"hc_{part}_fn"], p[f"hc_{part}_scale"], p[f"hc_{part}_base"]


def _record_hc(rec, post, comb, u) -> None:
    rec("post", post)
    rec("comb", comb)
    rec("collapsed", u)


def _merge_dtype(post, comb, prec: Precision) -> tuple:
    """post, comb in the dtype the mHC merge runs in (`policy.hc_post`)."""
    return post.to(prec.policy.hc_post), comb.to(prec.policy.hc_post)


def attention_sublayer(x, p, layer, cfg, tables, prec, sims, rec, attend=None):
    """mHC pre -> attn_norm -> attention -> mHC post. x: [S, n, D] streams. `attend`: None for
    the attention of the whole sequence (looked up when called, so it can be patched), or a
    step of it with carried state (decode.py)."""
    rec("attn_hc.in", x)
    u, post, comb = hc_pre(x, *_hc_params(p, "attn"), **_hc_args(cfg, prec))  # [S, D], [S, n], [S, n, n]
    _record_hc(rec.child("attn_hc"), post, comb, u)
    xn = rms_norm(u, p["attn_norm.weight"], cfg.rms_eps, prec.acc)
    rec("attn_norm", xn)
    a = (attend or attention)(xn, sub(p, "attn"), layer, cfg, tables, prec, sims, rec.child("attn"))  # [S, D]
    rec("attn.out", a)
    return hc_post(a, x, *_merge_dtype(post, comb, prec))


def ffn_sublayer(x, ids, p, layer, cfg, prec, rec, given=None):
    """mHC pre -> ffn_norm -> MoE -> mHC post. x: [S, n, D] streams, ids: [S]; `given`: expert
    ids [S, k] the MoE runs instead of its router's own (`moe.given_choices`)."""
    rec("ffn_hc.in", x)
    u, post, comb = hc_pre(x, *_hc_params(p, "ffn"), **_hc_args(cfg, prec))  # [S, D], [S, n], [S, n, n]
    _record_hc(rec.child("ffn_hc"), post, comb, u)
    yn = rms_norm(u, p["ffn_norm.weight"], cfg.rms_eps, prec.acc)
    rec("ffn_norm", yn)
    f = moe(yn, ids, sub(p, "ffn"), layer, cfg, prec, rec.child("moe"), given)  # [S, D]
    rec("moe.out", f)
    x = hc_post(f, x, *_merge_dtype(post, comb, prec))
    rec("out", x)
    return x


def block(x, ids, p, layer, cfg, tables, prec, sims, rec):
    """One decoder block: mHC pre -> attention -> mHC post -> mHC pre -> MoE -> mHC post."""
    x = attention_sublayer(x, p, layer, cfg, tables, prec, sims, rec)
    return ffn_sublayer(x, ids, p, layer, cfg, prec, rec)


def head(x, p, prefix, cfg, prec, rec):
    """Final mHC contraction -> norm -> LM head (placed by `policy.head`). x [S, n, D] -> [S, V]."""
    w = hc_head_weights(x, p[f"{prefix}hc_head_fn"], p[f"{prefix}hc_head_scale"], p[f"{prefix}hc_head_base"],
                        hc_eps=cfg.hc_eps, norm_eps=cfg.rms_eps, acc=prec.acc, lanes=prec.policy.hc_mix_lanes)
    h = collapse(x, w)
    rec("head.collapsed", h)
    hn = rms_norm(h, p[f"{prefix}norm.weight"], cfg.rms_eps, prec.acc)
    rec("head.norm", hn)
    logits = gemm(hn, p["head.weight"], prec.policy.head)  # the demo: fp32 (fp64 for the golden)
    rec("logits", logits)
    return logits


def forward_sequence(cfg: ModelConfig, p: dict, ids: torch.Tensor, prec: Precision, *, sims=False,
                     mtp=True, rec: Recorder | None = None):
    """Logits [S, V] of one sequence ids [S] at positions 0..S-1; every point into `rec`."""
    rec = rec or Recorder(None)
    tables = rope_tables(cfg)
    s = ids.shape[0]
    e = p["embed.weight"][ids].to(prec.act)
    rec("embed", e)
    x = e[:, None, :].expand(s, cfg.hc_mult, cfg.hidden_size).contiguous()  # 4 identical copies
    for layer in range(cfg.num_layers):
        x = block(x, ids, sub(p, f"layers.{layer}"), layer, cfg, tables, prec, sims,
                  rec.child(f"layers.{layer}"))
    logits = head(x, p, "", cfg, prec, rec)
    if mtp and cfg.num_mtp_layers and s > 1:
        mtp_forward(cfg, p, ids, x, tables, prec, sims, rec.child("mtp.0"))
    return logits


def mtp_forward(cfg, p, ids, x_main, tables, prec, sims, rec):
    """MTP block (docs/v4-spec.md §7.2): hidden streams at i + embedding of token i+1 -> predicts i+2."""
    m = sub(p, "mtp.0")
    ids_next = ids[1:]
    e = rms_norm(p["embed.weight"][ids_next].to(prec.act), m["enorm.weight"], cfg.rms_eps, prec.acc)
    xh = rms_norm(x_main[:-1], m["hnorm.weight"], cfg.rms_eps, prec.acc)
    k, r = prec.policy.split_k, prec.policy.bf16_linear_in
    x = linear(e, m["e_proj.weight"], k, r)[:, None, :] + linear(xh, m["h_proj.weight"], k, r)  # [S-1, n, D]
    rec("in", x)
    x = block(x, ids_next, m, cfg.num_layers, cfg, tables, prec, sims, rec)
    head(x, {**m, "head.weight": p["head.weight"]}, "", cfg, prec, rec)


@dataclass
class RunResult:
    points: dict  # name -> tensor, flattened over the batch's tokens
    precision: str


def _concat(parts: list) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    width = max(t.shape[-1] for t in parts)
    if any(t.shape[-1] != width for t in parts):  # e.g. indexer scores: n differs per sequence
        fill = float("-inf") if parts[0].is_floating_point() else -1
        parts = [torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=fill) for t in parts]
    return torch.cat(parts, 0)


def run(cfg: ModelConfig, params: dict, sequences, precision="float64", *, sims=False, mtp=True) -> RunResult:
    prec = precision_of(precision)
    p = cast_params(params, prec)
    per_seq: list[dict] = []
    with torch.no_grad():
        for ids in sequences:
            store: dict = {}
            forward_sequence(cfg, p, torch.as_tensor(ids, dtype=torch.long), prec, sims=sims, mtp=mtp,
                             rec=Recorder(store))
            per_seq.append(store)
    names = list(per_seq[0])
    points = {n: _concat([s[n] for s in per_seq if n in s]) for n in names}
    return RunResult(points, prec.name)


def _split(t: torch.Tensor, lens) -> list:
    return list(torch.split(t, list(lens), 0))


def _run_one_part(part: str, x, ids, lp: dict, head_w, layer_id, cfg, tables, prec, sims, rec, given=None) -> None:
    """One sequence's sub-block `part` on its input x (streams [S, n, D]), recorded into rec."""
    if part == "attn":
        rec("ffn_hc.in", attention_sublayer(x, lp, layer_id, cfg, tables, prec, sims, rec))
    elif part == "ffn":
        ffn_sublayer(x, ids, lp, layer_id, cfg, prec, rec, given)
    elif part == "head":
        head(x, {**lp, "head.weight": head_w}, "", cfg, prec, rec)
    else:
        raise ValueError(f"unknown part {part!r}")


def run_part(cfg: ModelConfig, params: dict, part: str, layer, inputs: torch.Tensor, sequences,
             precision="float64", *, sims=False, experts: torch.Tensor | None = None) -> dict:
    """Teacher forcing: run one part of the reference on given (engine-captured) inputs.

    part: "attn" (input: the layer's attn_hc.in streams), "ffn" (input: ffn_hc.in) or "head"
    (input: the last layer's streams); `layer` is a main layer index or "mtp.0". `inputs` is
    flattened over the batch's tokens ([T, n, D]; for mtp.0, sequences contribute S-1 rows).
    `experts` ([T, k], flattened like `inputs`): for "ffn", the expert ids the MoE runs instead
    of its router's own (`moe.given_choices`). Returns the points that part records, flattened,
    under their canonical names."""
    prec = precision_of(precision)
    p = cast_params(params, prec)
    tables = rope_tables(cfg)
    mtp = layer == "mtp.0"
    prefix = "mtp.0" if mtp else f"layers.{layer}"
    lp = sub(p, prefix) if part != "head" or mtp else p
    layer_id = cfg.num_layers if mtp else layer
    id_list = [torch.as_tensor(s, dtype=torch.long)[1 if mtp else 0:] for s in sequences]
    per_seq = []
    lens = [len(i) for i in id_list]
    given = _split(experts, lens) if experts is not None and experts.shape[0] == sum(lens) else [None] * len(lens)
    with torch.no_grad():
        for ids, x, g in zip(id_list, _split(inputs.to(prec.act), lens), given):
            store: dict = {}
            rec = Recorder(store, f"{prefix}." if (mtp or part != "head") else "")
            _run_one_part(part, x, ids, lp, p.get("head.weight"), layer_id, cfg, tables, prec, sims, rec, g)
            per_seq.append(store)
    return {n: _concat([s[n] for s in per_seq]) for n in per_seq[0]}

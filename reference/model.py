"""DeepSeek V4 forward pass (docs/v4-spec.md §2, §7) with capture of every canonical point.

`run()` takes parameters in DeepSeek's own checkpoint naming (docs/v4-spec.md §8.1), a list of token
sequences (the batch; each sequence starts at position 0, no padding) and a precision, and
returns every captured tensor flattened over the batch's tokens in order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention import attention, available, sub
from .config import ModelConfig
from .mhc import collapse, hc_coefficients, hc_head_weights, hc_post
from .moe import moe
from .precision import Precision
from .primitives import linear, reduction_split, rms_norm, rope_frequencies

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
    float64 run does not hold a float64 copy of every expert."""
    out = {}
    for name, t in params.items():
        if not t.is_floating_point() or ".experts." in name:
            out[name] = t
        elif t.dim() == 2 and name.endswith(".weight"):
            out[name] = t.to(prec.act)
        else:
            out[name] = t.to(prec.acc)
    return out


@dataclass
class Stats:
    """What a run exercised, per layer (feeds the coverage report)."""
    layers: dict = field(default_factory=dict)

    def layer(self, key) -> dict:
        return self.layers.setdefault(key, {})


def _hc_args(cfg: ModelConfig, prec: Precision) -> dict:
    return dict(n=cfg.hc_mult, iters=cfg.hc_sinkhorn_iters, hc_eps=cfg.hc_eps, norm_eps=cfg.rms_eps, acc=prec.acc)


def attention_sublayer(x, p, layer, cfg, tables, prec, sims, rec, stats: dict, attend=None):
    """mHC pre -> attn_norm -> attention -> mHC post. x: [S, n, D] streams. `attend`: None for
    the attention of the whole sequence (looked up when called, so it can be patched), or a
    step of it with carried state (decode.py)."""
    rec("attn_hc.in", x)
    pre, post, comb = hc_coefficients(x, p["hc_attn_fn"], p["hc_attn_scale"], p["hc_attn_base"], **_hc_args(cfg, prec))
    rec("attn_hc.post", post)
    rec("attn_hc.comb", comb)
    u = collapse(x, pre)
    rec("attn_hc.collapsed", u)
    xn = rms_norm(u, p["attn_norm.weight"], cfg.rms_eps, prec.acc)
    rec("attn_norm", xn)
    attn_store: dict = {}
    a = (attend or attention)(xn, sub(p, "attn"), layer, cfg, tables, prec, sims, Recorder(attn_store))
    for k, v in attn_store.items():
        rec(f"attn.{k}", v)
    rec("attn.out", a)
    if attend is None:
        _attention_stats(stats, attn_store, cfg, layer, x.shape[0])
    return hc_post(a, x, post.to(prec.mix()), comb.to(prec.mix()))


def ffn_sublayer(x, ids, p, layer, cfg, prec, rec, stats: dict):
    """mHC pre -> ffn_norm -> MoE -> mHC post."""
    rec("ffn_hc.in", x)
    pre, post, comb = hc_coefficients(x, p["hc_ffn_fn"], p["hc_ffn_scale"], p["hc_ffn_base"], **_hc_args(cfg, prec))
    rec("ffn_hc.post", post)
    rec("ffn_hc.comb", comb)
    u = collapse(x, pre)
    rec("ffn_hc.collapsed", u)
    yn = rms_norm(u, p["ffn_norm.weight"], cfg.rms_eps, prec.acc)
    rec("ffn_norm", yn)
    f = moe(yn, ids, sub(p, "ffn"), layer, cfg, prec, rec.child("moe"), stats)
    rec("moe.out", f)
    x = hc_post(f, x, post.to(prec.mix()), comb.to(prec.mix()))
    rec("out", x)
    stats["comb_offdiag_mass"] = stats.get("comb_offdiag_mass", 0.0) + float(
        (comb.sum((-1, -2)) - comb.diagonal(dim1=-2, dim2=-1).sum(-1)).sum()) / cfg.hc_mult
    stats["tokens"] = stats.get("tokens", 0) + x.shape[0]
    return x


def block(x, ids, p, layer, cfg, tables, prec, sims, rec, stats: dict):
    """One decoder block: mHC pre -> attention -> mHC post -> mHC pre -> MoE -> mHC post."""
    x = attention_sublayer(x, p, layer, cfg, tables, prec, sims, rec, stats)
    return ffn_sublayer(x, ids, p, layer, cfg, prec, rec, stats)


def _attention_stats(stats: dict, st: dict, cfg: ModelConfig, layer: int, s: int) -> None:
    stats["beyond_window"] = stats.get("beyond_window", 0) + max(0, s - cfg.window)
    if "compressed_kv" in st:
        stats["compressed_entries"] = stats.get("compressed_entries", 0) + st["compressed_kv"].shape[0]
    if "indexer_topk" in st:
        n = st["compressed_kv"].shape[0]
        avail = available(s, n, cfg.csa_ratio).sum(1)
        chosen = (st["indexer_topk"] >= 0).sum(1)
        stats["indexer_queries"] = stats.get("indexer_queries", 0) + s
        stats["indexer_pruning_queries"] = stats.get("indexer_pruning_queries", 0) + int((avail > chosen).sum())
        stats["indexer_available"] = stats.get("indexer_available", 0) + int(avail.sum())
        stats["indexer_dropped"] = stats.get("indexer_dropped", 0) + int((avail - chosen).sum())


def head(x, p, prefix, cfg, prec, rec):
    w = hc_head_weights(x, p[f"{prefix}hc_head_fn"], p[f"{prefix}hc_head_scale"], p[f"{prefix}hc_head_base"],
                        hc_eps=cfg.hc_eps, norm_eps=cfg.rms_eps, acc=prec.acc)
    h = collapse(x, w)
    rec("head.collapsed", h)
    hn = rms_norm(h, p[f"{prefix}norm.weight"], cfg.rms_eps, prec.acc)
    rec("head.norm", hn)
    if prec.alt_placement:
        logits = linear(hn, p["head.weight"])
    else:
        logits = hn.to(prec.acc) @ p["head.weight"].to(prec.acc).T  # LM head in fp32 (demo) / fp64
    rec("logits", logits)
    return logits


def forward_sequence(cfg: ModelConfig, p: dict, ids: torch.Tensor, prec: Precision, *, sims=False,
                     mtp=True, rec: Recorder | None = None, stats: Stats | None = None):
    rec = rec or Recorder(None)
    stats = stats or Stats()
    tables = rope_tables(cfg)
    s = ids.shape[0]
    e = p["embed.weight"][ids].to(prec.act)
    rec("embed", e)
    x = e[:, None, :].expand(s, cfg.hc_mult, cfg.hidden_size).contiguous()  # 4 identical copies
    for layer in range(cfg.num_layers):
        x = block(x, ids, sub(p, f"layers.{layer}"), layer, cfg, tables, prec, sims,
                  rec.child(f"layers.{layer}"), stats.layer(layer))
    logits = head(x, p, "", cfg, prec, rec)
    if mtp and cfg.num_mtp_layers and s > 1:
        mtp_forward(cfg, p, ids, x, tables, prec, sims, rec.child("mtp.0"), stats.layer("mtp.0"))
    return logits


def mtp_forward(cfg, p, ids, x_main, tables, prec, sims, rec, stats):
    """MTP block (docs/v4-spec.md §7.2): hidden streams at i + embedding of token i+1 -> predicts i+2."""
    m = sub(p, "mtp.0")
    ids_next = ids[1:]
    e = rms_norm(p["embed.weight"][ids_next].to(prec.act), m["enorm.weight"], cfg.rms_eps, prec.acc)
    xh = rms_norm(x_main[:-1], m["hnorm.weight"], cfg.rms_eps, prec.acc)
    x = linear(e, m["e_proj.weight"])[:, None, :] + linear(xh, m["h_proj.weight"])
    rec("in", x)
    x = block(x, ids_next, m, cfg.num_layers, cfg, tables, prec, sims, rec, stats)
    head(x, {**m, "head.weight": p["head.weight"]}, "", cfg, prec, rec)


@dataclass
class RunResult:
    points: dict  # name -> tensor, flattened over the batch's tokens
    stats: Stats
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
    prec = Precision.of(precision)
    p = cast_params(params, prec)
    stats = Stats()
    per_seq: list[dict] = []
    with torch.no_grad(), reduction_split(prec.split_k):
        for ids in sequences:
            store: dict = {}
            forward_sequence(cfg, p, torch.as_tensor(ids, dtype=torch.long), prec, sims=sims, mtp=mtp,
                             rec=Recorder(store), stats=stats)
            per_seq.append(store)
    names = list(per_seq[0])
    points = {n: _concat([s[n] for s in per_seq if n in s]) for n in names}
    return RunResult(points, stats, prec.name)


def _split(t: torch.Tensor, lens) -> list:
    return list(torch.split(t, list(lens), 0))


def run_part(cfg: ModelConfig, params: dict, part: str, layer, inputs: torch.Tensor, sequences,
             precision="float64", *, sims=False) -> dict:
    """Teacher forcing: run one part of the reference on given (engine-captured) inputs.

    part: "attn" (input: the layer's attn_hc.in streams), "ffn" (input: ffn_hc.in) or "head"
    (input: the last layer's streams); `layer` is a main layer index or "mtp.0". `inputs` is
    flattened over the batch's tokens ([T, n, D]; for mtp.0, sequences contribute S-1 rows).
    Returns the points that part records, flattened, under their canonical names."""
    prec = Precision.of(precision)
    p = cast_params(params, prec)
    tables = rope_tables(cfg)
    mtp = layer == "mtp.0"
    prefix = "mtp.0" if mtp else f"layers.{layer}"
    lp = sub(p, prefix) if part != "head" or mtp else p
    layer_id = cfg.num_layers if mtp else layer
    id_list = [torch.as_tensor(s, dtype=torch.long) for s in sequences]
    if mtp:
        id_list = [ids[1:] for ids in id_list]
    per_seq = []
    with torch.no_grad(), reduction_split(prec.split_k):
        for ids, x in zip(id_list, _split(inputs.to(prec.act), [len(i) for i in id_list])):
            store: dict = {}
            stats: dict = {}
            rec = Recorder(store, f"{prefix}." if (mtp or part != "head") else "")
            if part == "attn":
                rec("ffn_hc.in", attention_sublayer(x, lp, layer_id, cfg, tables, prec, sims, rec, stats))
            elif part == "ffn":
                ffn_sublayer(x, ids, lp, layer_id, cfg, prec, rec, stats)
            elif part == "head":
                head(x, {**lp, "head.weight": p["head.weight"]}, "", cfg, prec, rec)
            else:
                raise ValueError(f"unknown part {part!r}")
            per_seq.append(store)
    return {n: _concat([s[n] for s in per_seq]) for n in per_seq[0]}

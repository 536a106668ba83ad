"""llama.cpp's tensor names -> canonical points, and the eval-callback reader (docs/engines.md,
"llama.cpp").

llama.cpp names each graph node it wants observable with `cb(tensor, "name", il)`, which sets
`name-il` (or `name` for il = -1; `llama_context::graph_get_cb`). The scheduler's eval callback
(`llama_context_params.cb_eval`) is asked (ask=true) about every node and, for the nodes we
select, called again (ask=false) once the node is computed, before any later node reads it: the
reader copies the tensor then (and a fault may rewrite it in place, `faults/llamacpp.py`).

Names read from `src/models/deepseek4.cpp` and `src/llama-graph.cpp` (`build_moe_ffn`) of the
llama.cpp vendored in llama-cpp-python 0.3.36.
"""
from __future__ import annotations

import ctypes
import re

import numpy as np

# --- ggml's tensor header (ggml/include/ggml.h: GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64,
# GGML_MAX_SRC 10, GGML_MAX_NAME 64); only the leading fields up to `name` are read
class GGMLTensor(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


# ggml_type values (ggml.h) of the tensors read here
NUMPY_TYPES = {0: np.float32, 1: np.float16, 26: np.int32, 30: None}  # 30 = BF16 (read as uint16)
TYPE_NAMES = {0: "f32", 1: "f16", 8: "q8_0", 26: "i32", 30: "bf16", 39: "mxfp4"}

# per layer: llama.cpp name -> canonical leaf. Names seen twice per layer (the attention and the
# FFN mHC both call build_hc_pre with the same il) map to a pair: first call, second call.
LAYER_NAMES = {
    "hc_attn_pre": "attn_hc.collapsed",
    "attn_norm": "attn_norm",
    "qr_norm": "attn.qr",  # after q_a RMSNorm, as the reference records qr
    "q": "attn.q",  # per-head RMS-normalised, RoPE'd
    "kv": "attn.kv",  # normed, RoPE'd shared key/value row
    "lid_top_k": "attn.indexer_topk",
    "attn_derope": "attn.core",  # attention output with the RoPE dims rotated back
    "attn_out": "attn.out",
    "hc_attn_post": "ffn_hc.in",
    "hc_ffn_pre": "ffn_hc.collapsed",
    "ffn_norm": "ffn_norm",
    "ffn_moe_logits": "moe.router_logits",
    "ffn_moe_topk": "moe.experts",
    "ffn_moe_weights_scaled": "moe.weights",  # sqrt-softplus, normalised, x route scale
    "ffn_out": "moe.out",  # routed (ffn_moe_out) + shared (ffn_shexp)
    "l_last": "out",
    "hc_post": ("attn_hc.post", "ffn_hc.post"),
    "hc_comb": ("attn_hc.comb", "ffn_hc.comb"),
}
GLOBAL_NAMES = {"hc_init": ("embed", "layers.0.attn_hc.in"), "hc_head": "head.collapsed",
                "result_norm": "head.norm", "result_output": "logits"}
# finer nodes recorded for the report only (never compared: no canonical point)
EXTRA_NAMES = {"ffn_moe_out", "ffn_shexp"}

_NAME = re.compile(r"^(.+)-(\d+)$")


def parse_name(name: str) -> tuple[str, int | None]:
    """('base', il) of a node name set by cb(); il None for a global node."""
    m = _NAME.match(name)
    if m and (m.group(1) in LAYER_NAMES or m.group(1) in EXTRA_NAMES):
        return m.group(1), int(m.group(2))
    return name, None


def wanted(name: str) -> bool:
    base, il = parse_name(name)
    if il is None:
        return base in GLOBAL_NAMES
    return base in LAYER_NAMES or base in EXTRA_NAMES


def read_tensor(t: GGMLTensor) -> np.ndarray:
    """A copy of a computed host tensor, shaped [ne3, ne2, ne1, ne0] with ggml's strides."""
    if t.type not in NUMPY_TYPES:
        raise TypeError(f"tensor {t.name.decode()} has ggml type {t.type}, not read here")
    ne = [int(t.ne[i]) for i in range(4)]
    nb = [int(t.nb[i]) for i in range(4)]
    item = 2 if t.type in (1, 30) else 4
    span = sum((n - 1) * b for n, b in zip(ne, nb)) + item
    buf = (ctypes.c_char * span).from_address(t.data)
    dt = NUMPY_TYPES[t.type] or np.uint16
    base = np.ndarray(shape=tuple(reversed(ne)), dtype=dt, buffer=buf, strides=tuple(reversed(nb)))
    out = np.array(base, copy=True)
    if t.type == 30:  # bf16 -> f32
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


def writable_view(t: GGMLTensor) -> np.ndarray:
    """A numpy view over a computed F32 / I32 host tensor's memory (for faults, which rewrite it
    in place before the next node reads it)."""
    if t.type not in (0, 26):
        raise TypeError(f"tensor {t.name.decode()} is neither F32 nor I32 (ggml type {t.type})")
    ne = [int(t.ne[i]) for i in range(4)]
    nb = [int(t.nb[i]) for i in range(4)]
    span = sum((n - 1) * b for n, b in zip(ne, nb)) + 4
    buf = (ctypes.c_char * span).from_address(t.data)
    dt = np.float32 if t.type == 0 else np.int32
    return np.ndarray(shape=tuple(reversed(ne)), dtype=dt, buffer=buf, strides=tuple(reversed(nb)))


def per_token(name: str, arr: np.ndarray, rows: int) -> np.ndarray:
    """[rows, ...] from a [ne3, ne2, ne1, ne0] array whose token axis is the outermost non-unit
    one (llama.cpp keeps tokens in ne1 for vectors, ne2 for streams / heads)."""
    if arr.ndim == 4 and arr.shape[0] > 1 and arr.shape[1] == 1 and arr.shape[0] * arr.shape[2] == rows:
        # one stream per sequence in ne3, its tokens in ne1 (e.g. lid_top_k [k, T/s, 1, s] of a
        # ubatch holding s sequences): streams in order are the ubatch's rows, grouped by sequence
        return arr.reshape(rows, arr.shape[3])
    a = arr.reshape(arr.shape[-3:]) if arr.shape[0] == 1 else arr
    while a.ndim > 1 and a.shape[0] == 1 and a.shape[0] != rows:
        a = a[0]
    if a.shape[0] != rows:
        raise ValueError(f"{name}: {tuple(arr.shape)} has no token axis of {rows}")
    return a


def canonical_of(base: str, il: int | None, occurrence: int) -> list[str]:
    """The canonical point names a captured node feeds (may be several: hc_init is the
    embedding and layer 0's streams)."""
    if il is None:
        names = GLOBAL_NAMES.get(base)
        return list(names) if isinstance(names, tuple) else ([names] if names else [])
    leaf = LAYER_NAMES.get(base)
    if leaf is None:
        return []
    if isinstance(leaf, tuple):
        if occurrence >= len(leaf):
            return []
        leaf = leaf[occurrence]
    out = [f"layers.{il}.{leaf}"]
    if base == "l_last":  # layer i's output is layer i+1's input streams
        out.append(f"layers.{il + 1}.attn_hc.in")
    return out


# canonical points this capture never has, with the reason (docs/engines.md)
SKIPPED = {
    "layers.*.attn.compressed_kv": "llama.cpp writes compressed entries into its CSA/HCA caches per "
                                   "block ('csa_state_compress' / 'hca_state_compress' nodes hold only "
                                   "the blocks completed in that ubatch); not laid out per token",
    "mtp.0.*": "the MTP block runs only as llama.cpp's speculative draft graph (LLM_GRAPH_TYPE_DECODER_MTP); "
               "the GGUF is written without it",
}

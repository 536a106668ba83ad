"""DeepSeek V4 release checkpoints, read lazily (docs/checkpoints.md).

The on-disk format of a V4 release: `config.json`, shards `model-0000k-of-0000N.safetensors`
and `model.safetensors.index.json` (`{"metadata": {"total_size"}, "weight_map": {tensor:
shard}}`), DeepSeek's flat tensor names (docs/v4-spec.md §8.1). How a weight is stored is read
from the stored dtypes, never guessed from its name (docs/v4-spec.md §8.2, §10.22):

| stored weight | its `<module>.scale`              | meaning                                      |
|---------------|-----------------------------------|----------------------------------------------|
| F8_E4M3 [O,I] | F8_E8M0 or F32 [ceil(O/128), ceil(I/128)] | FP8 with 128x128 block scales            |
| I8/U8 [O,I/2] | F8_E8M0 [O, I/32]                 | MXFP4: two e2m1 per byte, low nibble first   |
| F4 [O,I]      | F8_E8M0 [O, I/32]                 | the same, as safetensors' float4_e2m1fn_x2   |
| BF16/F16/F32  | none                              | plain                                        |
| I64/I32       | none                              | integer table (tid2eid)                      |

Opening a checkpoint validates everything that headers can tell (config, index, every shard
header, every tensor's presence, shard, dtype pair and logical shape against the config) and
reads no weight data. `unit_params(unit)` then returns one unit's parameters (a layer, the
embedding, the head, the MTP block) dequantized to fp32 — exact: e4m3 and e2m1 values times
powers of two (or F32 scales) are fp32 numbers — with every routed expert deferred
(`ExpertWeight`): the reference dequantizes an expert when it reaches it, one at a time
(reference/moe.py `expert_weights`), so a layer check holds the layer's dense weights and one
expert, never all of them. Every problem is one `BadInput` line.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from corruptcheck.errors import BadInput
from corruptcheck.storage.jsonio import loads_finite
from corruptcheck.storage.lazy_points import read_safetensors, read_tensor, safetensors_file
from corruptcheck.reference import ModelConfig
from corruptcheck.reference.quant import FP8_BLOCK, MXFP4_BLOCK, fp8_dequantize, mxfp4_dequantize
from corruptcheck.weights import param_shapes

INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
E4M3 = "F8_E4M3"
E8M0 = "F8_E8M0"
PACKED_FP4 = ("I8", "U8")
PLAIN_FLOAT = ("BF16", "F16", "F32", "F64")
INTEGER = ("I64", "I32")

# config.json key -> ModelConfig field (the keys engines/checkpoint.py writes, as V4 releases name them)
CONFIG_KEYS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads", "q_lora_rank": "q_lora_rank", "o_groups": "o_groups",
    "o_lora_rank": "o_lora_rank", "compress_ratios": "compress_ratios", "n_routed_experts": "n_routed_experts",
    "moe_intermediate_size": "moe_inter_dim", "routed_scaling_factor": "route_scale",
    "index_n_heads": "index_n_heads", "index_topk": "index_topk", "head_dim": "head_dim",
    "qk_rope_head_dim": "rope_dim", "sliding_window": "window", "rope_theta": "rope_theta",
    "compress_rope_theta": "compress_rope_theta", "index_head_dim": "index_head_dim", "hc_mult": "hc_mult",
    "hc_sinkhorn_iters": "hc_sinkhorn_iters", "hc_eps": "hc_eps", "n_shared_experts": "n_shared_experts",
    "num_experts_per_tok": "experts_per_tok", "num_hash_layers": "num_hash_layers", "swiglu_limit": "swiglu_limit",
    "rms_norm_eps": "rms_eps", "num_nextn_predict_layers": "num_mtp_layers",
    "max_position_embeddings": "max_position_embeddings",
}
YARN_KEYS = {"factor": "yarn_factor", "original_max_position_embeddings": "yarn_original_max_pos",
             "beta_fast": "yarn_beta_fast", "beta_slow": "yarn_beta_slow"}


def config_from_release(conf: dict, where: str) -> ModelConfig:
    """The ModelConfig a release's config.json describes."""
    missing = [k for k in CONFIG_KEYS if k not in conf]
    if missing:
        raise BadInput(f"{where}: lacks {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    fields = {f: conf[k] for k, f in CONFIG_KEYS.items()}
    rope = conf.get("rope_scaling") or {}
    fields.update({f: rope[k] for k, f in YARN_KEYS.items() if k in rope})
    fields["compress_ratios"] = tuple(fields["compress_ratios"]) if isinstance(fields["compress_ratios"], list) else None
    try:
        return ModelConfig(name="checkpoint", **fields)
    except (TypeError, ValueError) as exc:
        raise BadInput(f"{where}: not a DeepSeek V4 config ({exc})") from None


def _json(path: Path) -> dict:
    if not path.is_file():
        raise BadInput(f"checkpoint {path.parent} has no {path.name}")
    try:
        doc = loads_finite(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise BadInput(f"{path}: not a JSON object")
    return doc


def _header(path: Path) -> dict:
    """{tensor: (stored dtype, shape)} from a shard's header (safetensors checks the header and
    the file's length against it when it opens the file: a truncated shard fails here)."""
    def read(f):
        return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    return read_safetensors(path, read)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


class ExpertWeight:
    """A routed expert's weight, dequantized when the reference casts it (`.to(dtype)`)."""

    def __init__(self, checkpoint: "ReleaseCheckpoint", name: str):
        self.checkpoint, self.name = checkpoint, name
        self.shape = torch.Size(checkpoint.shapes[name])

    def is_floating_point(self) -> bool:
        return True

    def to(self, dtype) -> torch.Tensor:
        return self.checkpoint.tensor(self.name).to(dtype)


class ReleaseCheckpoint:
    """A release-format checkpoint directory, validated from its headers (module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise BadInput(f"checkpoint {self.root} is not a directory")
        self.release_config = _json(self.root / CONFIG)
        self.config = config_from_release(self.release_config, str(self.root / CONFIG))
        index = _json(self.root / INDEX)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise BadInput(f"{self.root / INDEX}: no weight_map")
        self.weight_map = weight_map
        headers = {name: _header(safetensors_file(self.root, name, self.root / INDEX, "checkpoint shard"))
                   for name in sorted(set(weight_map.values()))}
        self.stored: dict[str, tuple[str, tuple, Path]] = {}
        for tensor, shard in weight_map.items():
            if tensor not in headers[shard]:
                raise BadInput(f"{self.root / INDEX}: maps {tensor} to {shard}, which does not hold it")
            self.stored[tensor] = (*headers[shard][tensor], self.root / shard)
        for shard, header in headers.items():
            extra = sorted(set(header) - {t for t, s in weight_map.items() if s == shard})
            if extra:
                raise BadInput(f"shard {shard} holds {extra[0]}, which {INDEX} maps elsewhere or not at all")
        self.shapes = self._validate(param_shapes(self.config))

    # --- validation from headers ------------------------------------------------------------
    def _validate(self, expected: dict) -> dict:
        """Every parameter present with a dtype pair that says how it is stored and the logical
        shape the config implies; nothing else stored. Returns {name: logical shape}."""
        scales = {n + ".scale" for n in (n[: -len(".weight")] for n in expected if n.endswith(".weight"))}
        unknown = sorted(set(self.stored) - set(expected) - scales)
        if unknown:
            raise BadInput(f"checkpoint tensor {unknown[0]} is not a parameter of this config"
                           + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
        for name, (shape, floating) in expected.items():
            if name not in self.stored:
                raise BadInput(f"checkpoint lacks {name}")
            got = self._logical_shape(name, floating)
            if got != shape:
                raise BadInput(f"{name}: stored as {self._describe(name)}, which is {list(got)}; "
                               f"the config needs {list(shape)}")
        return {name: shape for name, (shape, _) in expected.items()}

    def _describe(self, name: str) -> str:
        dtype, shape, path = self.stored[name]
        return f"{dtype} {list(shape)} in {path.name}"

    def _scale(self, name: str):
        sname = name[: -len(".weight")] + ".scale"
        return (sname, *self.stored[sname][:2]) if sname in self.stored else (sname, None, None)

    def _logical_shape(self, name: str, floating: bool) -> tuple:
        dtype, shape, _ = self.stored[name]
        sname, sdtype, sshape = self._scale(name)
        if not floating:
            if dtype not in INTEGER:
                raise BadInput(f"{name}: stored as {self._describe(name)}, an integer table must be I64 or I32")
            return shape
        if dtype in PLAIN_FLOAT:
            if sdtype is not None:
                raise BadInput(f"{sname}: a scale for {name}, which is stored unquantized ({dtype})")
            return shape
        if len(shape) != 2:
            raise BadInput(f"{name}: quantized weight must be 2-D, is {self._describe(name)}")
        if dtype == E4M3:
            if sdtype not in (E8M0, "F32"):
                raise BadInput(f"{name}: FP8 weight needs {sname} in F8_E8M0 or F32, found {sdtype or 'none'}")
            want = (_ceil(shape[0], FP8_BLOCK), _ceil(shape[1], FP8_BLOCK))
            if sshape != want:
                raise BadInput(f"{sname}: {list(sshape)} does not tile {name} {list(shape)} in 128x128 blocks "
                               f"(needs {list(want)})")
            return shape
        if dtype in PACKED_FP4 + ("F4",):
            cols = shape[1] * 2 if dtype in PACKED_FP4 else shape[1]
            if sdtype != E8M0 or sshape != (shape[0], cols // MXFP4_BLOCK) or cols % MXFP4_BLOCK:
                raise BadInput(f"{name}: MXFP4 weight ({self._describe(name)}) needs {sname} F8_E8M0 "
                               f"[{shape[0]}, {cols // MXFP4_BLOCK}], found {sdtype or 'none'} "
                               f"{list(sshape) if sshape else ''}".rstrip())
            return (shape[0], cols)
        raise BadInput(f"{name}: stored dtype {dtype} is not a V4 weight format")

    # --- data ---------------------------------------------------------------------------------
    def _raw(self, name: str) -> torch.Tensor:
        return read_tensor(self.stored[name][2], name)

    def tensor(self, name: str) -> torch.Tensor:
        """One parameter, dequantized (fp32; integer tables int64)."""
        dtype = self.stored[name][0]
        raw = self._raw(name)
        if dtype in INTEGER:
            return raw.long()
        if dtype in PLAIN_FLOAT:
            out = raw.float()
            if not torch.isfinite(out).all():
                raise BadInput(f"{name} in {self.stored[name][2].name}: non-finite values: corrupt shard")
            return out
        sname = self._scale(name)[0]
        scale = self._raw(sname).float()
        if not torch.isfinite(scale).all() or (scale <= 0).any():
            raise BadInput(f"{sname} in {self.stored[sname][2].name}: scale NaN, infinite or not positive "
                           "(E8M0 byte 0xFF is NaN): corrupt shard")
        if dtype != E4M3:  # MXFP4: every e2m1 code is a finite value
            return mxfp4_dequantize(raw.view(torch.uint8), scale)
        if ((raw.view(torch.uint8) & 0x7F) == 0x7F).any():  # e4m3fn's only NaN codes: S.1111.111
            raise BadInput(f"{name} in {self.stored[name][2].name}: e4m3 NaN bytes: corrupt shard")
        return fp8_dequantize(raw, scale)

    def unit_names(self, unit: str) -> list[str]:
        """Parameters of a unit: 'embed', 'head', 'layers.<i>' or 'mtp.0' (its head included)."""
        if unit == "embed":
            return ["embed.weight"]
        if unit == "head":
            return ["norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale", "head.weight"]
        names = [n for n in self.shapes if n.startswith(unit + ".")]
        return names + (["head.weight"] if unit.startswith("mtp.") else [])

    def unit_params(self, unit: str) -> dict:
        """The unit's parameters: dense ones dequantized (fp32), routed experts deferred."""
        return {n: ExpertWeight(self, n) if ".experts." in n else self.tensor(n) for n in self.unit_names(unit)}

    def stored_bytes(self, names) -> int:
        """Bytes the named tensors (and their scales) occupy on disk."""
        size = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E8M0": 1,
                "I8": 1, "U8": 1, "F4": 0.5}
        keys = {k for n in names for k in (n, self._scale(n)[0]) if k in self.stored}
        return int(sum(math.prod(self.stored[k][1]) * size[self.stored[k][0]] for k in keys))

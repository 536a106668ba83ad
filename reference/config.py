"""Model configuration of DeepSeek V4 (docs/v4-spec.md §1) and the two published presets.

Names follow DeepSeek's own `ModelArgs` where they exist; `layer_type(i)` derives the attention
kind of layer i from `compress_ratios` exactly as the released configs do (docs/v4-spec.md §1.3).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    # `num_layers + 1` entries: 0 = sliding window only, `csa_ratio` = CSA, anything else = HCA
    # with that ratio. The last entry is the MTP block (docs/v4-spec.md §1.3).
    compress_ratios: tuple[int, ...]
    n_routed_experts: int
    moe_inter_dim: int
    route_scale: float
    index_n_heads: int
    index_topk: int
    head_dim: int = 512
    rope_dim: int = 64
    window: int = 128
    csa_ratio: int = 4
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    yarn_factor: float = 16.0
    yarn_original_max_pos: int = 65536
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    index_head_dim: int = 128
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    n_shared_experts: int = 1
    experts_per_tok: int = 6
    num_hash_layers: int = 3
    swiglu_limit: float = 10.0
    rms_eps: float = 1e-6
    num_mtp_layers: int = 1
    max_position_embeddings: int = 1048576
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        if len(self.compress_ratios) != self.num_layers + 1:
            raise ValueError(
                f"compress_ratios needs num_layers + 1 = {self.num_layers + 1} entries "
                f"(last one is the MTP block), got {len(self.compress_ratios)}"
            )
        if self.num_heads % self.o_groups:
            raise ValueError("num_heads must be a multiple of o_groups")
        if self.rope_dim > self.head_dim or self.rope_dim > self.index_head_dim or self.rope_dim % 2:
            raise ValueError("rope_dim must be even and fit inside head_dim and index_head_dim")
        if self.n_shared_experts != 1:
            raise ValueError("DeepSeek V4 has exactly one shared expert")
        if self.experts_per_tok > self.n_routed_experts:
            raise ValueError("experts_per_tok exceeds n_routed_experts")

    # --- layer schedule (docs/v4-spec.md §1.3) ---------------------------------------------
    def compress_ratio(self, layer: int) -> int:
        return self.compress_ratios[layer]

    def layer_type(self, layer: int) -> str:
        """'sliding', 'csa' or 'hca' for main layer `layer`; `num_layers` is the MTP block."""
        r = self.compress_ratios[layer]
        if r == 0:
            return "sliding"
        return "csa" if r == self.csa_ratio else "hca"

    def is_hash_layer(self, layer: int) -> bool:
        # The MTP block (layer id == num_layers) is never hash-routed.
        return layer < min(self.num_hash_layers, self.num_layers)

    @property
    def hc_dim(self) -> int:
        return self.hc_mult * self.hidden_size

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["compress_ratios"] = list(self.compress_ratios)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        d = dict(d)
        d["compress_ratios"] = tuple(d["compress_ratios"])
        return cls(**d)


# Published values (docs/v4-spec.md §1.1, §1.3). Flash: layers 0-1 sliding, then CSA/HCA alternating from
# layer 2 (CSA), last main layer 42 CSA, MTP sliding. Pro: layers 0-1 HCA, then CSA/HCA
# alternating from layer 2 (CSA), last main layer 60 CSA, MTP sliding.
V4_FLASH = ModelConfig(
    name="v4-flash",
    vocab_size=129280,
    hidden_size=4096,
    num_layers=43,
    num_heads=64,
    q_lora_rank=1024,
    o_groups=8,
    o_lora_rank=1024,
    compress_ratios=(0, 0) + (4, 128) * 20 + (4,) + (0,),
    n_routed_experts=256,
    moe_inter_dim=2048,
    route_scale=1.5,
    index_n_heads=64,
    index_topk=512,
)

V4_PRO = ModelConfig(
    name="v4-pro",
    vocab_size=129280,
    hidden_size=7168,
    num_layers=61,
    num_heads=128,
    q_lora_rank=1536,
    o_groups=16,
    o_lora_rank=1024,
    compress_ratios=(128, 128) + (4, 128) * 29 + (4,) + (0,),
    n_routed_experts=384,
    moe_inter_dim=3072,
    route_scale=2.5,
    index_n_heads=64,
    index_topk=1024,
)

PRESETS = {c.name: c for c in (V4_FLASH, V4_PRO)}

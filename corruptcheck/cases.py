"""Built-in, versioned cases: config + seeded weights + inputs (docs/design.md §8)."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from corruptcheck.errors import BadInput
from corruptcheck.reference import ModelConfig
from corruptcheck.schedule import Schedule
from corruptcheck.weights import GGUF_ROUNDINGS, fp8_exact, generate_params, release_exact

CASE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    config: ModelConfig
    seed: int
    seq_lens: tuple[int, ...]  # the batch: one sequence per entry, each from position 0
    # "fp8": every FP8 linear is generated FP8-exact (e4m3 x ue8m0 128x128 block scales), so an
    # engine loading the case's FP8 checkpoint runs the reference's very numbers; "release":
    # also the routed experts MXFP4-exact, as a V4 release stores them (release/writer.py)
    weight_format: str = "bf16"
    schedule: Schedule | None = None  # how a server would feed it (decode, chunks, batch); None = prefill only
    tokens: tuple | None = None  # explicit token ids per sequence (a decoded case); None = seeded
    tokens_note: str = "engine-decoded (prompts + greedy tokens)"  # what `tokens` are, for the spec
    # a golden of the whole float64 forward (`golden generate --all`); the release-format cases
    # are checked unit by unit against their checkpoint instead (`corruptcheck check`)
    golden: bool = True

    def params(self) -> dict[str, torch.Tensor]:
        # keyed by what the weights depend on: a served or decoded variant shares its case's weights
        return _params(self.config, self.seed, self.weight_format)

    def sequences(self) -> list[torch.Tensor]:
        return _sequences(self)

    @property
    def num_tokens(self) -> int:
        return sum(self.seq_lens)

    def spec(self) -> dict:
        spec = {"name": self.name, "format": CASE_FORMAT_VERSION, "seed": self.seed,
                "seq_lens": list(self.seq_lens), "config": self.config.to_dict()}
        if self.weight_format != "bf16":  # older goldens' specs stay unchanged
            spec["weight_format"] = self.weight_format
        if self.schedule is not None:
            spec["schedule"] = self.schedule.to_dict()
        if self.tokens is not None:  # a decoded case: the engine's own tokens
            spec["tokens"] = self.tokens_note
        return spec


@functools.lru_cache(maxsize=2)
def _params(config: ModelConfig, seed: int, weight_format: str) -> dict:
    params = generate_params(config, seed)
    base, _, rounding = weight_format.partition("+")  # "bf16+q8_0": the bf16 weights as a Q8_0 GGUF holds them
    exact = {"fp8": fp8_exact, "release": release_exact}.get(base)
    params = exact(params) if exact else params
    return GGUF_ROUNDINGS[rounding](params) if rounding else params


@functools.lru_cache(maxsize=8)
def _sequences(case: Case) -> list:
    if case.tokens is not None:
        return [torch.tensor(t, dtype=torch.long) for t in case.tokens]
    g = torch.Generator().manual_seed(case.seed * 7919 + 17)
    return [torch.randint(0, case.config.vocab_size, (n,), generator=g) for n in case.seq_lens]


TINY = Case(
    name="tiny",
    description="4 layers (sliding, CSA, HCA m=16, CSA), hash routing on layers 0-1, window 16, "
                "top-4 of up to 16 compressed entries, two sequences (64 and 41 tokens)",
    config=ModelConfig(
        name="tiny", vocab_size=512, hidden_size=64, num_layers=4, num_heads=4, head_dim=32, rope_dim=8,
        q_lora_rank=32, o_groups=2, o_lora_rank=32, window=16, compress_ratios=(0, 4, 16, 4, 0),
        n_routed_experts=16, moe_inter_dim=32, route_scale=2.5, index_n_heads=8, index_head_dim=32,
        index_topk=4, num_hash_layers=2,
    ),
    seed=20260424,
    seq_lens=(64, 41),
    # 3 prompts crossing the window (16) and HCA blocks (16), chunks of 10 split both block sizes
    # (4 and 16); 16 decode steps cross 4 CSA blocks and an HCA block boundary
    schedule=Schedule(prompt_lens=(40, 29, 22), decode_steps=16, chunk=10),
)


def _slice_config(name: str, hidden: int, q_lora: int, ratios: tuple[int, ...], route_scale: float) -> ModelConfig:
    # Real widths where they matter for kernels (hidden, head_dim 512, rope 64, hc 4, q_lora,
    # 8 heads x 512 per output group, o_lora 1024, indexer head 128, window 128, HCA m = 128);
    # few heads / experts and a narrow expert width so it runs on a CPU.
    return ModelConfig(
        name=name, vocab_size=1024, hidden_size=hidden, num_layers=2, num_heads=16, q_lora_rank=q_lora,
        o_groups=2, o_lora_rank=1024, compress_ratios=ratios + (0,), n_routed_experts=8, moe_inter_dim=256,
        route_scale=route_scale, index_n_heads=16, index_topk=16, num_hash_layers=1,
    )


FLASH_SLICE = Case(
    name="flash-slice",
    description="V4-Flash widths (hidden 4096), layer 0 CSA + layer 1 HCA (m=128), 300 tokens",
    config=_slice_config("flash-slice", 4096, 1024, (4, 128), 1.5),
    seed=20260425,
    seq_lens=(300,),
)

PRO_SLICE = Case(
    name="pro-slice",
    description="V4-Pro widths (hidden 7168), layer 0 HCA (m=128) + layer 1 CSA, 300 tokens",
    config=_slice_config("pro-slice", 7168, 1536, (128, 4), 2.5),
    seed=20260426,
    seq_lens=(300,),
)


def _engine_config(name: str, hidden: int, q_lora: int, ratios: tuple[int, ...], route_scale: float) -> ModelConfig:
    # What vLLM's CPU DeepSeek V4 kernels accept (docs/engines.md): head_dim 512, 64 routed
    # experts top-6, index_topk 512 (its top-k kernel is fixed at 512), a sliding-only layer
    # first (its metadata builder expects one). Narrow experts (256) keep it CPU-sized.
    return ModelConfig(
        name=name, vocab_size=1024, hidden_size=hidden, num_layers=3, num_heads=16, q_lora_rank=q_lora,
        o_groups=2, o_lora_rank=1024, compress_ratios=ratios + (0,), n_routed_experts=64, moe_inter_dim=256,
        route_scale=route_scale, index_n_heads=16, index_topk=512, num_hash_layers=1,
        num_mtp_layers=0,  # vLLM's CPU model loads no MTP block
    )


# > 2048 tokens: a CSA layer has > 512 compressed entries, so the indexer really prunes
ENGINE_SEQ_LENS = (2112,)
# served (compare's default schedule): three prompts past the 128-token window and several HCA
# blocks, a 250-token scheduler budget that splits CSA (4) and HCA (128) blocks and mixes
# sequences in one pass, 16 decode steps crossing CSA block boundaries. Shorter than the prefill
# prompt (the float64 reference and the noise model run on every decoded token): the indexer
# prunes only in the prefill-only compare. Staggered: the second prompt arrives after the
# engine's first pass, the third after its third, so new prefills share steps with decodes.
ENGINE_SCHEDULE = Schedule(prompt_lens=(640, 320, 160), decode_steps=16, chunk=250, arrivals=(0, 1, 3))

FLASH_ENGINE = Case(
    name="flash-engine",
    description="V4-Flash widths (hidden 4096) for real engines: sliding + CSA + HCA (m=128), "
                "hash-routed layer 0, 64 experts top-6, index_topk 512, FP8-exact weights, 2112 tokens",
    config=_engine_config("flash-engine", 4096, 1024, (0, 4, 128), 1.5),
    seed=20260501,
    seq_lens=ENGINE_SEQ_LENS,
    weight_format="fp8",
    schedule=ENGINE_SCHEDULE,
)

PRO_ENGINE = Case(
    name="pro-engine",
    description="V4-Pro widths (hidden 7168) for real engines: sliding + HCA (m=128) + CSA, "
                "hash-routed layer 0, 64 experts top-6, index_topk 512, FP8-exact weights, 2112 tokens",
    config=_engine_config("pro-engine", 7168, 1536, (0, 128, 4), 2.5),
    seed=20260502,
    seq_lens=ENGINE_SEQ_LENS,
    weight_format="fp8",
    schedule=ENGINE_SCHEDULE,
)

# Release-format cases (`corruptcheck checkpoint`, `corruptcheck check`): weights exactly as a V4
# release stores them (FP8 linears, MXFP4 routed experts), so a checkpoint written in that format
# holds the reference's numbers and a dump of the case checks clean against it.
TINY_RELEASE = Case(
    name="tiny-release",
    description="tiny's model with release-exact weights (FP8 linears, MXFP4 experts): the checkpoint "
                "reader and `check` at test size",
    config=TINY.config.replace(name="tiny-release"),
    seed=20260601,
    seq_lens=(64, 41),
    weight_format="release",
    golden=False,
)

PRO_RELEASE = Case(
    name="pro-release",
    description="V4-Pro's real layer shapes (hidden 7168, 128 heads, q_lora 1536, 16 output groups, indexer "
                "64 x 128, experts 3072 wide), release-exact weights; 3 layers (HCA, HCA, CSA), 8 routed "
                "experts top-6 and a 8192-token vocabulary so it fits one machine; 512 tokens",
    config=ModelConfig(
        name="pro-release", vocab_size=8192, hidden_size=7168, num_layers=3, num_heads=128, q_lora_rank=1536,
        o_groups=16, o_lora_rank=1024, compress_ratios=(128, 128, 4, 0), n_routed_experts=8, moe_inter_dim=3072,
        route_scale=2.5, index_n_heads=64, index_topk=1024, num_hash_layers=2, num_mtp_layers=0,
    ),
    seed=20260602,
    seq_lens=(512,),
    weight_format="release",
    golden=False,
)

CASES = {c.name: c for c in (TINY, FLASH_SLICE, PRO_SLICE, FLASH_ENGINE, PRO_ENGINE, TINY_RELEASE, PRO_RELEASE)}
DEFAULT_CASE = "tiny"


def get_case(name: str) -> Case:
    try:
        return CASES[name]
    except (KeyError, TypeError):
        raise BadInput(f"unknown case {name!r}; known cases: {', '.join(CASES)}") from None

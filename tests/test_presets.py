"""Published configuration values (docs/v4-spec.md §1.1, §1.3)."""
import pytest

from corruptcheck.reference import PRESETS, V4_FLASH, V4_PRO, ModelConfig


def test_flash_schedule():
    assert len(V4_FLASH.compress_ratios) == 44
    kinds = [V4_FLASH.layer_type(i) for i in range(43)]
    assert kinds[:2] == ["sliding", "sliding"]
    assert kinds.count("csa") == 21 and kinds.count("hca") == 20
    assert V4_FLASH.layer_type(42) == "csa" and V4_FLASH.layer_type(43) == "sliding"  # MTP


def test_pro_schedule():
    assert len(V4_PRO.compress_ratios) == 62
    kinds = [V4_PRO.layer_type(i) for i in range(61)]
    assert kinds[:3] == ["hca", "hca", "csa"]
    assert kinds.count("csa") == 30 and kinds.count("hca") == 31 and "sliding" not in kinds
    assert V4_PRO.layer_type(61) == "sliding"


@pytest.mark.parametrize("cfg,hidden,heads,qlora,groups,experts,inter,scale,topk", [
    (V4_FLASH, 4096, 64, 1024, 8, 256, 2048, 1.5, 512),
    (V4_PRO, 7168, 128, 1536, 16, 384, 3072, 2.5, 1024),
])
def test_published_values(cfg, hidden, heads, qlora, groups, experts, inter, scale, topk):
    assert (cfg.hidden_size, cfg.num_heads, cfg.q_lora_rank, cfg.o_groups) == (hidden, heads, qlora, groups)
    assert (cfg.n_routed_experts, cfg.moe_inter_dim, cfg.route_scale, cfg.index_topk) == (experts, inter, scale, topk)
    assert (cfg.head_dim, cfg.rope_dim, cfg.o_lora_rank, cfg.window, cfg.vocab_size) == (512, 64, 1024, 128, 129280)
    assert (cfg.rope_theta, cfg.compress_rope_theta, cfg.yarn_factor, cfg.yarn_original_max_pos) == (
        10000, 160000, 16, 65536)
    assert (cfg.hc_mult, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.swiglu_limit, cfg.num_hash_layers) == (
        4, 20, 1e-6, 10.0, 3)
    assert (cfg.index_n_heads, cfg.index_head_dim, cfg.experts_per_tok, cfg.rms_eps) == (64, 128, 6, 1e-6)
    assert cfg.num_heads // cfg.o_groups == 8
    assert PRESETS[cfg.name] is cfg


def test_config_round_trip_and_validation():
    assert ModelConfig.from_dict(V4_PRO.to_dict()) == V4_PRO
    with pytest.raises(ValueError):
        V4_PRO.replace(compress_ratios=V4_PRO.compress_ratios[:-1])
    with pytest.raises(ValueError):
        ModelConfig.from_dict({**V4_PRO.to_dict(), "bogus": 1})

"""Each place where transformers 5.24.0 and the official DeepSeek semantics differ, shown
(docs/divergences.md has the table and says which side the reference takes)."""
import pytest
import torch

from corruptcheck.judge.reference_data import reference_run
from corruptcheck.reference import V4_PRO, run

transformers = pytest.importorskip("transformers")
from corruptcheck.engines.hf import run_hf  # noqa: E402
from corruptcheck.engines.hf_model import build_model, export_state_dict  # noqa: E402


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_d1_fallback_schedule_has_wrong_parity_for_pro():
    conf = transformers.DeepseekV4Config(num_hidden_layers=61)
    assert conf.layer_types[2] == "heavily_compressed_attention"  # transformers' default
    assert V4_PRO.layer_type(2) == "csa"  # the released Pro list: layer 2 is CSA
    # the hf engine always passes the explicit schedule
    from corruptcheck.engines.hf_model import hf_config
    from corruptcheck.cases import get_case

    cfg = get_case("pro-slice").config
    assert hf_config(cfg).layer_types == ["heavily_compressed_attention", "compressed_sparse_attention"]


def test_d2_mtp_is_not_implemented(tiny, tiny_hf32):
    params = tiny.params()
    assert any(k.startswith("mtp.0.") for k in params)
    assert not any("mtp" in k for k in export_state_dict(tiny.config, params))
    assert not any(k.startswith("mtp.") for k in tiny_hf32)
    points, _ = reference_run(tiny)
    assert points["mtp.0.logits"].shape == (tiny.num_tokens - len(tiny.seq_lens), tiny.config.vocab_size)


def test_d3_qat_sims_absent_in_transformers(tiny, tiny_hf32):
    """The demo's FP8 KV / FP4+Hadamard indexer sims: off in the reference's default target
    (agrees with transformers), on with sims=True (then transformers is ~1e-2 away)."""
    plain = run(tiny.config, tiny.params(), tiny.sequences(), "float64").points
    sims = run(tiny.config, tiny.params(), tiny.sequences(), "float64", sims=True).points
    kv_plain, kv_sims = plain["layers.0.attn.kv"], sims["layers.0.attn.kv"]
    assert torch.equal(kv_plain[..., -8:], kv_sims[..., -8:])  # rope dims are never rounded
    assert 1e-3 < _rel(kv_sims[..., :-8], kv_plain[..., :-8]) < 0.1  # e4m3 rounding of nope dims
    assert _rel(tiny_hf32["layers.0.attn.out"], plain["layers.0.attn.out"]) < 1e-5
    assert _rel(tiny_hf32["layers.0.attn.out"], sims["layers.0.attn.out"]) > 1e-3


def test_d4_padding_leaks_into_compressor(tiny):
    """transformers#45938: in a left-padded batch the pad tokens enter compressed entries and
    shift positions, so a sequence's outputs change; the reference (and the hf engine) run each
    sequence unpadded."""
    model = build_model(tiny, "float32")
    long_ids, short_ids = tiny.sequences()
    pad = long_ids.shape[0] - short_ids.shape[0]
    with torch.no_grad():
        solo = model(input_ids=short_ids[None], use_cache=False).logits[0]
        batch_ids = torch.stack([long_ids, torch.cat([torch.zeros(pad, dtype=torch.long), short_ids])])
        mask = torch.stack([torch.ones_like(long_ids), torch.cat([torch.zeros(pad), torch.ones_like(short_ids)])])
        padded = model(input_ids=batch_ids, attention_mask=mask.long(), use_cache=False).logits[1, pad:]
    assert _rel(padded, solo) > 1e-2


def test_d5_router_logits_in_activation_dtype(tiny):
    """Precision only: transformers' router runs F.linear in the hidden dtype (bf16 logits in a
    bf16 model); the demo and the reference compute router logits in fp32."""
    hf = run_hf(tiny, "bfloat16")
    ref = run(tiny.config, tiny.params(), tiny.sequences(), "bfloat16").points
    assert hf["layers.2.moe.router_logits"].dtype == torch.bfloat16
    assert ref["layers.2.moe.router_logits"].dtype == torch.float32


def test_d6_rope_cos_sin_rounded_to_activation_dtype(tiny):
    """Precision only: transformers returns cos/sin in the activation dtype (bf16); the demo
    multiplies by its fp32 table."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding

    from corruptcheck.engines.hf_model import hf_config

    rot = DeepseekV4RotaryEmbedding(hf_config(tiny.config))
    x = torch.zeros(1, 4, 8, dtype=torch.bfloat16)
    cos, _ = rot(x, torch.arange(4)[None], layer_type="compress")
    assert cos.dtype == torch.bfloat16


def test_d7_rope_tables_match_exactly(tiny):
    """Not a divergence: transformers' inv_freq for both tables equals the reference's fp32
    table bit for bit (YaRN pair-index quirk included)."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding

    from corruptcheck.engines.hf_model import hf_config
    from corruptcheck.reference.model import rope_tables

    for cfg in (tiny.config, V4_PRO):
        rot = DeepseekV4RotaryEmbedding(hf_config(cfg))
        ours = rope_tables(cfg)
        assert torch.equal(rot.main_inv_freq, ours["main"])
        assert torch.equal(rot.compress_inv_freq, ours["compress"])


def test_d8_transformers_519_norm_returns_fp32():
    """transformers < 5.24: an fp32-kept DeepseekV4RMSNorm hands fp32 to the next bf16 Linear."""
    from packaging.version import Version

    from corruptcheck.engines.hf_model import norm_returns_input_dtype
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RMSNorm

    norm = DeepseekV4RMSNorm(8)  # fp32 weight, as `_keep_in_fp32_modules_strict` keeps it
    out = norm(torch.randn(2, 8).to(torch.bfloat16))
    old = Version(transformers.__version__) < Version("5.24")
    assert (out.dtype == torch.float32) == old
    assert norm_returns_input_dtype() == (not old)
    if old:
        with pytest.raises(RuntimeError, match="same dtype"):
            torch.nn.Linear(8, 4).to(torch.bfloat16)(out)

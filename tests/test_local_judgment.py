"""Sharper teacher-forced judgments (docs/tolerances.md, Localization): the FFN sub-block run on
the engine's own expert choices, local noise measured on the reference's choices, per-token
local bounds, and `--teacher-forcing always` failing a point on its local excess. Each one is
checked for what it catches and for staying silent on honest engines."""
import pytest
import torch

from corruptcheck.cases import get_case
from corruptcheck.compare import compare
from corruptcheck.engines.hf import OutputPatch
from corruptcheck.judge.localize import teacher_force
from corruptcheck.judge.noise import measure
from corruptcheck.judge.teacher_forcing import choice_dependent
from corruptcheck.reference import run
from corruptcheck.reference.model import run_part
from corruptcheck.judge.reference_data import noise_for, reference_for

LEARNED_FFN = "layers.2"  # tiny: layers 0 and 1 are hash-routed, 2 and 3 learn their routing


@pytest.fixture(scope="module")
def ref(tiny):
    return reference_for(tiny)


def _ffn(tiny, ref, experts=None):
    return run_part(tiny.config, tiny.params(), "ffn", 2, ref.points[f"{LEARNED_FFN}.ffn_hc.in"], tiny.sequences(),
                    "float64", experts=experts)


def test_given_choices_equal_to_the_routers_own_change_nothing(tiny, ref):
    own = _ffn(tiny, ref)
    same = _ffn(tiny, ref, ref.points[f"{LEARNED_FFN}.moe.experts"])
    for name in own:
        assert torch.equal(own[name], same[name]), name


def test_a_given_choice_changes_only_its_tokens_output_and_is_recorded_as_the_routers(tiny, ref):
    ids = ref.points[f"{LEARNED_FFN}.moe.experts"].clone()
    row = 7
    spare = next(e for e in range(tiny.config.n_routed_experts) if e not in ids[row].tolist())
    ids[row, 0] = spare
    got = _ffn(tiny, ref, ids)
    own = _ffn(tiny, ref)
    assert torch.equal(got[f"{LEARNED_FFN}.moe.experts"], own[f"{LEARNED_FFN}.moe.experts"])  # the router's choice
    diff = (got[f"{LEARNED_FFN}.moe.out"] - own[f"{LEARNED_FFN}.moe.out"]).abs().amax(-1)
    assert diff[row] > 1e-3 and int((diff > 0).sum()) == 1


def test_malformed_given_rows_keep_the_routers_choice(tiny, ref):
    ids = ref.points[f"{LEARNED_FFN}.moe.experts"].clone()
    ids[3] = -1  # names no expert
    ids[5, 1] = ids[5, 0]  # an expert twice
    ids[9, 0] = tiny.config.n_routed_experts  # past the last expert
    got, own = _ffn(tiny, ref, ids), _ffn(tiny, ref)
    assert torch.equal(got[f"{LEARNED_FFN}.moe.out"], own[f"{LEARNED_FFN}.moe.out"])
    wrong_shape = _ffn(tiny, ref, ids[:, :2])
    assert torch.equal(wrong_shape[f"{LEARNED_FFN}.moe.out"], own[f"{LEARNED_FFN}.moe.out"])


def test_hash_layers_never_take_given_choices(tiny, ref):
    assert not choice_dependent(tiny.config, "ffn", 0) and not choice_dependent(tiny.config, "attn", 2)
    assert choice_dependent(tiny.config, "ffn", 2) and choice_dependent(tiny.config, "ffn", "mtp.0")
    ids = ref.points["layers.0.moe.experts"].roll(1, 0)
    out = run_part(tiny.config, tiny.params(), "ffn", 0, ref.points["layers.0.ffn_hc.in"], tiny.sequences(),
                   "float64", experts=ids)
    assert torch.equal(out["layers.0.moe.out"], ref.points["layers.0.moe.out"].to(out["layers.0.moe.out"].dtype)) or \
        torch.allclose(out["layers.0.moe.out"], ref.points["layers.0.moe.out"], rtol=0, atol=1e-12)


def test_local_noise_on_the_references_choices_is_arithmetic_only(tiny, ref):
    """bf16 honest runs flip near-tie experts; on the reference's choices the learned-routing
    MoE's local noise is the bf16 arithmetic, 4x lower on the point and >= 10x per token
    (measured on tiny: 2.74e-2 -> 6.6e-3, per token 0.354 -> 9.7e-3)."""
    n = measure(tiny, ref.points, "bfloat16")
    for name in ("layers.2.moe.out", "layers.3.moe.out", "mtp.0.moe.out"):
        cond, own = n["local"][name], n["local_own_choice"][name]
        assert cond["rel_l2"] < 0.01 and cond["token_rel"] < 0.02, (name, cond)
        assert own["rel_l2"] > 2 * cond["rel_l2"] and own["token_rel"] > 10 * cond["token_rel"], (name, own, cond)
    assert "layers.0.moe.out" not in n["local_own_choice"]  # hash-routed: no choice to flip


def test_teacher_forcing_runs_the_engines_choices_and_falls_back_without_them(tiny, ref):
    cap = run(tiny.config, tiny.params(), tiny.sequences(), "bfloat16").points
    noise, _ = noise_for(tiny, ref, "bfloat16")
    local = teacher_force(tiny, cap, "bfloat16", noise)
    assert local["layers.2.moe.out"].get("on_engine_choices") and local["layers.2.moe.out"]["verdict"] == "pass"
    assert "on_engine_choices" not in local["layers.0.moe.out"]  # hash-routed
    tol_on_choices = local["layers.2.moe.out"]["tolerance"]["value"]
    without = teacher_force(tiny, {k: v for k, v in cap.items() if not k.endswith("moe.experts")}, "bfloat16", noise)
    assert "on_engine_choices" not in without["layers.2.moe.out"] and without["layers.2.moe.out"]["verdict"] == "pass"
    assert without["layers.2.moe.out"]["tolerance"]["value"] >= tol_on_choices


def _mix(layer: int, a: float) -> OutputPatch:
    """layers.<layer>.moe.out + a x its own channels reversed: an error that keeps the norm."""
    return OutputPatch(f"model.layers.{layer}.mlp", lambda t: t + a * t.flip(-1), label=f"mix moe.out {a}")


@pytest.mark.usefixtures("transformers")
def test_always_judges_a_local_excess_the_free_tolerance_lets_through(tiny):
    """An 8% error made in layers.3's MoE sits under that point's free-running tolerance
    (drift-sized: err/tol 0.34) but is 4x its local one: `on-fail` passes it, `always` fails the
    compare there and names it the culprit."""
    missed = compare(tiny, "hf", "bfloat16", teacher_forcing="on-fail", patches=[_mix(3, 0.08)]).report
    assert missed.verdict == "pass"
    caught = compare(tiny, "hf", "bfloat16", teacher_forcing="always", patches=[_mix(3, 0.08)]).report
    assert caught.verdict == "fail" and caught.culprit.name == "layers.3.moe.out"
    p = next(x for x in caught.points if x.name == "layers.3.moe.out")
    assert p.verdict == "fail" and p.reason.startswith("teacher-forced") and p.ratio > 3
    assert caught.first_divergence["name"] == "layers.3.moe.out"


@pytest.mark.usefixtures("transformers")
def test_a_one_token_error_fails_per_token_when_teacher_forced(tiny):
    """One token of layers.2.moe.out off by 8%: the whole point's rel_l2 moves little, its
    worst token fails the local per-token bound."""
    def one_token(t):
        t = t.clone()
        t[..., 11, :] *= 1.08
        return t
    rep = compare(tiny, "hf", "bfloat16", teacher_forcing="always",
                  patches=[OutputPatch("model.layers.2.mlp", one_token, label="one token")]).report
    p = next(x for x in rep.points if x.name == "layers.2.moe.out")
    assert p.local["verdict"] == "fail" and "token 11" in p.local["reason"], p.local
    assert p.local["rel_l2"] < p.local["tolerance"]["value"]  # the whole point alone would pass
    assert rep.culprit.name == "layers.2.moe.out"

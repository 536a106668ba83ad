"""The fault registry (docs/faults.md): named re-enactments of real bugs, patches that only live for
an engine run, triggers that agree with what the run did, and the same fault in both engines."""
import re

import pytest
import torch

from corruptcheck.cases import get_case
from corruptcheck.compare import compare
from corruptcheck.engines import get_engine
from corruptcheck.errors import BadInput
from corruptcheck.faults import FaultState, FaultyEngine, faults_for, get_fault, hf_module

FAULTS = faults_for("hf")  # the model faults (hf and reference implement the same ones)
from corruptcheck.reference import attention, compressor, mhc, model, moe

REQUIRED = {  # the bugs the self-test must re-enact -> registry name
    "7168 hidden-size guard": "mhc-pre-hidden-guard",
    "tile-remainder drop in one GEMM": "router-split-k-tail",
    "sqrt2 RMSNorm scale": "mhc-norm-sqrt2",
    "missing SwiGLU clamp on the shared expert": "shared-expert-no-clamp",
    "routing weights from bias-corrected scores": "routing-weights-biased",
    "YaRN on a sliding-window layer": "yarn-on-sliding",
    "wrong Sinkhorn iteration count": "sinkhorn-19-iters",
    "CSA compressor loses the previous window's half": "csa-prev-window-lost",
    "indexer RoPE layout swapped": "indexer-rope-neox",
    "sliding-window off-by-one": "window-off-by-one",
}


def test_registry_covers_the_issue():
    assert len(FAULTS) >= 12
    assert len({f.klass for f in FAULTS.values()}) >= 8
    assert set(REQUIRED.values()) <= set(FAULTS)
    for name, f in FAULTS.items():
        assert f.name == name and re.fullmatch(r"[a-z0-9-]+", name)
        assert re.fullmatch(r"A([1-9]|1[0-2])", f.klass), name
        doc = type(f).__doc__
        # the docstring names the real bug (catalog id), its class, where it strikes and the trigger
        assert f.klass in doc and "Strikes" in doc and "Trigger" in doc, name
        assert any(part.strip().split(" ")[0] in doc for part in f.catalog.split(",")), name
        assert f.points and f.summary and f.trigger
        assert f.describe().split("\t")[0] == name


def test_get_fault_unknown():
    with pytest.raises(BadInput, match="unknown fault"):
        get_fault("no-such-fault")


def _snapshot():
    mods = [hf_module(), model, attention, compressor, mhc, moe]
    classes = [v for v in vars(hf_module()).values() if isinstance(v, type) and v.__module__ == hf_module().__name__]
    return {id(o): dict(vars(o)) for o in mods + classes + [torch.nn.Linear]}


@pytest.mark.usefixtures("transformers")  # the snapshot covers transformers' classes
@pytest.mark.parametrize("engine", ["hf", "reference"])
@pytest.mark.parametrize("name", list(FAULTS))
def test_patches_are_restored_even_on_error(name, engine):
    cfg = get_case("pro-slice").config
    before = _snapshot()
    with pytest.raises(RuntimeError, match="boom"):
        with FAULTS[name].active(engine, cfg, FaultState()):
            assert _snapshot() != before  # something is patched while active
            raise RuntimeError("boom")
    after = _snapshot()
    assert after.keys() == before.keys()
    for key, attrs in before.items():
        assert after[key].keys() == attrs.keys()
        assert all(after[key][a] is v for a, v in attrs.items())


def test_fault_needs_a_known_engine():
    with pytest.raises(BadInput, match="no implementation for engine"):
        with FAULTS["mhc-norm-sqrt2"].active("dump", get_case("tiny").config, FaultState()):
            pass


@pytest.fixture(scope="module")
def tiny_clean(transformers):
    case = get_case("tiny")
    return {e: get_engine(e).run(case, "float32").points for e in ("hf", "reference")}


@pytest.fixture(scope="module")
def tiny_faulty(transformers):
    """(fault name, engine) -> (points, state) on tiny, float32."""
    case = get_case("tiny")
    out = {}
    for name, fault in FAULTS.items():
        for e in ("hf", "reference"):
            eng = FaultyEngine(get_engine(e), fault)
            out[name, e] = (eng.run(case, "float32").points, eng.state)
    return out


@pytest.mark.parametrize("engine", ["hf", "reference"])
def test_static_trigger_agrees_with_the_run(tiny_faulty, engine):
    case = get_case("tiny")
    for name, fault in FAULTS.items():
        _, state = tiny_faulty[name, engine]
        static = fault.triggered(case.config, case.seq_lens, engine)
        if static is False:
            assert state.fired == 0 and state.where is None, name
        else:
            assert state.fired > 0 and state.where, name
    # width-triggered faults never fire on tiny (hidden 64), the others all do
    assert {n for n in FAULTS if tiny_faulty[n, engine][1].fired == 0} == {"mhc-pre-hidden-guard",
                                                                          "router-split-k-tail"}


def test_width_triggers():
    guard, tail = get_fault("mhc-pre-hidden-guard"), get_fault("router-split-k-tail")
    for hidden, fires_guard, fires_tail in ((64, False, False), (4096, False, False), (5120, True, True),
                                            (6144, True, False), (7168, True, True)):
        cfg = get_case("pro-slice").config.replace(hidden_size=hidden)
        assert guard.triggered(cfg, (300,), "hf") is fires_guard, hidden
        assert tail.triggered(cfg, (300,), "hf") is fires_tail, hidden
    assert tail.kept(7168) == 6144  # 112 tiles of 64, 3 per split x 32 splits: 16 tiles dropped


def test_a_fault_changes_the_engine_only_inside_the_run(tiny_clean, tiny_faulty):
    for e in ("hf", "reference"):
        faulty, _ = tiny_faulty["mhc-norm-sqrt2", e]
        assert not torch.equal(faulty["layers.0.attn_norm"], tiny_clean[e]["layers.0.attn_norm"])
        again = get_engine(e).run(get_case("tiny"), "float32").points
        assert torch.equal(again["logits"], tiny_clean[e]["logits"])


def test_teacher_forcing_and_golden_stay_honest(transformers):
    """compare runs the reference (golden, teacher forcing) outside the fault: the faulty
    engine fails and the very next honest compare passes."""
    case = get_case("tiny")
    rep = compare(case, "hf", "float32", engine=FaultyEngine(get_engine("hf"), get_fault("window-off-by-one"))).report
    assert rep.verdict == "fail" and rep.culprit.name == "layers.0.attn.core"
    assert rep.engine_info["fault"] == "window-off-by-one" and rep.engine_info["fault_fired"] > 0
    assert compare(case, "hf", "float32").report.verdict == "pass"


def test_hf_and_reference_reenact_the_same_fault(tiny_clean, tiny_faulty):
    """At the layer where it strikes, the hf fault and the reference fault give the same
    numbers up to float32 noise (2% of the fault's own effect)."""
    _same_in_both_engines(tiny_clean, tiny_faulty)


def _same_in_both_engines(tiny_clean, faulty):
    for name in FAULTS:
        if (name, "hf") not in faulty:
            continue
        (h, hs), (r, rs) = faulty[name, "hf"], faulty[name, "reference"]
        assert hs.where == rs.where, name
        if hs.where is None:
            continue
        clean = tiny_clean["reference"]
        compared = 0
        for n, t in h.items():
            if not n.startswith(hs.where + ".") or n not in r:
                continue
            if not t.is_floating_point():
                assert torch.equal(t, r[n]), n
                continue
            effect = (r[n].double() - clean[n].double()).norm()
            if effect <= 1e-5 * r[n].double().norm():  # no strike here, and none in hf either
                assert (t.double() - tiny_clean["hf"][n].double()).norm() <= 1e-5 * t.double().norm(), (name, n)
                continue
            assert (t.double() - r[n].double()).norm() <= 0.02 * effect, (name, n)
            compared += 1
        assert compared, name


# --- magnitude knobs (docs/faults.md §Magnitude knobs) ------------------------------------------

def _firing_on_tiny(name):
    """The registry fault, made to fire on tiny (hidden 64) where its real trigger is a width:
    the mHC kernel compiled for 32 channels, the router's split-K over 2-wide tiles in 30 splits
    (32 tiles: the last 2 dropped)."""
    f = FAULTS[name].at(1.0)
    if name == "mhc-pre-hidden-guard":
        f.compiled_hidden = 32
    elif name == "router-split-k-tail":
        f.block_k, f.splits = 2, 30
    return f


def _strike_point(fault, where, points, cfg):
    """selftest's strike point: the first exposed candidate, for a discrete one the next float
    point of its sub-block."""
    from types import SimpleNamespace

    from corruptcheck.points import capture_points
    from corruptcheck.selftest.runner import _effect_point, expected_point

    specs = capture_points(cfg)
    seen = {s.name: SimpleNamespace(kind=s.kind, verdict="pass" if s.name in points else "missing") for s in specs}
    return _effect_point(expected_point(fault, where, seen), [s.name for s in specs], seen)


@pytest.fixture(scope="module")
def tiny_knobs(transformers):
    """(fault name, engine) -> {m: (points, state)} on tiny, float32, every fault made to fire."""
    case = get_case("tiny")
    out = {}
    for name in FAULTS:
        for e in ("hf", "reference"):
            runs = {}
            for m in (0.0, 0.1, 0.3, 1.0):
                eng = FaultyEngine(get_engine(e), _firing_on_tiny(name).at(m))
                runs[m] = (eng.run(case, "float32").points, eng.state)
            out[name, e] = runs
    return out


def test_at_is_a_copy_at_a_magnitude():
    f = get_fault("window-off-by-one")
    half = f.at(0.5)
    assert half is not f and half.magnitude == 0.5 and f.magnitude == 1.0 and FAULTS[f.name] is f
    assert FaultyEngine(get_engine("reference"), half).name == "reference+window-off-by-one@0.5"
    assert FaultyEngine(get_engine("reference"), f).name == "reference+window-off-by-one"
    for bad in (-0.1, 1.5, float("nan"), "x"):
        with pytest.raises(BadInput, match="magnitude"):
            f.at(bad)


def test_one_registry_and_its_views():
    """Every fault is registered once, by its name; the views by engine and kind partition it."""
    from corruptcheck.faults import FAULTS as ALL, LLAMACPP_FAULTS, MODEL_FAULTS, SERVING_FAULTS, VLLM_FAULTS

    assert list(ALL) == [f.name for f in (*MODEL_FAULTS, *SERVING_FAULTS, *VLLM_FAULTS, *LLAMACPP_FAULTS)]
    assert all(ALL[name].name == name and get_fault(name) is ALL[name] for name in ALL)
    views = [faults_for(e, served) for e in ("hf", "reference", "vllm", "llamacpp") for served in (False, True)]
    assert set().union(*views) == set(ALL)
    assert list(faults_for("hf", served=True)) == [f.name for f in SERVING_FAULTS if "hf" in f.engines]
    assert [f.name for f in MODEL_FAULTS] == list(FAULTS) and all(not f.served for f in MODEL_FAULTS)
    assert faults_for("no-such-engine") == {}


def test_every_fault_names_its_knob():
    from corruptcheck.faults import FAULTS as ALL

    for f in ALL.values():
        assert f.knob and "m" in f.knob and "\n" not in f.knob, f.name
        assert f.describe().endswith(f"knob m: {f.knob}")


@pytest.mark.parametrize("engine", ["hf", "reference"])
def test_magnitude_one_is_the_bug_and_zero_the_clean_engine(tiny_clean, tiny_faulty, tiny_knobs, engine):
    """m = 1 is the registered fault bit for bit, m = 0 the clean engine bit for bit (the
    patches still run: the fault fires, computing the clean result)."""
    for name in FAULTS:
        runs = tiny_knobs[name, engine]
        one, zero = runs[1.0][0], runs[0.0][0]
        assert runs[0.0][1].fired > 0, name
        assert all(torch.equal(zero[n], tiny_clean[engine][n]) for n in zero), name
        if name in ("mhc-pre-hidden-guard", "router-split-k-tail"):  # narrowed: the registry's does not fire on tiny
            continue
        reg, _ = tiny_faulty[name, engine]
        assert all(torch.equal(one[n], reg[n]) for n in reg), name


@pytest.mark.parametrize("engine", ["hf", "reference"])
def test_effect_grows_with_the_magnitude(tiny_clean, tiny_knobs, engine):
    """rel_l2 of the faulty capture against the clean one, at the fault's strike point, is
    non-decreasing over m = 0.1, 0.3, 1 (and positive at m = 1)."""
    from corruptcheck.judge.metrics import float_metrics

    cfg = get_case("tiny").config
    for name in FAULTS:
        runs = tiny_knobs[name, engine]
        points, state = runs[1.0]
        point = _strike_point(FAULTS[name], state.where, points, cfg)
        assert point, name
        effect = [float_metrics(runs[m][0][point], tiny_clean[engine][point])["rel_l2"] for m in (0.1, 0.3, 1.0)]
        assert effect[2] > 0 and effect == sorted(effect), (name, point, effect)


def test_hf_and_reference_agree_below_magnitude_one(tiny_clean, tiny_knobs):
    """At m = 0.3 too, the hf knob and the reference knob are the same fault."""
    _same_in_both_engines(tiny_clean, {key: runs[0.3] for key, runs in tiny_knobs.items()})


def test_lerp_and_affected():
    from corruptcheck.engines.patching import lerp
    from corruptcheck.faults.base import affected

    a, b = torch.tensor([1.0, 2.0], dtype=torch.bfloat16), torch.tensor([3.0, -2.0], dtype=torch.bfloat16)
    assert lerp(a, b, 0) is a and lerp(a, b, 1) is b
    assert lerp(a, b, 0.5).tolist() == [2.0, 0.0] and lerp(a, b, 0.5).dtype == torch.bfloat16
    assert lerp((a, 1.0), (b, 3.0), 0.25)[1] == 1.5
    with pytest.raises(TypeError, match="discrete"):
        lerp(torch.tensor([1]), torch.tensor([2]), 0.5)
    idx = torch.arange(1000)
    assert not affected(idx, 0).any() and affected(idx, 1).all()
    for lo, hi in ((0.1, 0.3), (0.3, 0.7), (0.01, 0.02)):
        small, big = affected(idx, lo), affected(idx, hi)
        assert not (small & ~big).any()  # nested
        assert abs(float(big.float().mean()) - hi) < 0.01  # evenly spread


def test_serving_knobs_arithmetic():
    """The served faults patch stateful cache code: their knobs act inside the patch."""
    from corruptcheck.faults.serving import (DecodeKernelScale, drop_oldest, restarted_positions, row_scaled,
                                             wrapped_oldest)

    buf = torch.arange(10.0).view(1, 5, 2)
    assert drop_oldest(buf, 1) is None and torch.equal(drop_oldest(buf, 0), buf)
    assert torch.equal(drop_oldest(buf, 0.4), buf[:, 2:])
    pos, start = torch.tensor([0, 7, 8, 9]), torch.tensor([0, 6, 6, 6])
    shift = torch.tensor([False, True, True, True])
    assert restarted_positions(pos, start, shift, 1).tolist() == [0, 1, 2, 3]
    assert restarted_positions(pos, start, shift, 0).tolist() == [0, 7, 8, 9]
    assert restarted_positions(pos, start, shift, 0.5).tolist() == [0, 4, 5, 6]
    keys = torch.arange(24.0).view(1, 2, 4, 3)
    assert torch.equal(wrapped_oldest(keys, 1)[:, :, 0], keys[:, :, -1])
    assert torch.equal(wrapped_oldest(keys, 0), keys)
    assert torch.equal(wrapped_oldest(keys, 0.5)[:, :, 0], (keys[:, :, 0] + keys[:, :, -1]) / 2)
    assert torch.equal(wrapped_oldest(keys, 0.5)[:, :, 1:], keys[:, :, 1:])
    o = torch.tensor([[2.0, -1.0], [4.0, 0.5], [1.0, 1.0]])
    out = torch.ones(4, 2)
    assert row_scaled(out, o, 3, 1)[:3, 0].tolist() == [1.0, 0.5, 2.0]
    assert torch.equal(row_scaled(out, o, 3, 0), out)
    assert row_scaled(out, o, 3, 0.5)[:, 0].tolist() == [1.0, 0.75, 1.5, 1.0]  # row 3 is no decode row
    f = DecodeKernelScale()
    assert f.factor == 1.05 and f.at(0).factor == 1.0 and f.at(0.5).factor == pytest.approx(1.025)


def test_vllm_knobs_arithmetic():
    """vLLM's faults at a magnitude, on small tensors (vLLM itself is not needed)."""
    from corruptcheck.engines.patching import lerp
    from corruptcheck.faults.vllm import geometric_blend, guard_norm, rolled_table, ue8m0_bytes_as_values

    good = torch.tensor([2.0 ** -8, 1.0])
    bad = ue8m0_bytes_as_values(good)
    assert geometric_blend(good, bad, 1) is bad and geometric_blend(good, bad, 0) is good
    torch.testing.assert_close(geometric_blend(good, bad, 0.5), (good * bad).sqrt())  # the log-scale error halved
    assert geometric_blend(torch.tensor([0.0]), torch.tensor([2.0]), 0.5).item() == 1.0  # not positive: linear
    table = torch.arange(12).view(6, 2)
    assert torch.equal(rolled_table(table, 1), torch.roll(table, -1, 0))
    assert torch.equal(rolled_table(table, 0), table)
    part = rolled_table(table, 0.5)
    moved = (part != table).any(-1)
    assert 0 < int(moved.sum()) < 6 and torch.equal(part[moved], torch.roll(table, -1, 0)[moved])
    assert lerp(1.5, 1.0, 1) == 1.0 and lerp(1.5, 1.0, 0) == 1.5 and lerp(1.5, 1.0, 0.5) == 1.25
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 8, generator=g) * 3, torch.rand(8, generator=g) + 0.5
    guarded = guard_norm(x, w, 1e-6, 4, 1)
    assert torch.equal(guarded[:, 4:], x[:, 4:])  # channels past the compiled width pass through
    full = guard_norm(x, w, 1e-6, 4, 0)
    torch.testing.assert_close(full, x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * w)
    torch.testing.assert_close(guard_norm(x, w, 1e-6, 4, 0.25), full + 0.25 * (guarded - full))

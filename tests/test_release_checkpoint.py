"""Release-format checkpoints: the formats (E8M0, e4m3 blocks, MXFP4 nibbles), the writer, the
lazy reader (dispatch on stored dtypes), and every kind of damaged checkpoint as one line."""
import json
import struct
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from corruptcheck.cases import get_case
from corruptcheck.errors import BadInput
from corruptcheck.reference.quant import e2m1_values, fp4_sim, mxfp4_dequantize, mxfp4_quantize
from corruptcheck.release.reader import INDEX, ExpertWeight, ReleaseCheckpoint
from corruptcheck.release.writer import plan_shards, write_release_checkpoint


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    case = get_case("tiny-release")
    return {ex: write_release_checkpoint(case, root / ex, ex, 3) for ex in ("fp4", "fp8")}


def test_e8m0_and_nibble_order_by_hand():
    # E8M0 byte b means 2^(b-127); MXFP4 byte k holds element 2k in its low nibble
    scale = torch.tensor([[127, 129]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    assert scale.float().tolist() == [[1.0, 4.0]]
    byte = 0x2 | (0xB << 4)  # low: +1.0 (code 2), high: -1.5 (code 8 | 3)
    packed = torch.full((1, 32), byte, dtype=torch.uint8).view(torch.int8)
    w = mxfp4_dequantize(packed, scale)
    assert w[0, :4].tolist() == [1.0, -1.5, 1.0, -1.5] and w[0, 32:34].tolist() == [4.0, -6.0]
    assert e2m1_values(torch.arange(16, dtype=torch.uint8)).tolist() == [
        0, .5, 1, 1.5, 2, 3, 4, 6, -0.0, -.5, -1, -1.5, -2, -3, -4, -6]


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.floats(1e-6, 1e4), st.integers(0, 2**31 - 1))
def test_mxfp4_is_the_demo_fp4_rounding(rows, blocks, scale, seed):
    """Quantize -> dequantize equals the reference's fp4 simulation (same scale rule, same
    rounding) and is a fixed point: the dequantized values quantize to themselves."""
    w = torch.randn(rows, 32 * blocks, generator=torch.Generator().manual_seed(seed)) * scale
    d = mxfp4_dequantize(*mxfp4_quantize(w))
    assert torch.equal(d, fp4_sim(w, 32))
    assert torch.equal(mxfp4_dequantize(*mxfp4_quantize(d)), d)


def test_plan_shards_balances_bytes_and_never_leaves_one_empty():
    sizes = [(f"t{i}", s) for i, s in enumerate([100, 1, 1, 1, 100, 1, 1, 100, 1])]
    plan = plan_shards(sizes, 3)
    assert [n for g in plan for n in g] == [n for n, _ in sizes] and len(plan) == 3 and all(plan)
    assert len(plan_shards(sizes[:3], 3)) == 3
    with pytest.raises(BadInput):
        plan_shards(sizes[:2], 3)


@pytest.mark.parametrize("experts", ["fp4", "fp8"])
def test_written_checkpoint_reads_back_bit_exact(ckpts, experts):
    summary = ckpts[experts]
    assert summary["exact"] and summary["max_rel_difference"] == 0.0 and summary["shards"] == 3
    ck = ReleaseCheckpoint(summary["path"])
    assert ck.config == get_case("tiny-release").config
    params = get_case("tiny-release").params()
    assert set(ck.shapes) == set(params)
    for name, t in params.items():
        assert torch.equal(ck.tensor(name), t.to(ck.tensor(name).dtype)), name
    # the release's stored dtypes, read from the shard headers
    stored = {n: (d, s) for n, (d, s, _) in ck.stored.items()}
    e = "layers.1.ffn.experts.3.w2.weight"
    if experts == "fp4":
        assert stored[e] == ("I8", (64, 16)) and stored[e[:-7] + ".scale"] == ("F8_E8M0", (64, 1))
    else:
        assert stored[e] == ("F8_E4M3", (64, 32)) and stored[e[:-7] + ".scale"] == ("F32", (1, 1))
    assert stored["layers.1.attn.wq_b.weight"][0] == "F8_E4M3"
    assert stored["layers.1.attn.wq_b.scale"] == ("F8_E8M0", (1, 1))
    assert stored["layers.0.ffn.gate.tid2eid"][0] == "I64"
    assert stored["layers.1.attn.attn_sink"][0] == "F32" and stored["embed.weight"][0] == "BF16"
    index = json.loads((ck.root / INDEX).read_text())
    assert index["metadata"]["total_size"] == summary["bytes"] and len(set(index["weight_map"].values())) == 3


def test_unit_params_defer_the_routed_experts(ckpts):
    ck = ReleaseCheckpoint(ckpts["fp4"]["path"])
    p = ck.unit_params("layers.1")
    experts = [n for n in p if ".experts." in n]
    assert experts and all(isinstance(p[n], ExpertWeight) for n in experts)
    assert not any(isinstance(v, ExpertWeight) for n, v in p.items() if ".experts." not in n)
    w = p[experts[0]].to(torch.float64)
    assert w.dtype == torch.float64 and torch.equal(w, get_case("tiny-release").params()[experts[0]].double())
    assert set(ck.unit_names("head")) == {"norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale", "head.weight"}


def test_a_case_not_exact_in_the_format_says_so(tmp_path):
    summary = write_release_checkpoint(get_case("tiny"), tmp_path / "c", "fp4", 2)
    assert not summary["exact"] and summary["max_rel_difference"] > 0.01


# ------------------------------------------------------------------------------ damaged input

def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def _shard_of(ck_dir, tensor):
    return json.loads((ck_dir / INDEX).read_text())["weight_map"][tensor]


def _data_offset(path, tensor):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    return 8 + n + header[tensor]["data_offsets"][0]


def _truncated(d):
    shard = d / _shard_of(d, "layers.2.attn.wq_a.weight")
    shard.write_bytes(shard.read_bytes()[:-100])


def _garbage_header(d):
    shard = d / _shard_of(d, "embed.weight")
    shard.write_bytes(b"\xff" * 64 + shard.read_bytes()[64:])


def _mislabeled_index(d):
    index = json.loads((d / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = "layers.0.attn.wq_a.weight"
    index["weight_map"][name] = next(s for s in shards if s != index["weight_map"][name])
    (d / INDEX).write_text(json.dumps(index))


def _relabel(d, name, dtype):
    """Rewrite a shard with `name` stored in another dtype (same values where it can)."""
    shard = d / _shard_of(d, name)
    with safe_open(str(shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[name] = tensors[name].view(torch.uint8).to(dtype) if dtype != torch.float8_e4m3fn else \
        tensors[name].view(torch.uint8).view(dtype)
    save_file(tensors, str(shard))


def _wrong_config(d):
    conf = json.loads((d / "config.json").read_text())
    del conf["hidden_size"]
    (d / "config.json").write_text(json.dumps(conf))


def _other_width(d):
    conf = json.loads((d / "config.json").read_text())
    conf["moe_intermediate_size"] = 64
    (d / "config.json").write_text(json.dumps(conf))


def _missing_tensor(d):
    index = json.loads((d / INDEX).read_text())
    name = "layers.3.ffn.shared_experts.w2.weight"
    shard = d / index["weight_map"].pop(name)
    with safe_open(str(shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != name}
    save_file(tensors, str(shard))
    (d / INDEX).write_text(json.dumps(index))


DAMAGE = {
    "truncated shard": (_truncated, "corrupt or truncated"),
    "garbage header": (_garbage_header, "corrupt or truncated"),
    "index names the wrong shard": (_mislabeled_index, "which does not hold it"),
    "packed expert labelled FP8": (lambda d: _relabel(d, "layers.1.ffn.experts.2.w1.weight", torch.float8_e4m3fn),
                                   "does not tile"),
    "expert bytes labelled F32": (lambda d: _relabel(d, "layers.1.ffn.experts.2.w1.weight", torch.float32),
                                  "a scale for"),
    "config lacks a key": (_wrong_config, "lacks hidden_size"),
    "config of another model": (_other_width, "the config needs"),
    "tensor missing": (_missing_tensor, "lacks layers.3.ffn.shared_experts.w2.weight"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_one_clear_error(ckpts, tmp_path, damage):
    make, words = DAMAGE[damage]
    d = _copy(ckpts["fp4"]["path"], tmp_path / "c")
    make(d)
    with pytest.raises(BadInput, match=words):
        ReleaseCheckpoint(d)


def test_nan_scale_is_found_when_the_tensor_is_read(ckpts, tmp_path):
    """A flipped scale byte (E8M0 0xFF = NaN) passes the header checks; reading the tensor says so."""
    d = _copy(ckpts["fp4"]["path"], tmp_path / "c")
    name = "layers.2.attn.wq_b.scale"
    shard = d / _shard_of(d, name)
    raw = bytearray(shard.read_bytes())
    raw[_data_offset(shard, name)] = 0xFF
    shard.write_bytes(bytes(raw))
    ck = ReleaseCheckpoint(d)
    with pytest.raises(BadInput, match="scale NaN"):
        ck.tensor("layers.2.attn.wq_b.weight")


def test_cli_checkpoint_then_damage_exits_2_with_one_line(tmp_path):
    out = tmp_path / "ck"
    r = subprocess.run([sys.executable, "-m", "corruptcheck", "checkpoint", "--case", "tiny-release", "--out", str(out),
                        "--shards", "2"], capture_output=True, text=True)
    assert r.returncode == 0 and "equals the case's" in r.stdout, r.stderr
    _truncated(out)
    r = subprocess.run([sys.executable, "-m", "corruptcheck", "check", "--checkpoint", str(out), "--dump", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "corrupt or truncated" in r.stderr


def test_e2m1_ties_go_to_the_even_code():
    from corruptcheck.reference.quant import _round_e2m1

    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert _round_e2m1(mids).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert _round_e2m1(-mids).tolist() == [-0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0]
    above = torch.nextafter(mids, torch.tensor(9.0))
    assert _round_e2m1(above).tolist() == [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]

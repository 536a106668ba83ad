"""Goldens: integrity, drift detection, reproducibility, use by compare (docs/golden.md)."""
import json
import shutil

import pytest
import torch

from corruptcheck.judge import reference_data
from corruptcheck.storage import golden


@pytest.fixture()
def tiny_golden(tmp_path, tiny, tiny_ref):
    """A private copy of the committed tiny golden."""
    shutil.copytree(golden.golden_root() / "tiny", tmp_path / "tiny")
    return tmp_path


def test_committed_tiny_golden_verifies(tiny):
    r = reference_data.verify(tiny)
    assert r.points >= 100
    assert r.worst_rel <= golden.SKETCH_RTOL and r.regenerated_vs_tensors <= golden.SKETCH_RTOL


def test_sketch_pins_small_relative_changes(tiny_ref):
    points, _ = tiny_ref
    t = points["layers.2.out"]
    s = golden.sketch("layers.2.out", t)
    assert s.shape == (t.shape[0], 1 + golden.SKETCH_PROJECTIONS)
    g = torch.Generator().manual_seed(3)
    for rel in (1e-9, 1e-11):
        noise = torch.randn(t.shape, generator=g, dtype=torch.float64)
        moved = t + rel * t.norm() * noise / noise.norm()
        err = golden.sketch_error(golden.sketch("layers.2.out", moved), s)
        assert rel / 10 < err < rel * 10  # the sketch sees the change at its true size
    one_token = t.clone()
    one_token[7] *= 1 + 1e-9
    assert golden.sketch_error(golden.sketch("layers.2.out", one_token), s) > golden.SKETCH_RTOL


def _run_verify(root, tiny):
    return reference_data.verify(tiny, root)


def test_flipped_byte_in_tensor_file_names_file_and_point(tiny_golden, tiny):
    g = golden.load_manifest(tiny, tiny_golden)
    path = tiny_golden / "tiny" / golden.TENSOR_FILE
    data = bytearray(path.read_bytes())
    flipped = len(data) - 100  # inside the last stored tensor's data
    data[flipped] ^= 0x01
    path.write_bytes(bytes(data))
    # the point whose stored tensor holds that byte (safetensors: u64 header size, JSON header, data)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    key = next(k for k, v in header.items() if k != "__metadata__"
               and v["data_offsets"][0] <= flipped - 8 - size < v["data_offsets"][1])
    point = next(name for name, entry in g.points.items() if entry.get("tensor_key") == key)
    with pytest.raises(golden.GoldenTampered) as exc:
        _run_verify(tiny_golden, tiny)
    msg = str(exc.value)
    assert golden.TENSOR_FILE in msg and f"stored data of point {point} does not match" in msg


def test_flipped_byte_in_sketch_file(tiny_golden, tiny):
    path = tiny_golden / "tiny" / golden.SKETCH_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(golden.GoldenTampered, match=r"sketch.safetensors.*point "):
        _run_verify(tiny_golden, tiny)


def test_edited_manifest_number_names_point(tiny_golden, tiny):
    path = tiny_golden / "tiny" / golden.MANIFEST
    m = json.loads(path.read_text())
    m["points"]["layers.1.attn_norm"]["stats"]["l2"] *= 1.0001
    path.write_text(json.dumps(m, indent=1))
    with pytest.raises(golden.GoldenTampered, match=r"manifest.json.*layers.1.attn_norm"):
        _run_verify(tiny_golden, tiny)


def test_edited_manifest_outside_points(tiny_golden, tiny):
    path = tiny_golden / "tiny" / golden.MANIFEST
    m = json.loads(path.read_text())
    m["coverage"]["clamp_hits"] += 1
    path.write_text(json.dumps(m, indent=1))
    with pytest.raises(golden.GoldenTampered, match="manifest digest"):
        _run_verify(tiny_golden, tiny)


@pytest.mark.parametrize("damage", ["truncate", "delete", "garbage"])
def test_missing_or_corrupt_files(tiny_golden, tiny, damage):
    path = tiny_golden / "tiny" / golden.TENSOR_FILE
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "delete":
        path.unlink()
    else:
        (tiny_golden / "tiny" / golden.MANIFEST).write_text("{not json")
    with pytest.raises(golden.GoldenTampered):
        _run_verify(tiny_golden, tiny)


def test_drift_of_one_point_exits_1_naming_it(tiny_golden, tiny, monkeypatch):
    real = reference_data.regenerate

    def drifted(case):
        points, cov = real(case)
        points = dict(points)
        points["layers.2.attn.out"] = points["layers.2.attn.out"] * (1 + 1e-9)
        return points, cov

    monkeypatch.setattr(reference_data, "regenerate", drifted)
    with pytest.raises(golden.GoldenDrift) as exc:
        _run_verify(tiny_golden, tiny)
    assert exc.value.point == "layers.2.attn.out" and 1e-10 < exc.value.rel < 1e-8


def test_no_pickle_in_golden():
    for path in (p for p in golden.golden_root().rglob("*") if p.is_file()):
        assert path.suffix in (".json", ".safetensors") or path.name == "__init__.py", path


def test_cache_roundtrip_for_uncommitted_case(tmp_path, monkeypatch, tiny, tiny_ref):
    """A case kept out of git regenerates into the cache, is checked against the committed
    sketch, and the next load comes from the cache."""
    monkeypatch.setenv("CORRUPTCHECK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(golden, "COMMITTED_TENSORS", set())
    root = tmp_path / "g"
    reference_data.generate(tiny, root)
    assert not (root / "tiny" / golden.TENSOR_FILE).exists()
    calls = []
    real = reference_data.regenerate
    monkeypatch.setattr(reference_data, "regenerate", lambda c: calls.append(1) or real(c))
    first = reference_data.reference_for(tiny, root)
    assert first.source.startswith("golden (cache)")  # generate() already filled the cache
    assert not calls
    for f in (tmp_path / "cache").rglob("*.safetensors"):
        f.unlink()
    second = reference_data.reference_for(tiny, root)
    assert second.source == "golden (regenerated into the cache)" and calls
    # judged from the cache it just wrote, point by point: the float64 dict is not kept
    from corruptcheck.storage.lazy_points import LazyPoints

    assert isinstance(second.points, LazyPoints)
    assert torch.equal(second.points["logits"], tiny_ref[0]["logits"])
    third = reference_data.reference_for(tiny, root)
    assert third.source == "golden (cache)"
    points, _ = tiny_ref
    assert torch.equal(third.points["logits"], points["logits"])


def test_compare_uses_golden_and_falls_back(tmp_path, monkeypatch, tiny):
    ref = reference_data.reference_for(tiny)
    assert ref.source == "golden (committed)"
    monkeypatch.setenv("CORRUPTCHECK_GOLDEN_DIR", str(tmp_path))
    assert reference_data.reference_for(tiny).source == "computed (no golden for this case)"


@pytest.mark.slow
def test_fresh_clone_verifies_pro_slice_from_sketch(tmp_path):
    """pro-slice (hidden 7168) keeps no tensors in git: verify regenerates them into an empty
    cache and checks every point against the committed sketch."""
    import subprocess
    import sys

    env = {**__import__("os").environ, "CORRUPTCHECK_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "corruptcheck", "golden", "verify", "--case", "pro-slice"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "pro-slice: ok" in r.stdout
    assert list((tmp_path / "cache").rglob("*.safetensors"))

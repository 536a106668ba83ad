"""The dump format (docs/dump.md), its validation, TP-shard merging and SGLang dumper import."""
import json
import os
import subprocess
import sys

import pytest
import torch

from corruptcheck.compare import compare
from corruptcheck.storage.dump import load_dump, write_dump
from corruptcheck.errors import BadInput
from corruptcheck.storage.sglang_dump import load_sglang_dump

pytest.importorskip("transformers")


def _cc(*args):
    return subprocess.run([sys.executable, "-m", "corruptcheck", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def hf_dump(tmp_path_factory):
    d = tmp_path_factory.mktemp("dump") / "D"
    r = _cc("dump", "--engine", "hf", "--case", "tiny", "--out", str(d), "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    return d


def test_dump_then_compare_passes(hf_dump):
    r = _cc("compare", "--engine", "dump", "--path", str(hf_dump), "--case", "tiny", "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("pass: 81 compared")
    m = json.loads((hf_dump / "manifest.json").read_text())
    assert m["precision"] == "bfloat16" and m["engine"]["name"] == "hf" and m["engine"]["version"]


def test_renamed_key_is_missing_never_pass(hf_dump, tmp_path, tiny):
    points, manifest = load_dump(hf_dump, tiny)
    points["layers.2.attn.outx"] = points.pop("layers.2.attn.out")
    d = write_dump(points, tiny, tmp_path / "R", engine=manifest["engine"], precision="bfloat16")
    out = tmp_path / "r.json"
    r = _cc("compare", "--engine", "dump", "--path", str(d), "--quiet", "--json", str(out))
    assert r.returncode == 2 and "unknown point name(s): layers.2.attn.outx" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    doc = json.loads(out.read_text())  # the complete report still says what happened
    assert doc["verdict"] == "error" and doc["unknown_names"] == ["layers.2.attn.outx"]
    assert next(p for p in doc["points"] if p["name"] == "layers.2.attn.out")["verdict"] == "missing"
    del points["layers.2.attn.outx"]
    d = write_dump(points, tiny, tmp_path / "M", engine=manifest["engine"], precision="bfloat16")
    rep = compare(tiny, "dump", None, path=d).report
    p = next(p for p in rep.points if p.name == "layers.2.attn.out")
    assert p.verdict == "missing" and rep.missing == [p]


@pytest.mark.parametrize("damage,needle", [
    ("empty-dir", "has no manifest.json"),
    ("no-tensors", "contains no tensors"),
    ("truncated", "corrupt or truncated"),
    ("outside", "outside the dump"),
    ("pickle", "not a .safetensors file"),
    ("bad-json", "not valid JSON"),
    ("nan-json", "not valid JSON"),
    ("wrong-case", "is of case 'pro-slice'"),
    ("wrong-ids", "input token ids differ"),
    ("wrong-shape", "does not match the case's"),
    ("int-as-float", "dtype"),
    ("no-merge-rule", "no merge rule"),
])
def test_bad_dumps_exit_2_with_one_line(hf_dump, tmp_path, tiny, damage, needle):
    d = tmp_path / "bad"
    points, manifest = load_dump(hf_dump, tiny)
    if damage == "empty-dir":
        d.mkdir()
    else:
        write_dump(points, tiny, d, engine=manifest["engine"], precision="bfloat16")
        m = json.loads((d / "manifest.json").read_text())
        if damage == "no-tensors":
            write_dump({}, tiny, d, engine=manifest["engine"], precision="bfloat16")
        elif damage == "truncated":
            f = d / "points.safetensors"
            f.write_bytes(f.read_bytes()[:5000])
        elif damage == "outside":
            m["files"] = ["../points.safetensors"]
        elif damage == "pickle":
            torch.save({"x": torch.zeros(1)}, d / "evil.pt")
            m["files"] = ["evil.pt"]
        elif damage == "bad-json":
            (d / "manifest.json").write_text("{")
        elif damage == "nan-json":
            (d / "manifest.json").write_text(json.dumps(m).replace('"version": 1', '"version": NaN'))
        elif damage == "wrong-case":
            m["case"] = "pro-slice"
        elif damage == "wrong-ids":
            m["inputs"]["sequences"][0][0] += 1
        elif damage in ("wrong-shape", "int-as-float", "no-merge-rule"):
            if damage == "wrong-shape":
                points["layers.1.attn.out"] = points["layers.1.attn.out"][:-1]
                write_dump(points, tiny, d, engine=manifest["engine"], precision="bfloat16")
            elif damage == "int-as-float":
                points["layers.1.moe.experts"] = points["layers.1.moe.experts"].float()
                write_dump(points, tiny, d, engine=manifest["engine"], precision="bfloat16")
            else:
                write_dump(points, tiny, d, engine=manifest["engine"], precision="bfloat16",
                           shards=[points, points])
            m = json.loads((d / "manifest.json").read_text())
        if damage not in ("bad-json", "nan-json", "no-tensors"):
            (d / "manifest.json").write_text(json.dumps(m))
    r = _cc("compare", "--engine", "dump", "--path", str(d), "--case", "tiny")
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_tp2_shards_and_partial_sums_merge_and_pass(tiny, tmp_path, tiny_hf32):
    """A TP=2 dump: hidden-dim shards concatenated, attention / MoE outputs as partial sums."""
    pts = {k: v for k, v in tiny_hf32.items()}
    ranks = [{}, {}]
    layout = {}
    g = torch.Generator().manual_seed(0)
    for k, v in pts.items():
        if k.endswith(("attn.out", "moe.out")):  # row-parallel outputs before the all-reduce
            part = torch.randn(v.shape, generator=g) * v.std()
            ranks[0][k], ranks[1][k] = v - part, part
            layout[k] = {"merge": "sum"}
        elif v.is_floating_point() and v.dim() >= 2 and v.shape[-1] % 2 == 0 and not k.endswith("moe.weights"):
            half = v.shape[-1] // 2  # column-parallel / hidden-dim shards
            ranks[0][k], ranks[1][k] = v[..., :half].contiguous(), v[..., half:].contiguous()
            layout[k] = {"merge": "concat", "dim": -1}
        else:
            ranks[0][k] = v
    d = write_dump({}, tiny, tmp_path / "tp2", engine={"name": "hf-tp2"}, precision="float32", layout=layout,
                   shards=ranks)
    merged, _ = load_dump(d, tiny)
    assert sum(1 for spec in layout.values() if spec["merge"] == "sum") == 2 * tiny.config.num_layers
    assert torch.allclose(merged["layers.1.attn.out"].double(), pts["layers.1.attn.out"].double(), atol=1e-5)
    assert torch.equal(merged["layers.2.attn_hc.in"], pts["layers.2.attn_hc.in"])
    rep = compare(tiny, "dump", None, path=d).report
    assert rep.verdict == "pass", [(p.name, p.reason) for p in rep.failed]
    assert rep.summary.compared == 81


def _write_sglang(root, points, tiny, ranks=1, extra=None):
    """Files exactly as SGLang's dumper writes them: one torch.save({'value', 'meta'}) per tensor."""
    root.mkdir(parents=True)
    index = 0
    ids = torch.cat(tiny.sequences())
    core = {"input_ids": ids, "positions": torch.cat([torch.arange(n) for n in tiny.seq_lens]),
            "seq_lens": torch.tensor(tiny.seq_lens)}
    sglang_name = {"embed": "non_intrusive__model.embed_tokens.output", "head.norm": "non_intrusive__model.norm.output"}
    for i in range(tiny.config.num_layers):
        sglang_name[f"layers.{i}.attn.out"] = f"non_intrusive__model.layers.{i}.self_attn.output"
        sglang_name[f"layers.{i}.moe.out"] = f"non_intrusive__model.layers.{i}.mlp.output"
        sglang_name[f"layers.{i}.out"] = f"non_intrusive__model.layers.{i}.output"
        sglang_name[f"layers.{i}.attn_norm"] = f"non_intrusive__model.layers.{i}.input_layernorm.output"
    for rank in range(ranks):
        for name, value in list(core.items()) + [(sglang_name.get(k, k), v) for k, v in points.items()]:
            layer = [f"___layer_id={name.split('.')[2]}"] if "layers." in name else []
            meta = {"world_rank": rank, "world_size": ranks, **(extra or {}).get(name, {})}
            v = value if ranks == 1 or name in core else (extra or {}).get(name, {}).get("_shards", [value] * ranks)[rank]
            meta.pop("_shards", None)
            fname = f"step=0___rank={rank}___dump_index={index}___name={name}" + "".join(layer) + ".pt"
            torch.save({"value": v, "meta": meta}, root / fname)
            index += 1


def test_sglang_dump_imports_and_compares(tiny, tmp_path, tiny_hf32):
    root = tmp_path / "dump_20260101_000000_0" / "exp"
    _write_sglang(root, dict(tiny_hf32), tiny)
    points, meta = load_sglang_dump(root.parent, tiny)
    assert meta["precision"] == "float32" and "layers.1.attn.out" in points and "embed" in points
    assert not meta["ignored_names"]
    rep = compare(tiny, "dump", None, path=str(root), format="sglang").report
    assert rep.verdict == "pass", [(p.name, p.reason) for p in rep.failed]
    assert rep.summary.compared == 81
    r = _cc("compare", "--engine", "dump", "--format", "sglang", "--path", str(root), "--case", "tiny", "--quiet")
    assert r.returncode == 0, r.stderr


def test_sglang_dims_partial_sum_merges(tiny, tmp_path, tiny_hf32):
    name = "non_intrusive__model.layers.1.self_attn.output"
    v = tiny_hf32["layers.1.attn.out"]
    half = v / 3
    extra = {name: {"dims": "t h(tp,partial)", "_shards": [v - half, half]}}
    root = tmp_path / "sg"
    _write_sglang(root, {"layers.1.attn.out": v, "embed": tiny_hf32["embed"]}, tiny, ranks=2, extra=extra)
    points, _ = load_sglang_dump(root, tiny)
    assert torch.allclose(points["layers.1.attn.out"].double(), v.double(), atol=1e-6)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_sglang_refuses_pickled_objects(tiny, tmp_path):
    root = tmp_path / "evil"
    root.mkdir()
    # a pickle that would call os.system on load: weights_only must refuse it
    torch.save({"value": torch.zeros(2), "meta": {"x": Evil()}}, root / "step=0___rank=0___dump_index=0___name=embed.pt")
    with pytest.raises(BadInput, match="refused to unpickle|corrupt"):
        load_sglang_dump(root, tiny)
    r = _cc("compare", "--engine", "dump", "--format", "sglang", "--path", str(root), "--case", "tiny")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_hf_batch_of_two_equals_one_at_a_time(tiny):
    """Benign: the case's two sequences as one right-padded batch pass like one at a time."""
    rep = compare(tiny, "hf", "float32", batch=True).report
    assert rep.verdict == "pass" and rep.engine_info["batch"] == "right-padded"


def test_reference_dump_with_shared_tensors_round_trips(tmp_path, tiny):
    """The reference hands layers.{i-1}.out and layers.i.attn_hc.in as one tensor; the dump
    stores both (safetensors refuses shared memory) and a compare of it passes."""
    r = _cc("dump", "--engine", "reference", "--case", "tiny", "--dtype", "float32", "--out", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr
    r = _cc("compare", "--engine", "dump", "--path", str(tmp_path / "d"), "--quiet")
    assert r.returncode == 0 and r.stdout.startswith("pass: 113 compared"), r.stdout + r.stderr

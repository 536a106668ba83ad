"""Generated corruptions of every input the tool reads: dump manifests and safetensors files,
SGLang dumper files, golden manifests and sketches, gate policies, engine options. Each one
either loads (and then gets the verdict its data deserves) or is refused with `BadInput` /
`GoldenTampered` (one line, exit 2 at the CLI) — never any other exception."""
import io
import json
import math
import shutil
import struct

import pytest
import torch
from click.testing import CliRunner
from conftest import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from corruptcheck.cli import app as cli
from corruptcheck.storage import golden
from corruptcheck.storage.dump import load_dump, write_dump
from corruptcheck.engines import engine_class
from corruptcheck.errors import BadInput
from corruptcheck.gate import parse_policy
from corruptcheck.storage.sglang_dump import load_sglang_dump

FUZZ = fuzz_settings(200)
CLI_FUZZ = fuzz_settings(40)

json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)
SAFETENSORS_DTYPES = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "I64", "I32", "I16",
                      "I8", "U64", "U32", "U16", "U8", "BOOL", "C64", "X9", ""]


def _outcome(fn, *refusals):
    """'ok' or the refusal's class name; anything else is raised (a test failure)."""
    try:
        fn()
        return "ok"
    except (BadInput, *refusals) as exc:
        assert str(exc) and "\n" not in str(exc).strip(), f"refusal is not one line: {exc!r}"
        return type(exc).__name__


def _read_all(loaded) -> None:
    """Read every point of a loaded dump (points are read lazily: a damage found only then must
    still be one line of BadInput)."""
    points, _ = loaded
    for name in points:
        points[name].sum()


@pytest.fixture(scope="module")
def template(tiny, tiny_ref):
    """A small valid dump of `tiny`: (points, manifest dict, safetensors bytes)."""
    points, _ = tiny_ref
    keep = {k: (v.float() if v.is_floating_point() else v) for k, v in points.items()
            if k in ("embed", "layers.0.attn_norm", "layers.0.moe.experts")}
    manifest = {"format": "corruptcheck-dump", "version": 1, "case": tiny.name, "config": tiny.config.to_dict(),
                "inputs": {"sequences": [s.tolist() for s in tiny.sequences()]},
                "engine": {"name": "fuzz"}, "precision": "float32", "files": ["points.safetensors"], "layout": {}}
    return keep, manifest, st_save(keep)


def _write(d, manifest, files: dict):
    d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    (d / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    return d


def _header(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _pack(header_text: str, body: bytes) -> bytes:
    raw = header_text.encode()
    return struct.pack("<Q", len(raw)) + raw + body


@st.composite
def safetensors_corruptions(draw, good: bytes):
    header, body = _header(good)
    kind = draw(st.sampled_from(["truncate", "length", "dtype", "shape", "offsets", "duplicate", "flip",
                                 "header-json", "metadata"]))
    if kind == "truncate":
        return good[:draw(st.integers(0, len(good) - 1))]
    if kind == "length":
        n = draw(st.integers(0, 2**64 - 1) | st.integers(0, len(good) + 8))
        return struct.pack("<Q", n) + good[8:]
    if kind == "flip":
        data = bytearray(good)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        return bytes(data)
    if kind == "header-json":
        return _pack(draw(st.text(max_size=40)), body)
    key = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    entry = dict(header[key])
    if kind == "dtype":
        entry["dtype"] = draw(st.sampled_from(SAFETENSORS_DTYPES))
    elif kind == "shape":
        entry["shape"] = draw(st.lists(st.integers(-3, 2**40), max_size=4) | json_values)
    elif kind == "offsets":
        entry["data_offsets"] = draw(st.lists(st.integers(-5, len(body) + 64), min_size=0, max_size=3) | json_values)
    elif kind == "metadata":
        header = {**header, "__metadata__": draw(json_values)}
    header = {**header, key: entry}
    text = json.dumps(header)
    if kind == "duplicate":  # the same key twice in the JSON header, with other data
        other = json.dumps({key: {**entry, "shape": [1]}})[1:-1]
        text = text[:-1] + ", " + other + "}"
    return _pack(text, body)


@FUZZ
@given(data=st.data())
def test_dump_safetensors_corruptions(data, template, tmp_path_factory, tiny):
    _, manifest, good = template
    bad = data.draw(safetensors_corruptions(good))
    d = _write(tmp_path_factory.mktemp("st"), manifest, {"points.safetensors": bad})
    _outcome(lambda: _read_all(load_dump(d, tiny)))


@st.composite
def manifest_corruptions(draw, manifest: dict):
    kind = draw(st.sampled_from(["replace", "delete", "nested", "text", "top"]))
    m = json.loads(json.dumps(manifest))
    if kind == "top":
        return json.dumps(draw(json_values))
    if kind == "text":
        text = json.dumps(m)
        cut = draw(st.integers(0, len(text)))
        return text[:cut] + draw(st.text(max_size=6)) + text[cut + draw(st.integers(0, 4)):]
    key = draw(st.sampled_from(sorted(m)))
    if kind == "delete":
        del m[key]
    elif kind == "replace":
        m[key] = draw(json_values | st.sampled_from(["../x.safetensors", "/etc/passwd", "points.pt", "bfloat16"])
                      | st.just(["../../x.safetensors"]) | st.just({"embed": {"merge": "sum"}}))
    else:  # a value inside a nested table or list
        inner = m[key]
        if isinstance(inner, dict) and inner:
            inner[draw(st.sampled_from(sorted(inner)))] = draw(json_values)
        elif isinstance(inner, list) and inner:
            inner[draw(st.integers(0, len(inner) - 1))] = draw(json_values)
        else:
            m[key] = draw(json_values)
    return json.dumps(m)


@FUZZ
@given(data=st.data())
def test_dump_manifest_corruptions(data, template, tmp_path_factory, tiny):
    _, manifest, good = template
    text = data.draw(manifest_corruptions(manifest))
    layout = data.draw(st.none() | st.dictionaries(st.sampled_from(["embed", "layers.0.moe.experts", "x"]),
                                                   json_values | st.fixed_dictionaries(
                                                       {"tokens": st.sampled_from(["flat", "batch", "x"]),
                                                        "merge": st.sampled_from(["sum", "concat", "x"]),
                                                        "dim": st.integers(-4, 4) | json_values}), max_size=2))
    if layout is not None:
        try:
            m = json.loads(text)
        except ValueError:
            m = None
        if isinstance(m, dict):
            m["layout"], m["files"] = layout, ["points.safetensors", "points2.safetensors"]
            text = json.dumps(m)
    d = _write(tmp_path_factory.mktemp("mf"), text, {"points.safetensors": good, "points2.safetensors": good})
    _outcome(lambda: _read_all(load_dump(d, tiny)))


@CLI_FUZZ
@given(data=st.data())
def test_corrupt_dumps_at_the_cli(data, template, tmp_path_factory):
    """Through `corruptcheck compare --engine dump`: a verdict (exit 1: most points are missing, so
    `incomplete` at best, never a pass) or
    one line naming the problem (exit 2) — never a traceback, never an internal error, and a
    good report at --json is never replaced by a partial one."""
    _, manifest, good = template
    if data.draw(st.booleans()):
        files, text = {"points.safetensors": data.draw(safetensors_corruptions(good))}, manifest
    else:
        files, text = {"points.safetensors": good}, data.draw(manifest_corruptions(manifest))
    root = tmp_path_factory.mktemp("cli")
    d = _write(root / "dump", text, files)
    report = root / "report.json"
    report.write_text('{"verdict": "pass", "good": true}')
    res = CliRunner().invoke(cli.main, ["compare", "--engine", "dump", "--path", str(d), "--case", "tiny",
                                        "--quiet", "--json", str(report)])
    assert res.exit_code in (1, 2), res.output
    assert "Traceback" not in res.output and "internal error" not in res.output, res.output
    if res.exit_code == 2:
        assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith("corruptcheck: error: ")
        doc = json.loads(report.read_text())
        assert doc == {"verdict": "pass", "good": True} or doc["verdict"] == "error"
    else:
        assert json.loads(report.read_text())["verdict"] in ("fail", "incomplete")  # 47 points are absent


# ---------------------------------------------------------------------------------------------
# SGLang dumper files


def _pt(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@st.composite
def sglang_dirs(draw, embed: torch.Tensor, input_ids: torch.Tensor):
    """{filename: bytes} for an SGLang dumper directory with generated damage."""
    files = {}
    n = draw(st.integers(1, 3))
    for rank in range(n):
        kind = draw(st.sampled_from(["good", "shard", "truncated", "random", "not-dict", "no-value", "bad-meta",
                                     "bad-name", "pickle"]))
        name = f"step=0___rank={rank}___dump_index=1___name=non_intrusive__model.embed_tokens.output.pt"
        value = embed
        meta = {"dims": draw(st.sampled_from(["t h", "t h(tp)", "t h(tp,partial)", "t(tp) h", "x y z(tp)", "(",
                                              "t h(ep)"]) | st.text(max_size=10))}
        if kind == "shard":
            value = embed[:, : draw(st.integers(0, embed.shape[1]))]
        if kind == "bad-name":
            name = draw(st.sampled_from(["step=x___rank=0___name=embed.pt", "rank=0___name=embed.pt",
                                         "step=0___rank=-1___name=embed.pt", "step=0___rank=0.pt",
                                         "step=0___rank=zero___name=embed.pt", "garbage.pt",
                                         "step=99999999999999999999___rank=0___name=embed.pt"]))
        blob = _pt({"value": value, "meta": meta if kind != "bad-meta" else draw(json_values)})
        if kind == "truncated":
            blob = blob[:draw(st.integers(0, len(blob) - 1))]
        elif kind == "random":
            blob = draw(st.binary(max_size=64))
        elif kind == "not-dict":
            blob = _pt(draw(st.sampled_from([[1, 2], "text", 3])) if draw(st.booleans()) else value)
        elif kind == "no-value":
            blob = _pt({"meta": meta, "value": draw(json_values)})
        elif kind == "pickle":
            import pickle
            blob = pickle.dumps(object())
        files[name] = blob
    if draw(st.booleans()):
        ids = input_ids if draw(st.booleans()) else input_ids[: draw(st.integers(0, len(input_ids)))]
        files["step=0___rank=0___dump_index=0___name=input_ids.pt"] = _pt({"value": ids, "meta": {}})
    if draw(st.booleans()):
        files["step=0___rank=0___dump_index=0___name=seq_lens.pt"] = _pt(
            {"value": draw(st.sampled_from([torch.tensor([64, 41]), torch.tensor([1]), torch.zeros(0),
                                            torch.tensor([[64, 41]]), torch.tensor([1.5, 2.0])])), "meta": {}})
    return files


@FUZZ
@given(data=st.data())
def test_sglang_dumper_corruptions(data, tiny, tiny_ref, tmp_path_factory):
    embed = tiny_ref[0]["embed"].to(torch.bfloat16)
    files = data.draw(sglang_dirs(embed, torch.cat(tiny.sequences())))
    d = tmp_path_factory.mktemp("sg")
    for name, blob in files.items():
        (d / name).write_bytes(blob)
    _outcome(lambda: load_sglang_dump(d, tiny))


# ---------------------------------------------------------------------------------------------
# golden manifests and sketches


@pytest.fixture(scope="module")
def golden_copy(tiny, tmp_path_factory):
    src = golden.golden_root() / tiny.name
    return {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}


@FUZZ
@given(data=st.data())
def test_golden_corruptions(data, tiny, golden_copy, tmp_path_factory):
    """Edited manifests (raw, or re-digested as a buggy writer would leave them) and damaged
    sketch files: the golden loads, or is refused as tampered / absent."""
    files = dict(golden_copy)
    m = json.loads(files["manifest.json"])
    kind = data.draw(st.sampled_from(["manifest", "redigested", "sketch", "missing"]))
    if kind in ("manifest", "redigested"):
        text = data.draw(manifest_corruptions(m))
        if kind == "redigested":
            try:
                edited = json.loads(text)
            except ValueError:
                edited = None
            if isinstance(edited, dict) and "Infinity" not in text and "NaN" not in text:  # digests are strict JSON
                points = edited.get("points")
                if isinstance(points, dict):
                    for entry in points.values():
                        if isinstance(entry, dict):
                            entry["digest"] = golden._digest({k: v for k, v in entry.items() if k != "digest"})
                edited["manifest_digest"] = golden._digest({k: v for k, v in edited.items() if k != "manifest_digest"})
                text = json.dumps(edited)
        files["manifest.json"] = text.encode()
    elif kind == "sketch":
        files["sketch.safetensors"] = data.draw(safetensors_corruptions(golden_copy["sketch.safetensors"]))
    else:
        del files[data.draw(st.sampled_from(sorted(files)))]
    root = tmp_path_factory.mktemp("golden")
    (root / tiny.name).mkdir()
    for name, blob in files.items():
        (root / tiny.name / name).write_bytes(blob)

    def load():
        g = golden.load_manifest(tiny, root)
        golden.load_sketches(g)

    _outcome(load, golden.GoldenTampered, FileNotFoundError)


# ---------------------------------------------------------------------------------------------
# gate policies (TOML) and engine options


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if not (isinstance(v, float) and not math.isfinite(v)) else "nan"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(x)}" for k, x in v.items() if x is not None) + "}"
    return '""'


policy_values = st.recursive(
    st.booleans() | st.integers(-3, 2**63 - 1) | st.floats(allow_nan=False) | st.sampled_from(
        ["tiny", "flash-slice", "nope", "float32", "bfloat16", "fp8-serving", "fp7", "on-fail", "layers.*", "case",
         "prefill-only"]),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.sampled_from(
        ["case", "cases", "precision", "precisions", "batch_size", "batch_sizes", "seq_lens", "seq_lens_list",
         "teacher_forcing", "allowed_missing", "min_clamp_hits", "min_compressed_entries", "schedule",
         "prompt_lens", "decode_steps", "chunk", "min_decode_pairs", "x"]), kids, max_size=4),
    max_leaves=10)


@FUZZ
@given(doc=st.dictionaries(st.sampled_from(["name", "description", "defaults", "coverage", "run", "extra"]),
                           policy_values, max_size=5),
       runs=st.lists(st.dictionaries(st.sampled_from(["case", "cases", "precision", "precisions", "batch_size",
                                                      "batch_sizes", "seq_lens", "seq_lens_list", "schedule",
                                                      "schedules", "x"]),
                                     policy_values, max_size=4), max_size=3),
       noise=st.text(max_size=8), cut=st.integers(0, 400))
def test_gate_policy_corruptions(doc, runs, noise, cut):
    text = "\n".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in doc.items() if k != "run" and v is not None)
    text += "\n" + "".join("\n[[run]]\n" + "\n".join(f"{k} = {_toml(v)}" for k, v in r.items()) for r in runs)
    if noise:
        text = text[:cut] + noise + text[cut:]
    _outcome(lambda: parse_policy(text, "fuzz.toml"))


@FUZZ
@given(engine=st.sampled_from(["vllm", "hf", "dump", "reference", "sglang", "trtllm"]),
       pairs=st.lists(st.tuples(st.sampled_from(["fix", "max_num_batched_tokens", "kv_cache_dtype", "kv_cache_gib",
                                                 "attn_impl", "batch", "path", "format", "sims", "weight_format",
                                                 "fused_hc", "mem_fraction_static", "", "x=y"]),
                                st.sampled_from(["", "0", "-1", "1", "2048", "1e400", "nan", "inf", "true", "maybe",
                                                 "fp8", "routed-swiglu-clamp", "0.5", "1.5", "sglang", "eager"])
                                | st.text(max_size=6)), max_size=4),
       raw=st.lists(st.text(max_size=10), max_size=2))
def test_engine_option_corruptions(engine, pairs, raw):
    items = [f"{k}={v}" for k, v in pairs] + raw
    _outcome(lambda: engine_class(engine).parse_options(cli.parse_engine_options(items)))

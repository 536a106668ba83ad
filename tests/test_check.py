"""`corruptcheck check`: a dump against a release checkpoint, unit by unit, in this process and
on a local Ray cluster (2 CPUs), with a planted one-layer fault, a killed worker and a corrupt
shard."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from corruptcheck.cases import get_case
from corruptcheck.release.check import check, select_units
from corruptcheck.storage.dump import write_dump
from corruptcheck.errors import BadInput
from corruptcheck.release.writer import write_release_checkpoint

CASE = "tiny-release"
FAULT_LAYER = 2
FAULT_SCALE = 1.02  # the MoE of one layer 2% too large: far above float32 noise, propagated downstream


def _reference_dump(out, fault_layer=None):
    """A float32 reference run of the case as a dump; with `fault_layer`, that layer's MoE output
    is scaled (everything after it sees the fault, as in an engine)."""
    from corruptcheck.reference import model, run

    case = get_case(CASE)
    original = model.moe

    def moe(y, ids, p, layer, *args):
        out = original(y, ids, p, layer, *args)
        return out * FAULT_SCALE if layer == fault_layer else out

    model.moe = moe
    try:
        res = run(case.config, case.params(), case.sequences(), "float32")
    finally:
        model.moe = original
    return write_dump(res.points, case, out, engine={"name": "reference", "version": "test"}, precision="float32")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    ckpt = write_release_checkpoint(get_case(CASE), root / "ckpt", "fp4", 3)["path"]
    return {"ckpt": ckpt, "clean": _reference_dump(root / "clean"), "fault": _reference_dump(root / "fault", FAULT_LAYER),
            "root": root}


@pytest.fixture(scope="module")
def clean_local(setup):
    return check(setup["ckpt"], setup["clean"]).to_json()


def _points(doc):
    return {p["name"]: (p["verdict"], p["metrics"].get("rel_l2"), p["metrics"].get("norm_ratio"), p["ratio"])
            for p in doc["points"]}


def test_clean_dump_passes_every_unit(clean_local):
    doc = clean_local
    assert doc["verdict"] == "pass", [p["name"] for p in doc["points"] if p["verdict"] != "pass"]
    units = doc["engine_info"]["check"]["units"]
    assert [u["unit"] for u in units] == ["embed", "layers.0", "layers.1", "layers.2", "layers.3", "head", "mtp.0"]
    assert all(u["verdict"] == "pass" and u["points_judged"] > 0 and u["weight_bytes"] > 0 for u in units)
    # every required point of the main model is judged, on its own unit's inputs
    judged = {p["name"] for p in doc["points"] if p["verdict"] in ("pass", "not-exercised")}
    assert {"embed", "layers.0.attn_hc.in", "layers.3.attn.indexer_topk", "layers.2.moe.out", "logits",
            "mtp.0.logits"} <= judged
    assert doc["summary"]["compared"] >= 100 and doc["summary"]["worst_ratio"]["ratio"] < 1
    # float32 tolerances come from float32 noise measured on the engine's inputs
    t = next(p for p in doc["points"] if p["name"] == "layers.1.attn.out")["tolerance"]
    assert 1e-8 < t["noise_rel_l2"] < 1e-5 and t["value"] == pytest.approx(3 * t["noise_rel_l2"])


def test_fault_in_one_layer_is_the_culprit_and_the_others_pass(setup):
    doc = check(setup["ckpt"], setup["fault"]).to_json()
    assert doc["verdict"] == "fail"
    assert doc["culprit"]["name"] == f"layers.{FAULT_LAYER}.moe.out"
    assert doc["culprit"]["local_norm_ratio"] == pytest.approx(FAULT_SCALE, rel=1e-4)
    units = {u["unit"]: u["verdict"] for u in doc["engine_info"]["check"]["units"]}
    assert units.pop(f"layers.{FAULT_LAYER}") == "fail" and set(units.values()) == {"pass"}, units
    failed = {p["name"] for p in doc["points"] if p["verdict"] == "fail"}
    assert failed <= {f"layers.{FAULT_LAYER}.{s}" for s in ("moe.out", "out")} | {f"layers.{FAULT_LAYER + 1}.attn_hc.in"}


def test_layers_selects_units_and_skips_the_rest(setup):
    assert select_units(get_case(CASE).config, "1-2,head") == ["layers.1", "layers.2", "head"]
    for bad in ("9", "x", "1-x"):
        with pytest.raises(BadInput):
            select_units(get_case(CASE).config, bad)
    doc = check(setup["ckpt"], setup["fault"], layers="0,1").to_json()
    assert doc["verdict"] == "pass"
    assert {u["unit"] for u in doc["engine_info"]["check"]["units"]} == {"layers.0", "layers.1"}
    skipped = [p for p in doc["points"] if p["name"].startswith("layers.2.")]
    assert skipped and all(p["verdict"] == "skipped" for p in skipped)


def test_dump_of_another_model_or_case_is_bad_input(setup, tmp_path):
    other = write_dump({"embed": torch.zeros(105, 64)}, get_case("tiny"), tmp_path / "d", engine={"name": "x"},
                       precision="float32")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["config"]["moe_inter_dim"] = 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BadInput, match="differs from the checkpoint's .moe_inter_dim"):
        check(setup["ckpt"], other)


# ------------------------------------------------------------------------------------ on Ray

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_gives_the_same_verdicts_and_numbers(setup, clean_local, cluster):
    doc = check(setup["ckpt"], setup["clean"], ray="auto").to_json()
    assert doc["verdict"] == "pass"
    assert _points(doc) == _points(clean_local)
    info = doc["engine_info"]["check"]
    assert info["cluster"]["cpus"] == 2 and info["runner"].startswith("ray")
    workers = {u["worker"] for u in info["units"]}
    assert os.getpid() not in {int(w.split(":")[1]) for w in workers}  # ran in Ray's worker processes
    assert all(u["memory_requested"] > u["weight_bytes"] for u in info["units"])


def _kill_first_worker(seen: list, stop: threading.Event):
    """SIGKILL the first process that runs a check_unit task (Ray titles it ray::check_unit)."""
    while not stop.is_set():
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    title = f.read()
            except OSError:
                continue
            if title.startswith(b"ray::check_unit"):
                os.kill(int(pid), signal.SIGKILL)
                seen.append(int(pid))
                return
        time.sleep(0.05)


def test_killed_worker_is_retried(setup, cluster):
    seen, stop = [], threading.Event()
    killer = threading.Thread(target=_kill_first_worker, args=(seen, stop))
    killer.start()
    try:
        doc = check(setup["ckpt"], setup["fault"], ray="auto").to_json()
    finally:
        stop.set()
        killer.join()
    assert seen, "no worker was killed"
    units = doc["engine_info"]["check"]["units"]
    retried = [u for u in units if u["attempts"] > 1]
    assert len(retried) == 1 and retried[0]["error"] is None
    assert all(u["verdict"] != "unchecked" for u in units)
    assert doc["culprit"]["name"] == f"layers.{FAULT_LAYER}.moe.out"  # the same answer as without the kill


def test_corrupt_shard_leaves_its_units_unchecked_never_passed(setup, cluster, tmp_path):
    import shutil
    import struct

    d = shutil.copytree(setup["ckpt"], tmp_path / "ckpt")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = "layers.1.attn.wq_a.scale"
    shard = d / index["weight_map"][name]
    raw = bytearray(shard.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    raw[8 + n + json.loads(raw[8:8 + n])[name]["data_offsets"][0]] = 0xFF  # E8M0 NaN
    shard.write_bytes(bytes(raw))
    doc = check(d, setup["clean"], ray="auto").to_json()
    assert doc["verdict"] == "incomplete"
    units = {u["unit"]: u for u in doc["engine_info"]["check"]["units"]}
    assert units["layers.1"]["verdict"] == "unchecked" and "scale NaN" in units["layers.1"]["error"]
    assert units["layers.1"]["attempts"] == 1  # a bad input is not retried
    assert all(u["verdict"] == "pass" for k, u in units.items() if k != "layers.1")
    l1 = [p for p in doc["points"] if p["name"].startswith("layers.1.") and p["name"] != "layers.1.attn_hc.in"]
    assert l1 and all(p["verdict"] == "unchecked" for p in l1)


def test_cli_check_on_ray_exit_codes_and_reports(setup, tmp_path):
    """The command line: fault -> exit 1 with the culprit in JSON / JUnit / HTML (its own local Ray)."""
    r = subprocess.run([sys.executable, "-m", "corruptcheck", "check", "--checkpoint", setup["ckpt"], "--dump",
                        str(setup["fault"]), "--ray", "auto", "--json", str(tmp_path / "r.json"), "--junit",
                        str(tmp_path / "r.xml"), "--html", str(tmp_path / "r.html"), "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stderr
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["culprit"]["name"] == f"layers.{FAULT_LAYER}.moe.out"
    assert "<failure" in (tmp_path / "r.xml").read_text() and "moe.out" in (tmp_path / "r.html").read_text()


def test_dump_split_over_ranks_checks_like_one_file(setup, clean_local, tmp_path):
    """Every float point of the layers split in two along its last dim over two rank files (as
    tensor-parallel shards), the rest replicated in rank 0: the same numbers as the one-file dump."""
    from corruptcheck.storage.dump import load_dump
    from corruptcheck.release.check import _dump_case
    from corruptcheck.release.reader import ReleaseCheckpoint
    from corruptcheck.storage.dump import read_manifest

    case = _dump_case(read_manifest(setup["clean"]), ReleaseCheckpoint(setup["ckpt"]), "x")
    points, _ = load_dump(setup["clean"], case)
    rank0, rank1, layout = {}, {}, {}
    for name in points:
        t = points[name]
        if name.startswith("layers.") and t.is_floating_point() and t.shape[-1] % 2 == 0:
            a, b = t.chunk(2, -1)
            rank0[name], rank1[name] = a.contiguous(), b.contiguous()
            layout[name] = {"merge": "concat", "dim": -1}
        else:
            rank0[name] = t
    split = write_dump({}, get_case(CASE), tmp_path / "split", engine={"name": "reference", "version": "test"},
                       precision="float32", layout=layout, shards=[rank0, rank1])
    doc = check(setup["ckpt"], split).to_json()
    assert doc["verdict"] == "pass" and _points(doc) == _points(clean_local)

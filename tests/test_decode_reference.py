"""The reference's incremental path (chunked prefill + decode with carried KV / compressor /
indexer / MTP state) equals its full forward at every point, for any chunking (float64)."""
import pytest
import torch
from conftest import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from corruptcheck.reference import run
from corruptcheck.reference.decode import forward_chunks

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BOUND = 1e-12  # float64: only the reduction order differs


def _worst(inc: dict, full: dict) -> tuple[float, str]:
    assert set(inc) == set(full)
    worst, where = 0.0, ""
    for name, ref in full.items():
        got = inc[name]
        assert got.shape == ref.shape, name
        if not ref.is_floating_point():
            assert torch.equal(got, ref), f"{name}: discrete choices differ"
            continue
        fin = torch.isfinite(ref)
        assert torch.equal(fin, torch.isfinite(got)), f"{name}: masked entries differ"
        err = float((got[fin] - ref[fin]).norm() / ref[fin].norm().clamp_min(1e-300))
        if err > worst:
            worst, where = err, name
    return worst, where


@pytest.fixture(scope="module")
def tiny_full(tiny):
    return [run(tiny.config, tiny.params(), [ids], "float64").points for ids in tiny.sequences()]


def test_prefill_then_decode_equals_full_forward(tiny, tiny_full):
    """A prompt crossing compression blocks (m=4 and 16) and the 16-token window, then 20
    single-token decode steps, then a last chunk: every point within 1e-12."""
    ids = tiny.sequences()[0]
    chunks = [7, 5, 3] + [1] * 20 + [29]
    worst, where = _worst(forward_chunks(tiny.config, tiny.params(), ids, chunks), tiny_full[0])
    assert worst < BOUND, (worst, where)


@fuzz_settings(12)
@given(data=st.data())
def test_any_chunking_equals_full_forward(data, tiny, tiny_full):
    seq = data.draw(st.integers(0, 1))
    ids = tiny.sequences()[seq]
    chunks, left = [], len(ids)
    while left:
        c = data.draw(st.integers(1, min(left, 20)))
        chunks.append(c)
        left -= c
    worst, where = _worst(forward_chunks(tiny.config, tiny.params(), ids, chunks), tiny_full[seq])
    assert worst < BOUND, (chunks, worst, where)


def test_chunks_must_partition_the_sequence(tiny):
    with pytest.raises(ValueError, match="do not partition"):
        forward_chunks(tiny.config, tiny.params(), tiny.sequences()[0], [10, 10])


@pytest.mark.slow
@pytest.mark.parametrize("case_name", ["flash-slice", "pro-slice"])
def test_decode_at_model_width(case_name):
    """Hidden 4096 / 7168, window 128, CSA m=4 and HCA m=128: a 100-token chunk, a 60-token
    chunk (splits a 4-block and crosses the window), 20 decode steps across the 128 boundary of
    the window and the HCA block, then the rest of the 300 tokens."""
    from corruptcheck.cases import get_case

    case = get_case(case_name)
    ids = case.sequences()[0]
    full = run(case.config, case.params(), [ids], "float64").points
    worst, where = _worst(forward_chunks(case.config, case.params(), ids, [100, 60] + [1] * 20 + [120]), full)
    assert worst < BOUND, (worst, where)

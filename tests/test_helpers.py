"""The shared helpers: atomic writes, non-finite numbers."""
import math
import os

import pytest

from corruptcheck.storage.atomic import atomic_replace, atomic_write
from corruptcheck.finite import finite_or_none, finite_values, fmt_number


def test_atomic_write_replaces_or_leaves_the_old_file(tmp_path):
    path = tmp_path / "sub" / "r.json"
    atomic_write(path, "one")
    assert path.read_text() == "one"

    def broken(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_replace(path, broken)
    assert path.read_text() == "one" and os.listdir(path.parent) == ["r.json"]


def test_non_finite_numbers():
    assert finite_or_none(math.inf) is None and finite_or_none(math.nan) is None and finite_or_none(None) is None
    assert finite_or_none(2.0) == 2.0 and finite_or_none(3) == 3 and finite_or_none("x") == "x"
    assert finite_values({"a": -math.inf, "b": 1.5}) == {"a": None, "b": 1.5}
    assert fmt_number(None) == "-" and fmt_number(math.inf) == "-" and fmt_number(0.12345) == "0.123"
    assert fmt_number(math.nan, none="–", nonfinite="∞") == "∞" and fmt_number(None, none="n/a") == "n/a"

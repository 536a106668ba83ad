"""The engine of a benign variant: an engine run with the variant's patches and options, and
(for batch variants) each sequence batched next to a partner of the same length."""
from __future__ import annotations

from contextlib import contextmanager

from corruptcheck.storage.batch_layout import leading_sequences
from corruptcheck.selftest.benign import Benign
from corruptcheck.cases import Case
from corruptcheck.engines import Capture, Engine


@contextmanager
def _variant_patches(variant: Benign, engine: str):
    if variant.install is None:
        yield
    else:
        with variant.install(engine):
            yield


def partnered(case: Case) -> Case:
    """The case with every sequence followed, in the same batch, by a partner of the same
    length: seeded sequences come in order, so the first ones are exactly the case's own."""
    return Case(f"{case.name}+partners", case.description, case.config, case.seed, case.seq_lens + case.seq_lens)


def _own_rows(points: dict, case: Case) -> dict:
    """Rows of the case's own sequences out of a partnered capture."""
    return leading_sequences(points, case.config, case.seq_lens)


class VariantEngine(Engine):
    """`inner` run as the benign variant (patches installed around the run only)."""

    def __init__(self, inner: Engine, variant: Benign):
        self.inner, self.variant = inner, variant
        self.name = f"{inner.name}~{variant.name}"
        self.extra = inner.extra

    def available(self) -> tuple[bool, str]:
        return self.inner.available()

    def run(self, case: Case, precision: str, **options) -> Capture:
        options = {**options, **self.variant.options}
        run_case = partnered(case) if self.variant.batch_partner else case
        with _variant_patches(self.variant, self.inner.name):
            cap = self.inner.run(run_case, precision, **options)
        if self.variant.batch_partner:
            cap.points = _own_rows(cap.points, case)
        cap.meta = {**cap.meta, "benign_variant": self.variant.name}
        return cap

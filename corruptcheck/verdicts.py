"""The verdict vocabulary: every word a point, a run, a phase or a self-test row can be judged
with, in one place. `Verdict` members are `str`s, so JSON, JUnit, HTML and the results store
write the same bytes as the plain words did.

Point verdicts: pass / fail (judged against the tolerance), not-exercised (the case did not
exercise the mechanism: reported, never a pass), missing (the engine did not deliver a required
point: never a pass), skipped (the engine declares it cannot expose the point, with the reason),
unchecked (delivered but not judged, e.g. a batch-layout row).
Run verdicts: pass, fail, incomplete (nothing failed, required points missing), error (nothing
was compared), crash (the engine died before delivering its capture)."""
from __future__ import annotations

from enum import StrEnum


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    NOT_EXERCISED = "not-exercised"
    MISSING = "missing"
    SKIPPED = "skipped"
    UNCHECKED = "unchecked"
    INCOMPLETE = "incomplete"
    ERROR = "error"
    CRASH = "crash"


# a point judged against its tolerance (not-exercised: judged, and the case did not exercise it)
JUDGED = (Verdict.PASS, Verdict.FAIL, Verdict.NOT_EXERCISED)
# a point that holds no judgment of the engine's numbers
NOT_JUDGED = (Verdict.MISSING, Verdict.NOT_EXERCISED, Verdict.SKIPPED)
# the process exit code of a run's verdict: incomplete is a verdict on the engine, never a pass;
# error (nothing compared) and crash (the engine died) end with 2
EXIT_CODES = {Verdict.PASS: 0, Verdict.FAIL: 1, Verdict.INCOMPLETE: 1, Verdict.ERROR: 2, Verdict.CRASH: 2}

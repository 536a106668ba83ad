"""The verdict vocabulary: every word a point, a run, a phase or a self-test row can be judged
with, in one place. `Verdict` members are `str`s, so JSON, JUnit, HTML and the results store
write the same bytes as the plain words did.

Point verdicts: pass / fail (judged against the tolerance), not-exercised (the case did not
exercise the mechanism: reported, never a pass), missing (the engine did not deliver a required
point: never a pass), skipped (the engine declares it cannot expose the point, with the reason),
unchecked (`corruptcheck check` only: the point's unit could not run; counted with missing).
Run verdicts: pass, fail, incomplete (nothing failed, required points missing), error (nothing
was compared), crash (the engine died before delivering its capture).
Self-test rows (`SelftestStatus`, docs/faults.md): a fault row is detected, missed, not exercised
(the fault never fired: out of recall) or error (its compare raised); an honest variant's row is
pass, flagged (a false positive) or error."""
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
# a required point that was not compared (the engine did not deliver it, or its unit of
# `corruptcheck check` could not run): counted as missing, never a pass
NOT_COMPARED = (Verdict.MISSING, Verdict.UNCHECKED)
# a point that holds no judgment of the engine's numbers
NOT_JUDGED = (Verdict.MISSING, Verdict.NOT_EXERCISED, Verdict.SKIPPED)
# the process exit code of a run's verdict: incomplete is a verdict on the engine, never a pass;
# error (nothing compared) and crash (the engine died) end with 2
EXIT_CODES = {Verdict.PASS: 0, Verdict.FAIL: 1, Verdict.INCOMPLETE: 1, Verdict.ERROR: 2, Verdict.CRASH: 2}


class SelftestStatus(StrEnum):
    """A self-test row's status (selftest/runner.py): the finding about the detector, not a
    verdict on an engine ("not exercised" is written with a space, as the self-test's JSON has it)."""
    DETECTED = "detected"
    MISSED = "missed"
    NOT_EXERCISED = "not exercised"
    PASS = "pass"
    FLAGGED = "flagged"
    ERROR = "error"

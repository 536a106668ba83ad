"""The `dump` engine: a directory an engine wrote in the dump format (docs/design.md §5), or the
files SGLang's own dumper wrote (`--format sglang`)."""
from __future__ import annotations

from corruptcheck.cases import Case
from corruptcheck.engines.base import Capture, Engine
from corruptcheck.engines.options import Option, one_of, text
from corruptcheck.errors import BadInput


class DumpEngine(Engine):
    name = "dump"
    declares_precision = True
    options = (
        Option("path", text, "the dump directory"),
        Option("format", one_of("corruptcheck", "sglang"), "dump directory or SGLang dumper files (default corruptcheck)"),
    )

    @classmethod
    def default_case(cls, options: dict) -> str | None:
        """The case the dump's manifest names (when --case is left out)."""
        from pathlib import Path

        from corruptcheck.storage.dump import read_manifest

        path = options.get("path")
        return read_manifest(path)["case"] if path and (Path(path) / "manifest.json").exists() else None

    def run(self, case: Case, precision: str | None = None, path=None, format: str = "corruptcheck",
            **_options) -> Capture:
        if not path:
            raise BadInput("the dump engine needs --path DIR")
        if format == "sglang":
            from corruptcheck.storage.sglang_dump import load_sglang_dump

            points, meta = load_sglang_dump(path, case, precision)
            return Capture(points, self.name, meta["precision"], meta)
        if format != "corruptcheck":
            raise BadInput(f"unknown dump format {format!r} (corruptcheck or sglang)")
        from corruptcheck.storage.dump import load_dump

        points, manifest = load_dump(path, case)
        declared = manifest["precision"]
        return Capture(points, self.name, declared,
                       {"path": str(path), "engine": manifest.get("engine"), "declared_precision": declared,
                        "files": manifest["files"]})

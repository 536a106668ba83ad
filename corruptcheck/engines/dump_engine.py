"""The `dump` engine: a directory an engine wrote in the dump format (docs/design.md §5), or the
files SGLang's own dumper wrote (`--format sglang`)."""
from __future__ import annotations

from corruptcheck.cases import Case
from corruptcheck.engines.base import Capture, Engine
from corruptcheck.engines.options import Option, one_of, text
from corruptcheck.errors import BadInput


class DumpEngine(Engine):
    name = "dump"
    options = (
        Option("path", text, "the dump directory (also --path)"),
        Option("format", one_of("corruptcheck", "sglang"), "dump directory or SGLang dumper files (also --format)"),
    )

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

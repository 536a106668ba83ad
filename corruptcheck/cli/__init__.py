"""The command line: one module per command family; `app.main` is the entry point."""

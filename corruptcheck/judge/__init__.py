"""Judging: the engine's points against the reference, with tolerances from the measured honest noise, then localized (docs/design.md §6, §7)."""

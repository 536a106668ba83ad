"""Judging: the engine's points against the reference, with tolerances from the measured honest noise, then localized
and diagnosed, as the typed result every report renders (results.py; docs/design.md §6, §7)."""

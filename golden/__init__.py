"""Golden data of the built-in cases, shipped as package data (`corruptcheck.goldens`)."""

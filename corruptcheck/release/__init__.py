"""Release checkpoints: DeepSeek V4's on-disk format read and written, and an engine dump checked against it unit by unit, locally or on Ray (docs/checkpoints.md)."""

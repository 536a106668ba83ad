"""corruptcheck: a correctness guard and silent-corruption detector for DeepSeek V4 engines."""
__version__ = "0.1.0"

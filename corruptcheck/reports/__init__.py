"""Reports: the typed result of a compare and its renderers (terminal, JSON, JUnit, HTML, self-test and timeline pages)."""

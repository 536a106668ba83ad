"""History: the results store and the release timeline's runs (docs/history.md)."""

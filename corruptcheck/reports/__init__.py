"""Reports: the renderers of a run's typed result (judge/results.py): terminal, JSON, JUnit, HTML and timeline pages."""

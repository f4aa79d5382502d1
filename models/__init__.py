"""Reference models: small seeded builders for tests and the demo, plus the
registry of real trained models shipped in PyPI wheels (zoo.py)."""

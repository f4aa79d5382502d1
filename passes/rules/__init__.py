"""Declarative rewrite rules (onnxscript patterns) the passes apply."""

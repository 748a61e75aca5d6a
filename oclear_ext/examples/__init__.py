"""Runnable examples of oclear_ext (python -m oclear_ext.examples.<name>)."""

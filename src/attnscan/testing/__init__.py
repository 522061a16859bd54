"""Helpers for tests and benchmarks: published model dimensions (presets) and tiny random-weight model builders."""

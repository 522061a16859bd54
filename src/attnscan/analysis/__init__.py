"""Analysis: scan (prompt sets in, ScanResult out), the result bundle, per-layer statistics and the observations
written from them.
"""

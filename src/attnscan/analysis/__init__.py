"""Analysis: scan (prompt sets in, ScanResult out), the result bundle, per-layer statistics (with the inference on
per-prompt block summaries) and the observations written from them.
"""

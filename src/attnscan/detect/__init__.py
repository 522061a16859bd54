"""Detection: per-layer detectors (CP decomposition + logistic regression, a probe), their metrics, the detector
directory and the train/score/eval jobs.
"""

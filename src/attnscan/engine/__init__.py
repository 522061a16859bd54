"""The engine: the one batch iterator, attention capture, accumulators, hidden-state features, checkpoints and
process groups. The only code that touches a model's internals.
"""

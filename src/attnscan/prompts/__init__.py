"""Prompt sets: built-in sets, file and dataset loaders, composition of templates and requests, encoding to token
ids.
"""

"""The package version, in one place (the package ``__init__`` and every writer of manifests read it here)."""

__version__ = "0.1.0"

"""The package's version, in a module of its own so that run records (``provenance``) can name it."""

__version__ = "0.1.0"

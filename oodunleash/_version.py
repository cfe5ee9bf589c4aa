"""The package version, read by the checkpoint format and the CLI."""

__all__ = ["__version__"]

__version__ = "0.1.0"

"""envcheck: GPU container environment and diagnostics toolkit."""

__version__ = "0.1.0"

"""The single place the project version lives."""

__version__ = "0.1.0"

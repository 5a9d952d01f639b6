"""The one place slmfast's version is written (read by setup.py and pyproject.toml)."""

__version__ = "0.1.0"

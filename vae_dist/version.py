"""The package's version, in one place: pyproject.toml and `vae-dist --version` read it."""

__version__ = "0.1.0"

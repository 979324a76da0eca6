"""The package version, in one place: pyproject.toml reads it (dynamic version) and `personavec --version`,
vector files and run manifests report it."""

__version__ = "0.1.0"

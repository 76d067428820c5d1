"""qlora: fine-tune large language models with QLoRA from YAML recipes."""

from importlib.metadata import PackageNotFoundError, version as _installed_version

try:  # the installed distribution's version, so that pyproject.toml is its one source
    __version__ = _installed_version("qlora-cli")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

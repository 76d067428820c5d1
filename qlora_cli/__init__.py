"""qlora: fine-tune large language models with QLoRA from YAML recipes."""

from importlib.metadata import PackageNotFoundError, version as _installed_version

from .core.compat import quiet_library_noise

try:  # the installed distribution's version, so that pyproject.toml is its one source
    __version__ = _installed_version("qlora-cli")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

# bitsandbytes logs its failed kernel fetch while it is imported: silenced before any module here imports it
# (the CLI, each process under torchrun, and library use alike). Only the standard library is imported here.
quiet_library_noise()

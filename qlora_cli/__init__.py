"""qlora: fine-tune large language models with QLoRA from YAML recipes."""

from .core.compat import quiet_library_noise

__version__ = "0.1.0"

# bitsandbytes logs its failed kernel fetch while it is imported: silenced before any module here imports it
# (the CLI, each process under torchrun, and library use alike). Only the standard library is imported here.
quiet_library_noise()

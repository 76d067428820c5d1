"""qlora: fine-tune large language models with QLoRA from YAML recipes."""

__version__ = "0.1.0"

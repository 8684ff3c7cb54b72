"""Checkpoints on disk: GGUF and HF safetensors, tokenizers, chat templates, model configs."""

from .chat_template import ChatTemplateError, render_chat_template
from .checkpoint import Checkpoint, open_checkpoint
from .config import SUPPORTED_ARCHITECTURES, ModelConfig
from .errors import FormatError
from .gguf_checkpoint import GGUFCheckpoint
from .gguf_quants import BLOCK_LAYOUT
from .hf_checkpoint import HFCheckpoint
from .quantized import QuantizedTensor
from .tokenizer import Tokenizer

__all__ = [
    "BLOCK_LAYOUT",
    "ChatTemplateError",
    "Checkpoint",
    "FormatError",
    "GGUFCheckpoint",
    "HFCheckpoint",
    "ModelConfig",
    "QuantizedTensor",
    "SUPPORTED_ARCHITECTURES",
    "Tokenizer",
    "open_checkpoint",
    "render_chat_template",
]

"""Checkpoints on disk: GGUF, HF safetensors (plain, GPTQ, AWQ, EXL2), tokenizers, chat templates,
model configs."""

from .chat_template import ChatTemplateError, render_chat_template
from .checkpoint import Checkpoint, open_checkpoint
from .config import SUPPORTED_ARCHITECTURES, ModelConfig, MultiModalConfig, Qwen2VLVisionConfig, VisionConfig
from .errors import FormatError
from .exl2 import EXL2Config, EXL2Tensor, exl2_config_from_hf
from .exl2_write import exl2_parts, exl2_scale_grid, write_exl2_folder
from .gguf_checkpoint import GGUFCheckpoint
from .gguf_quants import BLOCK_LAYOUT
from .gptq import GPTQConfig, GPTQTensor, quantization_config_from_hf
from .grouped import GroupQuant
from .hf_checkpoint import HFCheckpoint
from .quantized import QuantizedTensor
from .tokenizer import Tokenizer

__all__ = [
    "BLOCK_LAYOUT",
    "ChatTemplateError",
    "Checkpoint",
    "EXL2Config",
    "EXL2Tensor",
    "FormatError",
    "GGUFCheckpoint",
    "GPTQConfig",
    "GPTQTensor",
    "GroupQuant",
    "HFCheckpoint",
    "ModelConfig",
    "MultiModalConfig",
    "QuantizedTensor",
    "Qwen2VLVisionConfig",
    "SUPPORTED_ARCHITECTURES",
    "Tokenizer",
    "VisionConfig",
    "exl2_config_from_hf",
    "exl2_parts",
    "exl2_scale_grid",
    "open_checkpoint",
    "quantization_config_from_hf",
    "render_chat_template",
    "write_exl2_folder",
]

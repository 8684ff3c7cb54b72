"""tessera's engine: the step loop, the model runner, and the LLM API."""

from .args import EngineArgs, parse_size
from .engine_core import EngineCore
from .llm import LLM
from .model_runner import ModelRunner
from .model_source import DEFAULT_MODEL, KNOWN_MODELS, resolve_model
from .outputs import RequestOutput

__all__ = [
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "LLM",
    "EngineArgs",
    "EngineCore",
    "ModelRunner",
    "RequestOutput",
    "parse_size",
    "resolve_model",
]

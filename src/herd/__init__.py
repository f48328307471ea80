"""herd: the Llama 3 system in PyTorch."""

from herd.checkpoint import CheckpointError, load_model, save_model
from herd.config import ModelConfig, RopeScaling, preset
from herd.infer import Completion, Llama
from herd.model import Transformer
from herd.tokenizer import load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Completion",
    "Llama",
    "ModelConfig",
    "RopeScaling",
    "Transformer",
    "load_model",
    "load_tokenizer",
    "preset",
    "save_model",
]

"""fastdllm: cached, confidence-parallel decoding for diffusion language models (LLaDA, Dream)."""

from .config import DecodeConfig
from .decoding import GenerateOutput, generate
from .engine import Engine, Finished, Request
from .structured import StructuredOutputs
from .models import load_model, save_checkpoint
from .models.common import DiffusionLM, ModelConfig
from .tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"
__all__ = ["DecodeConfig", "Engine", "Finished", "GenerateOutput", "Request", "StructuredOutputs", "generate",
           "load_model", "save_checkpoint", "DiffusionLM", "ModelConfig", "Tokenizer", "load_tokenizer", "__version__"]

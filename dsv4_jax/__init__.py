"""dsv4_jax: DeepSeek-V4-Flash in JAX, from its NVFP4 / FP8 checkpoints, on GPUs with or without FP4 tensor cores."""

from .cache import Cache, init_cache
from .chat import ChatFormatError, CompletionParser, StreamEvent, encode_chat, parse_completion
from .checkpoint import load_model, save_cache, save_checkpoint
from .config import FLASH, Config, ConfigError, RopeScaling, tiny
from .generation import decode_step, generate, generate_stream, prefill
from .model import Model, Numerics, forward, forward_mtp, hidden_streams, random_model
from .params import Params, count_params, init_params
from .safetensors_io import CheckpointError, CheckpointWarning
from .sampling import SamplingParams
from .tokenizer import Detokenizer, Tokenizer, load_tokenizer

__all__ = [
    "FLASH",
    "Cache",
    "ChatFormatError",
    "CheckpointError",
    "CheckpointWarning",
    "CompletionParser",
    "Config",
    "ConfigError",
    "Detokenizer",
    "Model",
    "Numerics",
    "Params",
    "RopeScaling",
    "SamplingParams",
    "StreamEvent",
    "Tokenizer",
    "count_params",
    "decode_step",
    "encode_chat",
    "forward",
    "forward_mtp",
    "generate",
    "generate_stream",
    "hidden_streams",
    "init_cache",
    "init_params",
    "load_model",
    "load_tokenizer",
    "parse_completion",
    "prefill",
    "random_model",
    "save_cache",
    "save_checkpoint",
    "tiny",
]

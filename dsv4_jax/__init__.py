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
    "FLASH", "Config", "ConfigError", "RopeScaling", "tiny",
    "Model", "Numerics", "Params", "forward", "forward_mtp", "hidden_streams", "random_model",
    "init_params", "count_params",
    "load_model", "save_checkpoint", "save_cache", "CheckpointError", "CheckpointWarning",
    "Cache", "init_cache", "prefill", "decode_step", "generate", "generate_stream", "SamplingParams",
    "encode_chat", "parse_completion", "CompletionParser", "StreamEvent", "ChatFormatError",
    "Tokenizer", "Detokenizer", "load_tokenizer",
]

"""dsv4_jax: DeepSeek-V4-Flash in JAX, from its NVFP4 / FP8 checkpoints, on GPUs with or without FP4 tensor cores."""

from .config import FLASH, Config, ConfigError, RopeScaling, tiny
from .model import Model, Numerics, forward, forward_mtp, hidden_streams, random_model
from .params import Params, count_params, init_params

__all__ = [
    "FLASH", "Config", "ConfigError", "RopeScaling", "tiny",
    "Model", "Numerics", "Params", "forward", "forward_mtp", "hidden_streams", "random_model",
    "init_params", "count_params",
]

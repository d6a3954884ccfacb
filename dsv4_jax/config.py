"""Model configuration: every hyper-parameter of ARCHITECTURE.md §1 under its Hugging Face ``config.json`` key.

``Config.from_json`` / ``Config.from_dict`` read a checkpoint's ``config.json`` and validate it; a missing or
inconsistent key raises ``ConfigError`` naming the key. ``FLASH`` is DeepSeek-V4-Flash; ``tiny()`` gives small
configurations with the same structure (SWA, CSA and HCA layers, hash and score routing, MTP) for tests.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A missing or inconsistent configuration key."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (``rope_scaling`` in config.json), applied to the compressed (CSA/HCA) layers only."""

    factor: float = 16.0
    original_max_position_embeddings: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    type: str = "yarn"


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_nextn_predict_layers: int = 1
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    n_routed_experts: int = 256
    num_experts_per_tok: int = 6
    n_shared_experts: int = 1
    moe_intermediate_size: int = 2048
    num_hash_layers: int = 3
    scoring_func: str = "sqrtsoftplus"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    hidden_act: str = "silu"
    sliding_window: int = 128
    compress_ratios: tuple[int, ...] = (0, 0) + (4, 128) * 20 + (4, 0)
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: RopeScaling | None = RopeScaling()
    max_position_embeddings: int = 1048576
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    bos_token_id: int = 0
    eos_token_id: int | tuple[int, ...] = 1  # several ids (a list in config.json): generation stops on any
    tie_word_embeddings: bool = False
    attention_bias: bool = False

    def __post_init__(self):
        _validate(self)

    # --- derived quantities ------------------------------------------------------------------------------
    @property
    def n_layers_total(self) -> int:
        """Main layers plus MTP layers."""
        return self.num_hidden_layers + self.num_nextn_predict_layers

    def compress_ratio(self, layer: int) -> int:
        """0 (sliding window only), 4 (CSA: overlapping compressor + indexer) or another m (HCA)."""
        return self.compress_ratios[layer]

    def layer_type(self, layer: int) -> str:
        """``"swa"``, ``"csa"`` or ``"hca"`` for layer index ``layer`` (MTP layers follow the main ones)."""
        m = self.compress_ratios[layer]
        return "swa" if m == 0 else "csa" if m == 4 else "hca"

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.num_hash_layers

    @property
    def mix_hc(self) -> int:
        return (2 + self.hc_mult) * self.hc_mult

    # --- reading -----------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> Config:
        """Build from a ``config.json`` dictionary (unknown keys are ignored): DeepSeek's keys as in the released
        checkpoints, or the schema transformers writes (``layer_types`` / ``mlp_layer_types`` / ``compress_rates``
        / ``rope_parameters``; no MTP layer). ``compress_ratios`` may list the main layers only (CHECKPOINT.md
        §7.2.3): the MTP layers then get ratio 0."""
        if "layer_types" in d and "compress_ratios" not in d:
            from .weights import config_from_hf

            return config_from_hf(d, source)
        n, n_mtp = d.get("num_hidden_layers"), d.get("num_nextn_predict_layers", cls.num_nextn_predict_layers)
        r = d.get("compress_ratios")
        if isinstance(r, (list, tuple)) and isinstance(n, int) and isinstance(n_mtp, int) and n_mtp > 0 and len(r) == n:
            d = {**d, "compress_ratios": [*r, *[0] * n_mtp]}  # CHECKPOINT.md §7.2.3: the MTP entries may be left out
        kwargs: dict[str, Any] = {}
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in d and f.name not in _OPTIONAL]
        if missing:
            raise ConfigError(f"{source}: missing key(s) {', '.join(repr(k) for k in missing)}")
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            v = d[f.name]
            try:
                if f.name == "rope_scaling":
                    v = None if v is None else _rope_scaling(v)
                elif f.name == "compress_ratios":
                    if isinstance(v, (str, bytes, dict)):
                        raise TypeError("expected a list of integers")
                    v = tuple(_int(r) for r in v)
                elif f.name == "eos_token_id" and isinstance(v, (list, tuple)):
                    if not v:
                        raise ValueError("expected an id or a non-empty list of ids")
                    v = _int(v[0]) if len(v) == 1 else tuple(_int(x) for x in v)
                else:
                    v = _FIELD_TYPES[f.name](v)
            except (TypeError, ValueError, KeyError, AttributeError) as e:
                raise ConfigError(f"{source}: key {f.name!r} has an invalid value {v!r}: {e}") from None
            kwargs[f.name] = v
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> Config:
        """Read a ``config.json`` file (or a checkpoint directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` dictionary of this configuration."""
        d = dataclasses.asdict(self)
        d["compress_ratios"] = list(self.compress_ratios)
        if self.rope_scaling is not None:
            d["rope_scaling"] = dataclasses.asdict(self.rope_scaling)
        d.update(architectures=["DeepseekV4ForCausalLM"], model_type="deepseek_v4", torch_dtype="bfloat16")
        return d


# Keys a real config.json may omit; the defaults are DeepSeek-V4-Flash's.
_OPTIONAL = {
    "num_nextn_predict_layers", "num_key_value_heads", "n_shared_experts", "topk_method", "norm_topk_prob",
    "hidden_act", "hc_sinkhorn_iters", "hc_eps", "bos_token_id", "eos_token_id", "tie_word_embeddings",
    "attention_bias", "max_position_embeddings", "rope_scaling",
}


def swiglu_bound(limit: float) -> float:
    """The SwiGLU clip bound of ``swiglu_limit`` (§8.2): the official code clips only where the limit is positive
    (``if self.swiglu_limit > 0``; its ``ModelArgs`` default is 0), so a limit <= 0 means no clip (``inf``)."""
    return float(limit) if limit > 0 else float("inf")


def _bool(v):
    if not isinstance(v, bool):
        raise TypeError("expected true or false")
    return v


def _int(v) -> int:
    """A JSON integer (an integral number such as ``4.0`` too); not a string, a boolean or a fraction."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        raise TypeError("expected an integer")
    if isinstance(v, float) and not v.is_integer():
        raise ValueError("expected an integer, not a fraction")
    return int(v)


def _float(v) -> float:
    """A JSON number; not a string or a boolean."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError("expected a number")
    return float(v)


def _str(v) -> str:
    if not isinstance(v, str):
        raise TypeError("expected a string")
    return v


_FIELD_TYPES = {
    f.name: {"int": _int, "float": _float, "str": _str, "bool": _bool}.get(f.type, lambda v: v)
    for f in dataclasses.fields(Config)
}


def _rope_scaling(v: dict) -> RopeScaling:
    kind = v.get("type", v.get("rope_type", "yarn"))
    if kind != "yarn":
        raise ValueError(f"only YaRN rope scaling is defined for this model, got type {kind!r}")
    return RopeScaling(
        factor=_float(v["factor"]),
        original_max_position_embeddings=_int(v["original_max_position_embeddings"]),
        beta_fast=_float(v.get("beta_fast", 32)),
        beta_slow=_float(v.get("beta_slow", 1)),
    )


def _validate(c: Config) -> None:
    def need(cond: bool, key: str, msg: str):
        if not cond:
            raise ConfigError(f"key {key!r}: {msg} (got {getattr(c, key)!r})")

    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                "q_lora_rank", "o_groups", "o_lora_rank", "n_routed_experts", "num_experts_per_tok",
                "moe_intermediate_size", "sliding_window", "index_n_heads", "index_head_dim", "index_topk",
                "hc_mult", "hc_sinkhorn_iters"):
        need(getattr(c, key) > 0, key, "must be positive")
    need(c.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
    need(c.num_key_value_heads == 1, "num_key_value_heads", "DeepSeek-V4 has one shared K=V latent")
    need(c.n_shared_experts == 1, "n_shared_experts", "exactly one shared expert is supported")
    need(c.scoring_func == "sqrtsoftplus", "scoring_func", "only 'sqrtsoftplus' is defined for DeepSeek-V4")
    need(c.topk_method == "noaux_tc", "topk_method", "only 'noaux_tc' is defined for DeepSeek-V4")
    need(c.norm_topk_prob, "norm_topk_prob", "DeepSeek-V4 always renormalises the top-k weights")
    need(c.hidden_act == "silu", "hidden_act", "DeepSeek-V4 uses SiLU")
    need(not c.tie_word_embeddings, "tie_word_embeddings", "DeepSeek-V4 has separate embedding and head")
    need(not c.attention_bias, "attention_bias", "DeepSeek-V4 has no attention bias")
    need(c.num_experts_per_tok <= c.n_routed_experts, "num_experts_per_tok", "must be <= n_routed_experts")
    need(0 <= c.num_hash_layers <= c.num_hidden_layers, "num_hash_layers", "must be in [0, num_hidden_layers]")
    need(len(c.compress_ratios) == c.n_layers_total, "compress_ratios",
         f"needs num_hidden_layers + num_nextn_predict_layers = {c.n_layers_total} entries")
    need(all(r >= 0 for r in c.compress_ratios), "compress_ratios", "ratios must be >= 0")
    need(all(r == 0 for r in c.compress_ratios[c.num_hidden_layers:]), "compress_ratios",
         "MTP layers use sliding-window attention (ratio 0)")
    need(c.qk_rope_head_dim % 2 == 0 and 0 < c.qk_rope_head_dim <= c.head_dim, "qk_rope_head_dim",
         "must be even and <= head_dim")
    need((c.head_dim - c.qk_rope_head_dim) % 64 == 0, "head_dim",
         "the non-rotary part must be a multiple of the 64-wide FP8 simulation block")
    need(c.num_attention_heads % c.o_groups == 0, "o_groups", "must divide num_attention_heads")
    need(c.hidden_size % 16 == 0 and c.moe_intermediate_size % 32 == 0, "moe_intermediate_size",
         "hidden_size must be a multiple of 16 and moe_intermediate_size of 32 (FP4 blocks)")
    if any(r == 4 for r in c.compress_ratios):
        need(c.index_head_dim & (c.index_head_dim - 1) == 0 and c.index_head_dim % 32 == 0, "index_head_dim",
             "must be a power of two and a multiple of 32 (Hadamard rotation, FP4 blocks)")
        need(c.index_head_dim >= c.qk_rope_head_dim, "index_head_dim", "must be >= qk_rope_head_dim")
    need(c.hc_eps > 0 and c.rms_norm_eps > 0, "rms_norm_eps", "epsilons must be positive")
    if c.rope_scaling is not None:
        need(c.rope_scaling.factor >= 1, "rope_scaling", "factor must be >= 1")
        need(c.rope_scaling.original_max_position_embeddings > 0, "rope_scaling",
             "original_max_position_embeddings must be positive")
    need(math.isfinite(c.rope_theta) and c.rope_theta > 1, "rope_theta", "must be > 1")
    need(math.isfinite(c.compress_rope_theta) and c.compress_rope_theta > 1, "compress_rope_theta", "must be > 1")


FLASH = Config()
"""DeepSeek-V4-Flash (ARCHITECTURE.md §1)."""


def tiny(
    *,
    num_hidden_layers: int = 5,
    hca_ratio: int = 16,
    sliding_window: int = 8,
    index_topk: int = 5,
    num_hash_layers: int | None = None,
    vocab_size: int = 256,
    mtp: bool = True,
    **overrides,
) -> Config:
    """A small configuration with the structure of Flash: two SWA layers, then CSA / HCA alternating (the
    first compressed layer is CSA), hash routing in the first ``num_hash_layers`` layers (default: the first
    two, or the only one), one MTP layer.

    Dimensions are the smallest the number formats allow (FP8 blocks of 128 are padded where needed)."""
    ratios = tuple(0 if i < 2 else 4 if i % 2 == 0 else hca_ratio for i in range(num_hidden_layers))
    if num_hash_layers is None:
        num_hash_layers = min(2, num_hidden_layers)
    kw = {
        "vocab_size": vocab_size, "hidden_size": 128, "num_hidden_layers": num_hidden_layers,
        "num_nextn_predict_layers": int(mtp), "num_attention_heads": 4, "head_dim": 128, "qk_rope_head_dim": 64,
        "q_lora_rank": 64, "o_groups": 2, "o_lora_rank": 64, "n_routed_experts": 8, "num_experts_per_tok": 2,
        "moe_intermediate_size": 64, "num_hash_layers": num_hash_layers, "sliding_window": sliding_window,
        "compress_ratios": ratios + (0,) * int(mtp), "index_n_heads": 16, "index_head_dim": 64, "index_topk": index_topk,
        "rope_scaling": RopeScaling(factor=16.0, original_max_position_embeddings=64),
        "max_position_embeddings": 1024,
    }
    kw.update(overrides)
    return Config(**kw)

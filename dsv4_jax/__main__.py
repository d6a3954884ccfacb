"""The ``dsv4-jax`` command (also ``python -m dsv4_jax``).

``dsv4-jax sample`` streams a completion from a checkpoint directory, by default from an embedded tiny random
model that is generated on first use and cached (so it works on a fresh machine, offline).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

TINY_SEED = 0


def cache_root() -> Path:
    """``$DSV4_JAX_CACHE``, else ``dsv4_jax`` under ``$XDG_CACHE_HOME`` or ``~/.cache``."""
    return Path(os.environ.get("DSV4_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dsv4_jax"))


def tiny_checkpoint_dir() -> Path:
    """Where the embedded tiny model is cached (under :func:`cache_root`)."""
    return cache_root() / f"tiny-random-v1-seed{TINY_SEED}"


def use_compilation_cache() -> None:
    """JAX's persistent compilation cache in ``cache_root()/jax-compilation`` (unless one is configured already,
    e.g. with ``JAX_COMPILATION_CACHE_DIR``): a second run with the same model and shapes loads its compiled
    programs instead of compiling them again."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cache_root() / "jax-compilation"))


def ensure_tiny_checkpoint() -> Path:
    """The embedded tiny default: a random model with Flash's structure and the real vocabulary, written once in
    the NVIDIA NVFP4 layout (Format Q) and reused afterwards."""
    from . import random_model, save_checkpoint, tiny

    path = tiny_checkpoint_dir()
    if (path / "config.json").exists():
        return path
    print(f"generating the embedded tiny random model in {path} (once) ...", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(random_model(tiny(vocab_size=129280), TINY_SEED), path, format="modelopt-nvfp4")
    return path


def _expert_mesh(n: int):
    """A one-axis ``"expert"`` mesh over the first ``n`` devices (0: all); None for one device."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    devices = jax.devices()
    if n < 0:
        raise ValueError(f"--expert-parallel {n}: give a number of devices >= 1, or 0 for all")
    if n > len(devices):
        raise ValueError(f"--expert-parallel {n}: there are {len(devices)} {devices[0].platform} device(s)")
    n = n or len(devices)
    return None if n == 1 else Mesh(np.array(devices[:n]), ("expert",))


def _sample(args) -> int:
    from . import SamplingParams, encode_chat, load_model, load_tokenizer
    from .checkpoint import checkpoint_config
    from .generation import check_context, generate_stream
    from .tokenizer import Detokenizer

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop_strings=tuple(args.stop or ()),
                            ignore_eos=args.ignore_eos)
    params.validate()
    if args.steps_per_call < 1:
        raise ValueError(f"--steps-per-call must be at least 1, got {args.steps_per_call}")
    mesh = _expert_mesh(args.expert_parallel)  # refused before the embedded model is written or read
    if args.compile_cache:
        use_compilation_cache()
    if args.checkpoint is None:
        path, tiny = ensure_tiny_checkpoint(), True
    else:
        path, tiny = Path(args.checkpoint), False
        if not path.is_dir():
            raise ValueError(f"checkpoint directory {path} does not exist")
    tokenizer = load_tokenizer(path if (path / "tokenizer.json").exists() else None)
    if args.prompt is not None:
        text = args.prompt
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.chat})
        text = encode_chat(messages, thinking=args.thinking)
    ids = tokenizer.encode(text)
    # Refused from the configuration, before any weight is read.
    config = checkpoint_config(path)
    if ids and max(ids) >= config.vocab_size:
        raise ValueError(f"the prompt has token ids up to {max(ids)} but the model's vocabulary has "
                         f"{config.vocab_size} entries: put the matching tokenizer.json in {path}")
    check_context(len(ids), params.max_new_tokens, config)
    model = load_model(path, dtype=args.dtype, mesh=mesh, progress=not args.quiet)
    if tiny:
        print("note: these are the weights of a tiny RANDOM model (the embedded default): the output is noise.\n"
              "      Pass --checkpoint DIR for real weights.", file=sys.stderr)
    if not args.quiet:
        print(f"[{len(ids)} prompt tokens] {text!r}", file=sys.stderr)
    detok = Detokenizer(tokenizer, skip_special_tokens=True)
    start = time.perf_counter()
    arrived = []  # arrival time of each token
    for step in generate_stream(model, [ids], params, tokenizer=tokenizer, steps_per_call=args.steps_per_call):
        tok = step[0]
        if tok is None:
            break
        arrived.append(time.perf_counter())
        sys.stdout.write(detok.push(tok))
        sys.stdout.flush()
    sys.stdout.write(detok.flush() + "\n")
    end = time.perf_counter()
    n = len(arrived)
    # Token 0 comes from the prefill; tokens 1..steps_per_call from the first decoding call, which includes its
    # compilation: the rate counts the tokens after that call over the time since it returned.
    k = args.steps_per_call
    if n > 1 + k and end > arrived[k]:
        rate = f"decode {(n - 1 - k) / (end - arrived[k]):.1f} tokens/s"
    else:  # (too few tokens for a rate that leaves out compilation)
        rate = f"no decode rate below {k + 2} tokens"
    ttft = f"time to first token {arrived[0] - start:.2f} s (with compilation)" if arrived else "no token"
    print(f"[prompt {len(ids)} tokens, generated {n} tokens, {ttft}, {rate}]", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dsv4-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="stream a completion")
    s.add_argument("--checkpoint", metavar="DIR", help="checkpoint directory (default: embedded tiny random model)")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="raw prompt text, sent as is (no chat template)")
    src.add_argument("--chat", default="Write a haiku about the sea.",
                     help="a user message, rendered with the DeepSeek-V4 chat encoding (default mode)")
    s.add_argument("--system", help="system prompt (chat mode)")
    s.add_argument("--thinking", choices=["none", "high", "max"], default="none", help="reasoning mode (chat)")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=0.95)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true")
    s.add_argument("--steps-per-call", type=int, default=8, metavar="N",
                   help="tokens decoded per device call (printed in bursts of N; 1: one at a time)")
    s.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    s.add_argument("--expert-parallel", type=int, default=1, metavar="N",
                   help="shard the routed experts over the first N devices (0: all; default 1: one device)")
    s.add_argument("--no-compile-cache", dest="compile_cache", action="store_false",
                   help="do not keep compiled programs in the persistent cache (default: keep them in "
                        "$DSV4_JAX_CACHE/jax-compilation, or JAX_COMPILATION_CACHE_DIR if set)")
    s.add_argument("--quiet", action="store_true", help="no progress bar or prompt echo")
    args = parser.parse_args(argv)
    if args.prompt is not None and (args.system is not None or args.thinking != "none"):
        parser.error("--system and --thinking apply to chat messages (--chat); --prompt is sent as is")
    try:
        return _sample(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"dsv4-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

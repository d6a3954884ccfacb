"""Write a tiny random DeepSeek-V4 checkpoint in any of the three layouts (for tests and demos).

python scripts/make_tiny_checkpoint.py /tmp/tiny-q                      # Format Q (ModelOpt NVFP4)
python scripts/make_tiny_checkpoint.py /tmp/tiny-n --format native      # Format N (original release)
python scripts/make_tiny_checkpoint.py /tmp/tiny-hf --format hf         # transformers layout
"""

from __future__ import annotations

import argparse

import dsv4_jax as d
from dsv4_jax.checkpoint import save_checkpoint


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="directory to create (must not exist)")
    ap.add_argument("--format", choices=["modelopt-nvfp4", "native", "hf"], default="modelopt-nvfp4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--layers", type=int, default=5, help="main layers (SWA, SWA, then CSA / HCA alternating)"
    )
    ap.add_argument("--no-mtp", action="store_true", help="no MTP block (the hf layout never has one)")
    ap.add_argument(
        "--max-shard-mb", type=float, default=1.0, help="shard size limit (small, to get several)"
    )
    args = ap.parse_args(argv)
    try:
        config = d.tiny(num_hidden_layers=args.layers, mtp=not args.no_mtp)
    except ValueError as e:  # ConfigError: an impossible configuration, refused before any work
        ap.error(str(e))
    # The original release stores MXFP4 experts; Format Q gets NVFP4 ones (MXFP4 would be cast losslessly).
    experts = "mxfp4" if args.format == "native" else "nvfp4"
    model = d.random_model(config, seed=args.seed, expert_format=experts)
    path = save_checkpoint(model, args.out, args.format, max_shard_bytes=int(args.max_shard_mb * 2**20))
    mtp = 0 if args.format == "hf" else config.num_nextn_predict_layers  # transformers' layout has no MTP
    print(f"wrote {path} ({args.format}, {config.num_hidden_layers} layers, {mtp} MTP)")


if __name__ == "__main__":
    main()

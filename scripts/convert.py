"""Load a checkpoint (Format Q / N / transformers layout) and save its parameter tree as an orbax cache that
``dsv4_jax.load_model`` restores directly into the requested shardings.

    python scripts/convert.py /models/DeepSeek-V4-Flash-NVFP4 /cache/dsv4-flash-nvfp4
"""

from __future__ import annotations

import argparse
import time

from dsv4_jax.checkpoint import load_model, save_cache


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="checkpoint directory to read")
    ap.add_argument("cache", help="orbax cache directory to create (must not exist)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    model = load_model(args.checkpoint)
    t1 = time.perf_counter()
    save_cache(model, args.cache)
    t2 = time.perf_counter()
    print(f"loaded {args.checkpoint} in {t1 - t0:.1f} s, wrote {args.cache} in {t2 - t1:.1f} s")


if __name__ == "__main__":
    main()

"""Build the offline tiny tokenizer and random checkpoints (see alignment/utils/tiny_assets.py)."""

from __future__ import annotations

import argparse
import json

from alignment.utils.tiny_assets import DEFAULT_DATA_DIR, MODEL_PRESETS, build_tiny_assets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", default="assets/tiny")
    parser.add_argument("--preset", default="tiny", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="example data the tokenizer is trained on")
    parser.add_argument(
        "--architectures", nargs="+", default=["llama"], help="model types to build, e.g. llama qwen2 mistral"
    )
    args = parser.parse_args()
    paths = build_tiny_assets(
        args.output_dir, preset=args.preset, seed=args.seed, data_dir=args.data_dir, architectures=args.architectures
    )
    print(json.dumps(paths, indent=2))


if __name__ == "__main__":
    main()

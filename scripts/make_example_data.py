"""Regenerate the example datasets under data/ (deterministic; see alignment/data/example_task.py)."""

from __future__ import annotations

import argparse
import json

from alignment.data.example_task import write_example_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", default="data", help="where to write safe_rlhf/ and alpaca/ (default: data)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = write_example_data(args.output_dir, seed=args.seed)
    print(json.dumps(counts, indent=2))


if __name__ == "__main__":
    main()

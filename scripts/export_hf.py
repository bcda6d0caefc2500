"""Export a policy, reward/cost model or critic as a Hugging Face (transformers) directory.

    python scripts/export_hf.py --input output/ppo/policy --output hf/policy
    python scripts/export_hf.py --input output/rm --output hf/reward

A causal LM becomes ``LlamaForCausalLM`` (``AutoModelForCausalLM.from_pretrained``); a score model
becomes ``LlamaForSequenceClassification`` with ``num_labels = score_dim`` and the score-head bias in
``config.score_head_bias``. Tokenizer files (``tokenizer.model``, ``tokenizer_config.json`` with the
chat template) and ``generation_config.json`` are written too. The logic is
``alignment.models.hf_convert.export_hf_checkpoint``; see docs/models.md.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="our save_pretrained directory (policy, reward, cost or critic)")
    parser.add_argument("--output", required=True, help="directory to write (created; must be empty or absent)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.input):
        parser.error(f"input: no such directory: {args.input!r}")
    if os.path.isdir(args.output) and os.listdir(args.output):
        parser.error(f"output: {args.output!r} exists and is not empty")
    from alignment.models.hf_convert import HFCheckpointError, export_hf_checkpoint

    try:
        path = export_hf_checkpoint(args.input, args.output)
    except HFCheckpointError as error:
        parser.error(str(error))
    print(path)
    return path


if __name__ == "__main__":
    main(sys.argv[1:])

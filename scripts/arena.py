"""The Safe RLHF arena (red vs blue policy, judged by a reward and a cost model): see alignment/evaluate/arena.py.

    python scripts/arena.py --red-policy SFT_DIR --blue-policy PPO_LAG_DIR/policy --reward-model RM_DIR \\
        --cost-model CM_DIR --prompts PKU-SafeRLHF/test:1:data/safe_rlhf/test.jsonl --output arena.json
"""

import sys

from alignment.evaluate.arena import main

if __name__ == "__main__":
    main(sys.argv[1:])

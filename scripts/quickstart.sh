#!/usr/bin/env bash
# The whole pipeline on a CPU in minutes: tiny tokenizer + model -> SFT -> reward model -> PPO ->
# evaluation, each stage through its public entry point and JSON file (config/tiny/*.json).
#
#   bash scripts/quickstart.sh [--output-dir DIR] [--algorithm ppo|dpo|grpo|rloo|reinforce_plus_plus] [--safe]
#                              [--sft-from DIR] [--sft-args "..."] [--rm-args "..."] [--cm-args "..."]
#                              [--ppo-args "..."] [--dpo-args "..."] [--eval-samples N]
#
# --*-args are extra "--field value" overrides appended to that stage's JSON arguments.
# --algorithm chooses the alignment stage after SFT (ppo: reward model + PPO; dpo: DPO directly on the
# preference pairs, config/tiny/dpo_argument.json, with a reward model only to score the evaluations;
# grpo, rloo, reinforce_plus_plus: critic-free RL on the example task's rule reward,
# config/tiny/grpo_argument.json with --rl_algorithm; their --ppo-args override that file); --sft-from DIR
# reuses an SFT checkpoint (skips the asset and SFT stages, e.g. to compare algorithms from one SFT model).
# --safe (Safe RLHF, = --algorithm ppo_lag): also trains a cost model on the example data's safety labels
# (config/tiny/cm_argument.json) and runs PPO-Lagrangian (config/tiny/ppo_lag_argument.json), then the
# arena SFT vs PPO-Lag judged by both models (arena.json, plots/arena.png).
# Ends with DIR/report.json, PNG curves in DIR/plots/ and a table of generations before/after PPO.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=quickstart_output
ALGORITHM=ppo
SFT_FROM=""
SFT_ARGS=""
RM_ARGS=""
CM_ARGS=""
PPO_ARGS=""
DPO_ARGS=""
EVAL_SAMPLES=4
while [ $# -gt 0 ]; do
  case "$1" in
    --output-dir) OUT="$2"; shift 2 ;;
    --algorithm) ALGORITHM="$2"; shift 2 ;;
    --sft-from) SFT_FROM="$2"; shift 2 ;;
    --sft-args) SFT_ARGS="$2"; shift 2 ;;
    --rm-args) RM_ARGS="$2"; shift 2 ;;
    --cm-args) CM_ARGS="$2"; shift 2 ;;
    --safe) ALGORITHM=ppo_lag; shift ;;
    --ppo-args) PPO_ARGS="$2"; shift 2 ;;
    --dpo-args) DPO_ARGS="$2"; shift 2 ;;
    --eval-samples) EVAL_SAMPLES="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done

case "$ALGORITHM" in
  ppo|ppo_lag) ;;
  dpo) ;;
  grpo|rloo|reinforce_plus_plus) ;;
  *) echo "unknown --algorithm: $ALGORITHM (choose from: ppo, ppo_lag (= --safe), dpo, grpo, rloo, reinforce_plus_plus)" >&2; exit 2 ;;
esac

PYTHON="${PYTHON:-python}"
export GLOG_minloglevel="${GLOG_minloglevel:-2}"
mkdir -p "$OUT"
SFT="${SFT_FROM:-$OUT/sft}"
printf '{"algorithm": "%s", "sft": "%s"}\n' "$ALGORITHM" "$SFT" > "$OUT/quickstart.json"
TIMES="$OUT/stage_seconds.json"
echo "{}" > "$TIMES"

stage() {  # stage NAME COMMAND... : run, time, and record the seconds under NAME
  local name="$1"; shift
  echo
  echo "==================== $name ===================="
  echo "+ $*"
  local start end
  start=$(date +%s.%N)
  "$@"
  end=$(date +%s.%N)
  "$PYTHON" - "$TIMES" "$name" "$start" "$end" <<'PY'
import json, sys
path, name, start, end = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
times = json.load(open(path)); times[name] = round(end - start, 1); json.dump(times, open(path, "w"), indent=2)
PY
}

TEST_PROMPTS="PKU-SafeRLHF/test:1:data/safe_rlhf/test.jsonl"

if [ -z "$SFT_FROM" ]; then
  stage assets "$PYTHON" scripts/make_tiny_assets.py --output-dir "$OUT/assets" --preset small
  # shellcheck disable=SC2086  # the *_ARGS are deliberately word-split into --field value pairs
  stage sft "$PYTHON" alignment/sft/run_sft.py config/tiny/sft_argument.json \
    --model_name_or_path "$OUT/assets/llama" --output_dir "$SFT" $SFT_ARGS
fi

run_ppo() {
  # shellcheck disable=SC2086
  stage reward_model "$PYTHON" alignment/rm/run_reward.py config/tiny/rm_argument.json \
    --model_name_or_path "$SFT" --output_dir "$OUT/rm" $RM_ARGS
  stage eval_sft "$PYTHON" scripts/evaluate_policy.py --policy "$SFT" --reward-model "$OUT/rm" \
    --prompts "$TEST_PROMPTS" --samples "$EVAL_SAMPLES" --output "$OUT/eval_sft.json"
  # shellcheck disable=SC2086
  stage ppo "$PYTHON" alignment/ppo/run_ppo.py config/tiny/ppo_argument.json \
    --actor_model_name_or_path "$SFT" --reward_model_name_or_path "$OUT/rm" --output_dir "$OUT/ppo" $PPO_ARGS
  stage eval_ppo "$PYTHON" scripts/evaluate_policy.py --policy "$OUT/ppo/policy" --reward-model "$OUT/rm" \
    --prompts "$TEST_PROMPTS" --samples "$EVAL_SAMPLES" --output "$OUT/eval_ppo.json"
}

run_dpo() {
  # The reward model is not used by DPO: it scores the SFT and DPO generations for the report.
  # shellcheck disable=SC2086
  stage reward_model "$PYTHON" alignment/rm/run_reward.py config/tiny/rm_argument.json \
    --model_name_or_path "$SFT" --output_dir "$OUT/rm" $RM_ARGS
  stage eval_sft "$PYTHON" scripts/evaluate_policy.py --policy "$SFT" --reward-model "$OUT/rm" \
    --prompts "$TEST_PROMPTS" --samples "$EVAL_SAMPLES" --output "$OUT/eval_sft.json"
  # shellcheck disable=SC2086
  stage dpo "$PYTHON" alignment/dpo/run_dpo.py config/tiny/dpo_argument.json \
    --model_name_or_path "$SFT" --output_dir "$OUT/dpo" $DPO_ARGS
  # eval_ppo.json: the aligned policy's evaluation, whatever the algorithm (report key ppo_task_score)
  stage eval_dpo "$PYTHON" scripts/evaluate_policy.py --policy "$OUT/dpo" --reward-model "$OUT/rm" \
    --prompts "$TEST_PROMPTS" --samples "$EVAL_SAMPLES" --output "$OUT/eval_ppo.json"
}

run_critic_free() {  # no reward model, no critic: the example task's ground truth is the reward
  stage eval_sft "$PYTHON" scripts/evaluate_policy.py --policy "$SFT" --reward-functions task_score \
    --prompts "$TEST_PROMPTS" --samples "$EVAL_SAMPLES" --output "$OUT/eval_sft.json"
  # shellcheck disable=SC2086
  stage "$ALGORITHM" "$PYTHON" alignment/ppo/run_ppo.py config/tiny/grpo_argument.json --rl_algorithm "$ALGORITHM" \
    --actor_model_name_or_path "$SFT" --output_dir "$OUT/$ALGORITHM" $PPO_ARGS
  stage eval_policy "$PYTHON" scripts/evaluate_policy.py --policy "$OUT/$ALGORITHM/policy" --reward-functions task_score \
    --prompts "$TEST_PROMPTS" --samples "$EVAL_SAMPLES" --output "$OUT/eval_ppo.json"
}

run_ppo_lag() {  # Safe RLHF: reward model + cost model -> PPO-Lagrangian -> arena
  # shellcheck disable=SC2086
  stage reward_model "$PYTHON" alignment/rm/run_reward.py config/tiny/rm_argument.json \
    --model_name_or_path "$SFT" --output_dir "$OUT/rm" $RM_ARGS
  # shellcheck disable=SC2086
  stage cost_model "$PYTHON" alignment/rm/run_cost.py config/tiny/cm_argument.json \
    --model_name_or_path "$SFT" --output_dir "$OUT/cm" $CM_ARGS
  stage eval_sft "$PYTHON" scripts/evaluate_policy.py --policy "$SFT" --reward-model "$OUT/rm" \
    --prompts "$TEST_PROMPTS" --samples "$EVAL_SAMPLES" --output "$OUT/eval_sft.json"
  # shellcheck disable=SC2086
  stage ppo_lag "$PYTHON" alignment/ppo/run_ppo.py config/tiny/ppo_lag_argument.json \
    --actor_model_name_or_path "$SFT" --reward_model_name_or_path "$OUT/rm" --cost_model_name_or_path "$OUT/cm" \
    --output_dir "$OUT/ppo_lag" $PPO_ARGS
  stage eval_ppo "$PYTHON" scripts/evaluate_policy.py --policy "$OUT/ppo_lag/policy" --reward-model "$OUT/rm" \
    --prompts "$TEST_PROMPTS" --samples "$EVAL_SAMPLES" --output "$OUT/eval_ppo.json"
  stage arena "$PYTHON" scripts/arena.py --red-policy "$SFT" --red-name sft --blue-policy "$OUT/ppo_lag/policy" \
    --blue-name ppo_lag --reward-model "$OUT/rm" --cost-model "$OUT/cm" --prompts "$TEST_PROMPTS" \
    --samples "$EVAL_SAMPLES" --output "$OUT/arena.json" --plot "$OUT/plots/arena.png"
}

case "$ALGORITHM" in
  ppo) run_ppo ;;
  dpo) run_dpo ;;
  ppo_lag) run_ppo_lag ;;
  grpo|rloo|reinforce_plus_plus) run_critic_free ;;
esac

echo
"$PYTHON" scripts/quickstart_report.py --output-dir "$OUT"

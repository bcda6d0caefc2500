"""The arithmetic behind the benchmark reports (FLOPs per phase, parameter counts, the memory lower bound)
against numbers worked out by hand, and the scaling script on a tiny grid. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from alignment.utils.benchmarking import (
    ModelShape,
    forward_flops,
    llama_param_count,
    measure_gemm_peak,
    memory_lower_bound_bytes,
    ppo_phase_flops,
)

# vocab 10, hidden 4, intermediate 6, 1 layer, 2 query heads (head dim 2), 1 key/value head (GQA).
TINY = ModelShape(vocab=10, hidden=4, intermediate=6, layers=1, heads=2, kv_heads=1)


def test_layer_matmul_params_by_hand():
    # kv width = 1 head x 2 = 2.  q 4x4=16, o 4x4=16, k 4x2=8, v 4x2=8, gate/up/down 3 x 4x6=72 -> 120
    assert TINY.kv_width == 2
    assert TINY.layer_matmul_params == 16 + 16 + 8 + 8 + 72 == 120


def test_param_counts_by_hand():
    # embedding 10x4=40, layer 120 + 2 norms x 4 = 128, final norm 4, then the head
    assert llama_param_count(TINY, "lm") == 40 + 128 + 4 + 40 == 212  # LM head 4x10
    assert llama_param_count(TINY, "score") == 40 + 128 + 4 + 5 == 177  # score head 4x1 + bias
    assert llama_param_count(TINY, "none") == 172
    with pytest.raises(ValueError):
        llama_param_count(TINY, "tied")


def test_param_counts_match_the_paddle_models():
    import numpy as np
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    from alignment.models import LlamaModelForScore

    config = LlamaConfig(vocab_size=10, hidden_size=4, intermediate_size=6, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)  # fmt: skip

    def count(model):
        return int(sum(np.prod(p.shape) for p in model.parameters()))

    assert count(LlamaForCausalLM(config)) == llama_param_count(TINY, "lm")
    assert count(LlamaModelForScore(config, score_type="critic")) == llama_param_count(TINY, "score")


def test_forward_flops_by_hand():
    # 2 rows x 3 tokens = 6 tokens.  weight matmuls: 2 x 6 tokens x 120 params = 1440
    # attention (full 3x3 per head, summed over heads = hidden 4): Q.K^T 2 x 2 rows x 3 x 3 x 4 = 144, A.V 144
    # LM head on all 3 positions: 2 x 2 rows x 3 x 4 x 10 = 480
    assert forward_flops(TINY, rows=2, seq_len=3, head_positions=3) == 1440 + 288 + 480 == 2208
    # score head (out 1) on 3 positions: 2 x 2 x 3 x 4 x 1 = 48
    assert forward_flops(TINY, rows=2, seq_len=3, head_positions=3, head_out=1) == 1440 + 288 + 48
    # one decode token per row against 6 cache columns: matmuls 2 x 2 x 120 = 480,
    # attention 2 x (2 x 2 rows x 1 x 6 x 4) = 192, LM head 2 x 2 x 1 x 4 x 10 = 160
    assert forward_flops(TINY, rows=2, seq_len=1, head_positions=1, context_len=6) == 480 + 192 + 160


def test_ppo_phase_flops_by_hand():
    # 2 rows, prompt 3, 3 new tokens (6 in all)
    prefill = 1440 + 288 + 2 * 2 * 1 * 4 * 10  # LM head on the last prompt position: 160 -> 1888
    decode_full = 480 + 192 + 160  # each of the 2 decode steps attends over all 6 cache columns: 832
    # 12 tokens: matmuls 2 x 12 x 120 = 2880, attention 2 x (2 x 2 x 6 x 6 x 4) = 1152
    actor = 2880 + 1152 + 2 * 2 * 3 * 4 * 10  # LM head on the 3 response positions: 480 -> 4512
    scorer = 2880 + 1152 + 2 * 2 * 6 * 4 * 1  # score head on all 6 positions: 96 -> 4128
    flops = ppo_phase_flops(TINY, rows=2, prompt_len=3, new_tokens=3)
    assert flops == {
        "generation": prefill + 2 * decode_full,  # 3552
        "experience": 2 * actor + 2 * scorer,  # actor + reference, critic + reward: 17280
        "training": 3 * (actor + scorer),  # forward + backward of actor and critic: 25920
    }
    assert flops["generation"] == 3552 and flops["experience"] == 17280 and flops["training"] == 25920
    # causal decode: step 1 attends over 5 columns (attention 160 -> 800), step 2 over 6 (832)
    causal = ppo_phase_flops(TINY, rows=2, prompt_len=3, new_tokens=3, decode_context="causal")
    assert causal["generation"] == prefill + 800 + 832 == 3520
    free = ppo_phase_flops(TINY, rows=2, prompt_len=3, new_tokens=3, critic=False)
    assert free == {"generation": 3552, "experience": 2 * actor + scorer, "training": 3 * actor}
    # rollout_log_probs: no actor forward in experience; a reused actor forward: only its backward in training
    assert ppo_phase_flops(TINY, 2, 3, 3, actor_experience=False)["experience"] == actor + 2 * scorer == 12768
    assert ppo_phase_flops(TINY, 2, 3, 3, reused_actor_forward=True)["training"] == 2 * actor + 3 * scorer == 21408
    with pytest.raises(ValueError):
        ppo_phase_flops(TINY, 2, 3, 3, decode_context="half")


def test_reference_shape_counts():
    """The sizes docs/benchmarks.md and the scaling presets quote."""
    assert llama_param_count(ModelShape(8000, 256, 688, 4, 8, 8)) == 7_260_416
    assert llama_param_count(ModelShape(8000, 512, 1376, 7, 8, 8)) == 30_334_464
    assert llama_param_count(ModelShape(16000, 768, 2048, 12, 12, 12)) == 109_529_856


def test_memory_lower_bound():
    # trained: weight + gradient + AdamW m + v, 4 bytes each; frozen: the weight
    assert memory_lower_bound_bytes(1000, 500) == 1000 * 4 * 4 + 500 * 4 == 18_000
    assert memory_lower_bound_bytes(0, 0) == 0
    # the reference shape's PPO: actor + critic trained, reference + reward frozen
    lm, score = llama_param_count(ModelShape(8000, 256, 688, 4, 8, 8)), llama_param_count(ModelShape(8000, 256, 688, 4, 8, 8), "score")
    assert memory_lower_bound_bytes(lm + score, lm + score) == 20 * (lm + score)


def test_gemm_peak_is_a_positive_rate():
    assert measure_gemm_peak(1, size=64, repeats=2) > 0


def test_scaling_script_on_a_tiny_grid(repo_root, tmp_path):
    out = tmp_path / "rows.jsonl"
    out.write_text('{"kept": "a row of an earlier run"}\n')
    result = subprocess.run(
        [sys.executable, "scripts/benchmark_scaling.py", "--sizes", "tiny", "--new-tokens", "3", "--batches", "2",
         "--algorithms", "ppo,dpo", "--steps", "1", "--warmup", "0", "--prompt-len", "4", "--gemm-size", "64",
         "--out", str(out)],
        cwd=repo_root, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0] == {"kept": "a row of an earlier run"}  # appended, not overwritten
    rows = lines[1:]
    assert [(r["algorithm"], r["ok"]) for r in rows] == [("ppo", True), ("dpo", True)], rows
    ppo, dpo = rows[0]["result"], rows[1]["result"]
    assert rows[0]["params_per_model"] == llama_param_count(ModelShape(300, 32, 64, 2, 4, 4))
    assert ppo["config"]["warmup"] == 0 and ppo["config"]["new_tokens"] == 3
    for key in ("generation_gflops", "experience_gflops", "train_gflops", "memory_lower_bound_mb", "peak_rss_over_bound"):
        assert ppo[key] > 0, key
    assert dpo["param_counts"]["policy"] == rows[1]["params_per_model"]
    table = result.stdout.strip().splitlines()
    assert table[0].startswith("| size (params/model) | new tokens | batch | algorithm | step s")
    assert len(table) == 2 + 2 and "| ppo |" in table[2] and "| dpo |" in table[3]

    out.write_text("\n".join(json.dumps(row) for row in rows) + "\n")  # --table: the table of the file, no run
    again = subprocess.run([sys.executable, "scripts/benchmark_scaling.py", "--table", "--out", str(out)], cwd=repo_root,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert again.returncode == 0 and again.stdout.strip().splitlines() == table


def test_scaling_script_refuses_an_unknown_size(repo_root):
    result = subprocess.run([sys.executable, "scripts/benchmark_scaling.py", "--sizes", "3B"], cwd=repo_root,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2 and "unknown preset '3B'" in result.stderr

"""Check that rollout and training run on a CPU without AVX-512, by running them under emulation.

    python scripts/check_portable_cpu.py                    # native run, prints a JSON summary
    python scripts/check_portable_cpu.py --emulate Haswell  # also under qemu-x86_64 -cpu Haswell, compared

A tiny random Llama (GQA) decodes a left-padded prompt batch with the fast CPU decoder (greedy and
sampled), then takes one AdamW training step (forward, backward, update). With ``--emulate`` the same
script re-runs itself under user-mode QEMU emulating an AVX2-only CPU (``qemu-user`` from Debian:
``apt-get install qemu-user``), where Paddle reports no AVX-512F and the portable kernels must be
chosen without being forced; the emulated run must produce the same tokens and loss as the native one.
An AVX-512 instruction under QEMU does not always end in SIGILL (with qemu 7.2 the fused RMSNorm kernel
hangs), so the emulated run has a timeout, and a timeout is a failure. Exit code 0 = equal.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time


def native_run() -> dict:
    start = time.perf_counter()
    import numpy as np
    import paddle
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    from alignment.models.llama_cpu import enable_fast_cpu_llama
    from alignment.models.ppo_model_utils import make_position_ids
    from alignment.ppo.infer_utils import generate_rollout
    from alignment.utils.env import cpu_path_summary, cpu_supports_avx512f

    enable_fast_cpu_llama()
    paddle.seed(7)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_fused_rms_norm=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    mask = paddle.to_tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype="int64")
    ids = paddle.where(mask > 0, paddle.randint(3, 128, mask.shape), paddle.zeros_like(mask))
    rollout = dict(max_new_tokens=8, eos_token_id=-1, pad_token_id=0, backend="fast")
    greedy = generate_rollout(model, ids, mask, do_sample=False, **rollout)
    paddle.seed(1234)
    sampled = generate_rollout(model, ids, mask, do_sample=True, top_p=0.9, **rollout)

    model.train()
    optimizer = paddle.optimizer.AdamW(learning_rate=1e-3, parameters=model.parameters())
    full = paddle.ones_like(greedy)
    loss = model(greedy, attention_mask=full.astype("bool"), position_ids=make_position_ids(full), labels=greedy)[0]
    loss.backward()
    optimizer.step()
    with paddle.no_grad():
        after = float(model(greedy, attention_mask=full.astype("bool"), position_ids=make_position_ids(full), labels=greedy)[0])
    return {
        "cpu_has_avx512f": cpu_supports_avx512f(),
        "cpu_kernels": cpu_path_summary(),
        "greedy": greedy.numpy().tolist(),
        "sampled": sampled.numpy().tolist(),
        "loss_before": round(float(loss), 5),
        "loss_after_one_step": round(after, 5),
        "finite": bool(np.isfinite(float(loss)) and np.isfinite(after)),
        "seconds": round(time.perf_counter() - start, 1),
    }


def emulated_run(cpu: str, timeout: float) -> dict:
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        raise SystemExit("qemu-x86_64 not found: install Debian's qemu-user (apt-get install qemu-user)")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MKL_DEBUG_CPU_TYPE", None)  # let the emulated CPU pick MKL's own path
    start = time.perf_counter()
    try:
        result = subprocess.run(
            [qemu, "-cpu", cpu, sys.executable, os.path.abspath(__file__), "--json-only"],
            capture_output=True, text=True, timeout=timeout, env=env,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s under qemu -cpu {cpu} (an unsupported instruction hangs QEMU)"}
    if result.returncode != 0:
        return {"error": f"exit code {result.returncode} under qemu -cpu {cpu}: {result.stderr[-2000:]}"}
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    summary["wall_seconds_emulated"] = round(time.perf_counter() - start, 1)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--emulate", metavar="CPU", help="also run under qemu-x86_64 -cpu CPU (e.g. Haswell) and compare")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds for the emulated run")
    parser.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("GLOG_minloglevel", "2")
    native = native_run()
    if args.json_only:
        print(json.dumps(native))
        return 0
    report = {"native": native}
    ok = native["finite"]
    if args.emulate:
        emulated = emulated_run(args.emulate, args.timeout)
        report["emulated"] = emulated
        same = "error" not in emulated and all(
            emulated[key] == native[key] for key in ("greedy", "sampled", "loss_before", "loss_after_one_step")
        )
        portable = "error" not in emulated and not emulated["cpu_has_avx512f"]
        report["emulated_equals_native"] = same
        ok = ok and same and portable
    print(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

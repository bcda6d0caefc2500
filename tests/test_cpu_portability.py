"""The portable CPU path: every AVX-512-only Paddle kernel has a twin that runs on any x86-64 (AVX2),
ARM or macOS CPU with the same result, and ``ALIGNMENT_PORTABLE_CPU=1`` forces it here so that CI (on
an AVX-512 machine) runs what AVX2-only users run. See alignment/models/kernels.py and
alignment/utils/env.py; docs/installation.md lists the CPU paths.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest
from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

from alignment.models import kernels, llama_cpu
from alignment.models.infer_model_utils import KVDecoder
from alignment.models.kernels import cpu_model_flag_problems, portable_rms_norm, select_rms_norm
from alignment.models.ppo_model_utils import gather_log_probabilities, make_position_ids
from alignment.ppo.infer_utils import generate_rollout
from alignment.utils import env
from alignment.utils.config import ConfigError, Problems
from alignment.utils.stage import check_model_paths

VOCAB = 200
PROMPT_MASK = [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]]


def tiny_llama(num_kv_heads=2, seed=7, **overrides) -> LlamaForCausalLM:
    paddle.seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=num_kv_heads, max_position_embeddings=64, **overrides,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def prompts(seed=11):
    paddle.seed(seed)
    mask = paddle.to_tensor(PROMPT_MASK, dtype="int64")
    ids = paddle.randint(3, VOCAB, mask.shape)
    return paddle.where(mask > 0, ids, paddle.zeros_like(ids)), mask


def reference_rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


# --------------------------------------------------------------------------------------------------
# the switch
# --------------------------------------------------------------------------------------------------


def test_forcing_and_cpu_features_choose_the_kernel(monkeypatch):
    monkeypatch.setenv(env.PORTABLE_CPU_ENV, "1")
    assert env.portable_cpu_forced() and not env.avx512_kernels_enabled()
    assert select_rms_norm() is portable_rms_norm
    assert "forced by ALIGNMENT_PORTABLE_CPU" in env.cpu_path_summary()
    for off in ("0", "", "false"):
        monkeypatch.setenv(env.PORTABLE_CPU_ENV, off)
        assert not env.portable_cpu_forced()
        assert env.avx512_kernels_enabled() == env.cpu_supports_avx512f()
    # An AVX2-only CPU (what Paddle's cpuid check reports there): portable without being forced.
    monkeypatch.delenv(env.PORTABLE_CPU_ENV)
    monkeypatch.setattr(env, "cpu_supports_avx512f", lambda: False)
    assert select_rms_norm() is portable_rms_norm
    assert "no AVX-512F" in env.cpu_path_summary()
    monkeypatch.setattr(env, "cpu_supports_avx512f", lambda: True)
    assert select_rms_norm() is kernels.fused_rms_norm


def test_paddle_reports_the_avx512_flag_of_proc_cpuinfo():
    flags = env.cpu_flags()
    if flags:  # Linux: Paddle's cpuid check and the kernel's feature list agree
        assert env.cpu_supports_avx512f() == ("avx512f" in flags)
    else:
        assert not os.path.exists(env.CPUINFO)


# --------------------------------------------------------------------------------------------------
# same results
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [[8, 256], [3, 5, 64], [2, 1, 4096]])
@pytest.mark.parametrize("with_residual", [False, True])
def test_portable_rms_norm_equals_the_fused_kernel_and_the_formula(shape, with_residual):
    paddle.seed(0)
    x, residual = paddle.randn(shape) * 3, paddle.randn(shape) if with_residual else None
    w = paddle.rand(shape[-1:]) + 0.5
    summed = x.numpy() + (residual.numpy() if with_residual else 0)
    expected = reference_rms_norm(summed, w.numpy(), 1e-6)
    normed, carried = portable_rms_norm(x, w, 1e-6, residual)
    np.testing.assert_allclose(normed.numpy(), expected, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(carried.numpy(), summed, rtol=0, atol=0)
    if kernels.fused_rms_norm_usable():  # the fused kernel where this CPU can run it (AVX-512F)
        fused, fused_carried = kernels.fused_rms_norm(x, w, 1e-6, residual)
        np.testing.assert_allclose(normed.numpy(), fused.numpy(), rtol=2e-6, atol=2e-6)
        np.testing.assert_array_equal(carried.numpy(), fused_carried.numpy())


def test_llama_use_fused_rms_norm_runs_on_cpu_and_portably_when_forced(monkeypatch):
    """PaddleNLP's own fused path imports the GPU-only ``fused_ln`` package; on CPU the flag runs
    Paddle's fused kernel where the CPU has AVX-512F and the portable twin otherwise."""
    model = tiny_llama(use_fused_rms_norm=True)
    layer = model.llama.norm
    x = paddle.randn([2, 3, 64])
    expected = reference_rms_norm(x.numpy(), layer.weight.numpy(), layer.variance_epsilon)
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=2e-6, atol=2e-6)  # default path
    ids = paddle.randint(3, VOCAB, [2, 5])
    with paddle.no_grad():
        default_logits = model(ids)[0].numpy()
    monkeypatch.setenv(env.PORTABLE_CPU_ENV, "1")
    monkeypatch.setattr(kernels, "fused_rms_norm", lambda *a, **k: pytest.fail("fused kernel ran while forced off"))
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=2e-6, atol=2e-6)
    with paddle.no_grad():
        np.testing.assert_allclose(model(ids)[0].numpy(), default_logits, rtol=1e-5, atol=1e-5)


def test_llama_use_fused_rms_norm_trains_on_cpu():
    """Paddle registers no CPU backward for fused_rms_norm: training must take the portable path."""
    model = tiny_llama(use_fused_rms_norm=True)
    model.train()
    ids = paddle.randint(3, VOCAB, [2, 5])
    loss = model(ids, labels=ids)[0]
    loss.backward()
    grad = model.llama.norm.weight.grad
    assert grad is not None and bool(paddle.isfinite(grad).all()) and float(grad.abs().sum()) > 0


def decoder_logits(model, ids, mask, response):
    with paddle.no_grad():
        decoder = KVDecoder(model, ids, mask, response.shape[1])
        logits = [decoder.prefill()]
        for t in range(response.shape[1] - 1):
            logits.append(decoder.step(response[:, t]))
    return decoder, paddle.stack(logits, axis=1)  # [B, N, V]


def test_portable_decoder_equals_fused_decoder_and_paddlenlp_forward(monkeypatch):
    model = tiny_llama(num_kv_heads=2)
    ids, mask = prompts()
    paddle.seed(3)
    response = paddle.randint(3, VOCAB, [3, 6])
    default_decoder, default_logits = decoder_logits(model, ids, mask, response)
    assert default_decoder.rms_norm is (kernels.fused_rms_norm if env.avx512_kernels_enabled() else portable_rms_norm)
    monkeypatch.setenv(env.PORTABLE_CPU_ENV, "1")
    portable_decoder, portable_logits = decoder_logits(model, ids, mask, response)
    assert portable_decoder.rms_norm is portable_rms_norm
    np.testing.assert_allclose(portable_logits.numpy(), default_logits.numpy(), rtol=1e-5, atol=1e-5)
    # ... and PaddleNLP's own Llama forward (not our patched CPU kernels) gives the same log-probs.
    sequence = paddle.concat([ids, response], axis=1)
    full_mask = paddle.concat([mask, paddle.ones_like(response)], axis=1)
    llama_cpu.disable_fast_cpu_llama()
    try:
        with paddle.no_grad():
            plain = model(sequence, attention_mask=full_mask.astype("bool"), position_ids=make_position_ids(full_mask))[0]
    finally:
        llama_cpu.enable_fast_cpu_llama()
    train = gather_log_probabilities(plain[:, :-1], sequence[:, 1:])[:, ids.shape[1] - 1 :]
    fast = gather_log_probabilities(portable_logits, response)
    np.testing.assert_allclose(fast.numpy(), train.numpy(), atol=2e-5)


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_portable_rollout_tokens_equal_the_default_path_and_plain_generate(monkeypatch, do_sample):
    model = tiny_llama(num_kv_heads=2)
    ids, mask = prompts()
    kwargs = dict(max_new_tokens=10, eos_token_id=-1, pad_token_id=0, do_sample=do_sample, top_p=0.9, temperature=1.0)

    def rollout(backend):
        paddle.seed(1234)
        return generate_rollout(model, ids, mask, backend=backend, **kwargs).numpy()

    default = rollout("fast")
    monkeypatch.setenv(env.PORTABLE_CPU_ENV, "1")
    portable = rollout("fast")
    np.testing.assert_array_equal(portable, default)
    if not do_sample:  # the plain paddlenlp generate draws its random numbers differently
        np.testing.assert_array_equal(portable, rollout("plain"))


# --------------------------------------------------------------------------------------------------
# flags refused on CPU, MKL switch, machines without /proc/cpuinfo
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["use_flash_attention", "use_fused_rope"])
def test_gpu_only_model_flags_are_refused_on_cpu_before_loading(tmp_path, flag):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], flag: True}))
    problems = Problems("sft.json")
    check_model_paths(problems, model_name_or_path=str(model_dir))
    with pytest.raises(ConfigError) as error:
        problems.raise_if_any()
    message = str(error.value)
    assert "model_name_or_path" in message and f"{flag}=true" in message and "config.json" in message
    assert cpu_model_flag_problems({flag: True}, on_cpu=False) == []  # GPU: fine
    assert cpu_model_flag_problems({"use_fused_rms_norm": True}, on_cpu=True) == []  # guarded, not refused


def test_ppo_refuses_gpu_only_flags_of_any_model_on_cpu(tmp_path):
    from alignment.ppo.run_ppo import DataArgument, ModelArgument, TrainingArguments, validate_arguments

    reward = tmp_path / "rm"
    reward.mkdir()
    (reward / "config.json").write_text(json.dumps({"use_fused_rope": True}))
    model_args = ModelArgument(actor_model_name_or_path=str(tmp_path), reward_model_name_or_path=str(reward), use_flash_attention=True)
    data_args = DataArgument(train_datasets="PKU-SafeRLHF/train")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), do_train=True, report_to="none")
    with pytest.raises(ConfigError) as error:
        validate_arguments(model_args, data_args, args)
    message = str(error.value)
    assert "reward_model_name_or_path" in message and "use_fused_rope=true" in message
    assert "use_flash_attention" in message


def write_cpuinfo(tmp_path, vendor: str, flags: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: {flags}\n\nprocessor\t: 1\nvendor_id\t: {vendor}\n")
    return str(path)


def test_mkl_avx2_switch_needs_amd_with_avx2(monkeypatch, tmp_path):
    monkeypatch.delenv("MKL_DEBUG_CPU_TYPE", raising=False)
    monkeypatch.setattr(env, "CPUINFO", write_cpuinfo(tmp_path, "AuthenticAMD", "fpu sse2 avx"))
    assert env.cpu_vendor() == "AuthenticAMD" and "avx2" not in env.cpu_flags()
    assert not env.enable_fast_mkl_on_amd() and "MKL_DEBUG_CPU_TYPE" not in os.environ
    monkeypatch.setattr(env, "CPUINFO", write_cpuinfo(tmp_path, "GenuineIntel", "fpu avx avx2 avx512f"))
    assert not env.enable_fast_mkl_on_amd()
    monkeypatch.setattr(env, "CPUINFO", write_cpuinfo(tmp_path, "AuthenticAMD", "fpu avx avx2 fma"))
    assert env.enable_fast_mkl_on_amd() and os.environ["MKL_DEBUG_CPU_TYPE"] == "5"


@pytest.mark.parametrize(
    "flags, portable, expected",
    [
        ("avx2 avx512f avx512cd avx512bw avx512dq avx512vl", False, "7"),  # Zen 4/5: MKL's AVX-512 kernels
        ("avx2 avx512f avx512cd avx512bw avx512dq avx512vl", True, "5"),  # ALIGNMENT_PORTABLE_CPU: AVX2 only
        ("avx2 avx512f", False, "5"),  # AVX-512F without the subsets MKL's SKX kernels use
    ],
)
def test_mkl_avx512_kernels_only_with_every_subset_and_not_on_the_portable_path(monkeypatch, tmp_path, flags, portable, expected):
    monkeypatch.delenv("MKL_DEBUG_CPU_TYPE", raising=False)
    monkeypatch.setattr(env, "CPUINFO", write_cpuinfo(tmp_path, "AuthenticAMD", f"fpu avx {flags}"))
    monkeypatch.setattr(env, "cpu_supports_avx512f", lambda: True)
    if portable:
        monkeypatch.setenv(env.PORTABLE_CPU_ENV, "1")
    else:
        monkeypatch.delenv(env.PORTABLE_CPU_ENV, raising=False)
    assert env.mkl_cpu_type_for_amd() == expected
    assert env.enable_fast_mkl_on_amd() and os.environ["MKL_DEBUG_CPU_TYPE"] == expected
    monkeypatch.setattr(env, "cpu_supports_avx512f", lambda: False)  # Paddle's own cpuid check disagrees
    assert env.mkl_cpu_type_for_amd() == "5"


def test_no_proc_cpuinfo_imports_and_runs(monkeypatch, tmp_path):
    """macOS, Windows and some containers have no /proc/cpuinfo: nothing may assume it."""
    monkeypatch.delenv("MKL_DEBUG_CPU_TYPE", raising=False)
    monkeypatch.setattr(env, "CPUINFO", str(tmp_path / "missing"))
    assert env.cpu_vendor() == "" and env.cpu_flags() == frozenset()
    assert not env.enable_fast_mkl_on_amd() and "MKL_DEBUG_CPU_TYPE" not in os.environ
    assert env.setup_cpu_runtime(1) == 1
    assert isinstance(env.avx512_kernels_enabled(), bool)


# --------------------------------------------------------------------------------------------------
# CI runs the fast-rollout tests and one end-to-end PPO run with the portable path forced
# --------------------------------------------------------------------------------------------------


def forced_env() -> dict:
    return dict(os.environ, **{env.PORTABLE_CPU_ENV: "1", "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_rollout_tests_pass_with_the_portable_path_forced(repo_root):
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_rollout.py"],
        cwd=repo_root, env=forced_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


@pytest.mark.slow
def test_ppo_end_to_end_with_the_portable_path_forced(tmp_path, tiny_assets, tiny_score_model, repo_root):
    from test_ppo_e2e import RUN_PPO, write_config

    from alignment.utils.metrics import read_metrics

    output = tmp_path / "ppo"
    config = write_config(
        tmp_path / "ppo.json", tiny_assets, tiny_score_model, repo_root, output_dir=str(output),
        max_steps=2, per_device_prompt_batch_size=4, rollout_backend="fast",
    )  # fmt: skip
    result = subprocess.run(
        [sys.executable, RUN_PPO, config], cwd=repo_root, env=forced_env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "portable CPU kernels (forced by ALIGNMENT_PORTABLE_CPU)" in result.stdout + result.stderr
    records = [r for r in read_metrics(str(output)) if "train/actor_loss" in r]
    assert records and records[-1]["step"] == 2  # one rollout of 2 micro-batches = 2 optimizer steps
    assert all(np.isfinite(r["train/actor_loss"]) for r in records)


_HOLES = """
import ctypes
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss_kb():
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) for l in status if l.startswith("VmRSS"))
def block(size):
    pointer = libc.malloc(size); ctypes.memset(pointer, 1, size); return pointer  # touched: resident
libc.free(libc.malloc(8 << 20))  # a freed mmap-ed block: glibc's threshold rises, 1 MiB blocks come from the heap
base = rss_kb()
big, small = [], []
for _ in range(50):  # 50 MiB of activation-sized blocks with small live blocks between them
    big.append(block(1 << 20)); small.append(block(1024))
for p in big: libc.free(p)
held = rss_kb() - base
from alignment.utils.env import release_free_memory
assert not release_free_memory(min_bytes=100 << 20)  # 50 MiB free: under this floor nothing is trimmed
kept = rss_kb() - base
assert release_free_memory(min_bytes=40 << 20)
print(held // 1024, kept // 1024, (rss_kb() - base) // 1024)
"""


def test_release_free_memory_gives_heap_holes_back_to_the_os():
    """Freed activation-sized blocks between live ones stay resident until ``release_free_memory``."""
    import subprocess
    import sys

    env_vars = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _HOLES], capture_output=True, text=True, env=env_vars, check=True)
    held, kept, after = map(int, out.stdout.split()[-3:])
    assert held >= 45 and kept >= 45 and after <= 5, (held, kept, after)


_REFAULTS = """
import ctypes, resource, sys
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "keep":
    from alignment.utils.env import setup_cpu_runtime
    setup_cpu_runtime(1)  # calls keep_freed_tensor_memory
size = 8 << 20  # an activation-sized tensor
def touch_once():
    pointer = libc.malloc(size); ctypes.memset(pointer, 1, size); libc.free(pointer)
touch_once()  # by default mmap-ed, and unmapped when freed (glibc then serves this size from its heap)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch_once()  # the same size again: new page faults unless the freed block stayed mapped
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, size // 4096)
"""


@pytest.mark.parametrize("mode", ["keep", "default"])
def test_keep_freed_tensor_memory_saves_the_page_faults_of_the_next_tensor(mode, repo_root):
    """After ``setup_cpu_runtime`` (:func:`keep_freed_tensor_memory`) a freed 8 MiB block serves the next
    one without faulting its pages in again; glibc's default gives it back to the OS (all pages fault)."""
    env_vars = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env_vars["PYTHONPATH"] = str(repo_root)
    out = subprocess.run([sys.executable, "-c", _REFAULTS, mode], capture_output=True, text=True, env=env_vars, check=True)
    faults, pages = map(int, out.stdout.split()[-2:])
    if mode == "keep":
        assert faults < pages // 10, (faults, pages)
    else:
        assert faults >= pages * 9 // 10, (faults, pages)


@pytest.mark.parametrize("setting", ["MALLOC_TRIM_THRESHOLD_=1000000", "GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4096"])
def test_keep_freed_tensor_memory_leaves_a_users_malloc_tuning_alone(setting, monkeypatch):
    name, value = setting.split("=", 1)
    monkeypatch.setenv(name, value)
    assert env.keep_freed_tensor_memory() is False

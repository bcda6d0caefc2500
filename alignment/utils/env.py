"""CPU runtime set-up for Paddle: math threads, the MKL code path and glibc malloc's thresholds.

What actually controls Paddle's CPU math (paddlepaddle 3.3.1 CPU wheel, measured on a 2-core AMD EPYC):

* ``import paddle`` sets ``OMP_NUM_THREADS=1`` in ``os.environ`` when the user did not set it
  (``paddle/base/__init__.py: __bootstrap__``), so by default every matmul runs on one thread.
* ``paddle.base.core.set_num_threads(n)`` changes the OpenMP/MKL thread count **at run time**, for
  the calling thread (dygraph ops run on the Python thread that calls them). There is no public
  ``paddle.set_num_threads``. A 2048x2048 fp32 matmul: 37 GFLOP/s with 1 thread, 57-73 GFLOP/s
  after ``set_num_threads(2)``. Setting ``os.environ["OMP_NUM_THREADS"]`` after ``import paddle``
  has no effect on the running process.
* Paddle's CPU matmul calls ``cblas_sgemm`` from its bundled MKL (``libmklml_intel.so``, "MKL 2019.0
  Update 5"). On AMD CPUs that MKL picks its slow generic code path; ``MKL_DEBUG_CPU_TYPE=5`` makes it
  use the AVX2 kernels and ``7`` its AVX-512 kernels. MKL reads the variable at its first call, so
  setting it in ``os.environ`` works any time before the first matmul of the process (also after
  ``import paddle``). Measured, 1 thread: [8, 256] x [256, 8000] 1920 us -> 354 us, 512^3 40 -> 105
  GFLOP/s with ``5``; 2 threads, 2048^3: 236 (``5``) -> 436 GFLOP/s (``7``). (MKL >= 2020.1 ignores the
  variable.) It is set only on AMD CPUs that report the instructions the value forces (AVX2; the
  AVX-512 subsets of :data:`MKL_AVX512_FLAGS`), and ``7`` never with ``ALIGNMENT_PORTABLE_CPU=1``.
* Every Paddle CPU tensor comes from glibc ``malloc``, whose default thresholds hand large freed blocks
  back to the OS, so the next tensor page-faults its memory in again (~10% of a small PPO step);
  :func:`keep_freed_tensor_memory` raises them.

CPU features. Some Paddle CPU kernels use instructions the wheel does not check for: the fused
RMSNorm kernel (``phi::fusion::RmsNormAvxKernel``, behind ``paddle.incubate.nn.functional.
fused_rms_norm``) executes AVX-512 unconditionally and kills the process with SIGILL on AVX2-only
CPUs (most laptops, AMD before Zen 4, many VMs). :func:`avx512_kernels_enabled` is the one switch
every such call site asks; it is False when the CPU lacks AVX-512F
(``paddle.base.core.supports_avx512f()``) or when ``ALIGNMENT_PORTABLE_CPU=1`` forces the portable
path, which is how CI exercises on an AVX-512 machine what AVX2-only users run. Nothing here assumes
``/proc/cpuinfo`` exists (macOS, Windows/WSL, ARM Linux): unknown features count as absent.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

logger = logging.getLogger(__name__)

# ``import paddle`` overwrites OMP_NUM_THREADS with "1" when it is unset, so a "1" seen later is
# ambiguous. Remember what the user had when this module was imported before paddle.
_PADDLE_WAS_IMPORTED = "paddle" in sys.modules
_USER_OMP_NUM_THREADS = None if _PADDLE_WAS_IMPORTED else os.environ.get("OMP_NUM_THREADS")

# Environment variables paddle.distributed.launch sets for each worker (controllers/collective.py):
# PADDLE_LOCAL_SIZE = processes on this node; PADDLE_TRAINERS_NUM = processes in the whole job.
_LOCAL_SIZE_VARS = ("PADDLE_LOCAL_SIZE",)
_GLOBAL_SIZE_VARS = ("PADDLE_TRAINERS_NUM", "PADDLE_GLOBAL_SIZE")


def _positive_int(value: str | None) -> int | None:
    try:
        number = int(value) if value is not None else None
    except ValueError:
        return None
    return number if number is not None and number > 0 else None


def available_cores() -> int:
    """Number of CPU cores this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def local_process_count() -> int:
    """Processes sharing this node, from the variables set by ``paddle.distributed.launch``.

    ``PADDLE_LOCAL_SIZE`` is exact; without it, ``PADDLE_TRAINERS_NUM`` (the whole job) is used, which
    is right for single-node jobs and conservative for multi-node ones. 1 outside a launch.
    """
    for name in _LOCAL_SIZE_VARS + _GLOBAL_SIZE_VARS:
        count = _positive_int(os.environ.get(name))
        if count is not None:
            return count
    return 1


def user_thread_setting() -> int | None:
    """Thread count the user asked for through ``OMP_NUM_THREADS``, or None.

    If this module was imported before paddle, the value seen then is used. Otherwise any value but
    "1" counts ("1" is what ``import paddle`` writes when the variable is unset).
    """
    if not _PADDLE_WAS_IMPORTED:
        return _positive_int(_USER_OMP_NUM_THREADS)
    count = _positive_int(os.environ.get("OMP_NUM_THREADS"))
    return count if count is not None and count > 1 else None


def default_num_threads() -> int:
    """Cores owned by this process divided among the local processes of the launch (at least 1)."""
    return max(1, available_cores() // local_process_count())


def configure_cpu_threads(num_threads: int | None = None) -> int:
    """Set Paddle's CPU math threads for the calling thread and return the number used.

    Priority: ``num_threads`` argument > ``OMP_NUM_THREADS`` set by the user > all cores this process
    owns divided by the local processes of a ``paddle.distributed.launch`` job.
    Applied with ``paddle.base.core.set_num_threads`` (takes effect immediately; see module docstring).
    """
    if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
        raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}")
    threads = num_threads or user_thread_setting() or default_num_threads()

    from paddle.base import core

    core.set_num_threads(threads)
    logger.info("Paddle CPU math threads: %d", threads)
    return threads


PORTABLE_CPU_ENV = "ALIGNMENT_PORTABLE_CPU"
CPUINFO = "/proc/cpuinfo"  # Linux only; elsewhere every feature reads as unknown


def portable_cpu_forced() -> bool:
    """True if ``ALIGNMENT_PORTABLE_CPU`` asks for the portable kernels (``1``/``true``/``yes``/``on``)."""
    return os.environ.get(PORTABLE_CPU_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _cpuinfo_field(name: str) -> str:
    """The first ``name : value`` line of /proc/cpuinfo, "" where there is no such file or line."""
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (e.g. ``avx2``, ``avx512f``); empty where unknown."""
    return frozenset(_cpuinfo_field("flags").split())


def cpu_supports_avx512f() -> bool:
    """Whether this CPU executes AVX-512F, as Paddle itself detects it (cpuid; any OS)."""
    try:
        from paddle.base import core
    except ImportError:  # pragma: no cover - paddle is a dependency
        return "avx512f" in cpu_flags()
    return bool(core.supports_avx512f())


def avx512_kernels_enabled() -> bool:
    """May Paddle's AVX-512-only CPU kernels run here? False on CPUs without AVX-512F and whenever
    ``ALIGNMENT_PORTABLE_CPU`` forces the portable path (read at each call: tests toggle it)."""
    return not portable_cpu_forced() and cpu_supports_avx512f()


def cpu_path_summary() -> str:
    """One line for logs and benchmark reports: which CPU kernel path this process uses and why."""
    if portable_cpu_forced():
        return f"portable CPU kernels (forced by {PORTABLE_CPU_ENV})"
    if cpu_supports_avx512f():
        return "AVX-512 CPU kernels (fused RMSNorm)"
    return "portable CPU kernels (no AVX-512F on this CPU)"


def cpu_vendor() -> str:
    """The CPU vendor id from /proc/cpuinfo (e.g. "AuthenticAMD", "GenuineIntel"), "" if unknown."""
    return _cpuinfo_field("vendor_id")


#: What MKL's AVX-512 ("SKX") sgemm kernels execute; Intel Skylake-SP and AMD Zen 4 onwards report all five.
MKL_AVX512_FLAGS = ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl")


def mkl_cpu_type_for_amd() -> str | None:
    """The ``MKL_DEBUG_CPU_TYPE`` Paddle's bundled MKL should get on this CPU, or None to leave MKL alone.

    ``"7"`` (MKL's AVX-512 kernels) on AMD CPUs reporting every flag of :data:`MKL_AVX512_FLAGS` while
    AVX-512 kernels are allowed (:func:`avx512_kernels_enabled`: not with ``ALIGNMENT_PORTABLE_CPU=1``);
    ``"5"`` (AVX2 kernels) on other AMD CPUs reporting AVX2; None on other vendors (MKL picks its best
    kernels there itself), without AVX2, or where /proc/cpuinfo is missing.
    """
    flags = cpu_flags()
    if cpu_vendor() != "AuthenticAMD" or "avx2" not in flags:
        return None
    if all(flag in flags for flag in MKL_AVX512_FLAGS) and avx512_kernels_enabled():
        return "7"
    return "5"


def enable_fast_mkl_on_amd() -> bool:
    """Make Paddle's bundled MKL use its AVX-512 or AVX2 sgemm kernels on AMD CPUs; True if set here.

    Sets ``MKL_DEBUG_CPU_TYPE`` to :func:`mkl_cpu_type_for_amd` unless the user set it. Must run before
    the process's first matmul (MKL reads it once); calling it after ``import paddle`` is fine. Matmul
    results change only by floating-point rounding. Measured on a 2-core AMD EPYC (Zen 5), 2 threads,
    fp32 GFLOP/s of ``[768, 256] x [256, 768]``: ``"5"`` 255, ``"7"`` 500.

    The values follow MKL's code branches (``MKL_CBWR``): 5 = AVX2, 7 = AVX512 (Xeon kernels: F, CD,
    BW, DQ, VL). 6 and 8 are the Xeon Phi branches (AVX512_MIC, AVX512_MIC_E1): their kernels use
    AVX512ER/4FMAPS and kill the process with SIGILL on any other CPU (measured: 6 passes a GEMM test,
    then faults inside a Llama forward), so they are never set.
    """
    value = mkl_cpu_type_for_amd()
    if "MKL_DEBUG_CPU_TYPE" in os.environ or value is None:
        return False
    os.environ["MKL_DEBUG_CPU_TYPE"] = value
    return True


#: :func:`release_free_memory` trims only when at least this much freed memory sits in the C heap.
RELEASE_FREE_MEMORY_MIN_BYTES = 256 << 20


def release_free_memory(min_bytes: int = RELEASE_FREE_MEMORY_MIN_BYTES) -> bool:
    """Give the freed holes of the C heap back to the OS (glibc ``malloc_trim(0)``) when they hold at least
    ``min_bytes`` (``mallinfo2().fordblks``); True if it trimmed.

    glibc serves activation-sized tensors from its heap once its dynamic mmap threshold has risen (it
    does after the first large free), and the holes they leave between live blocks stay resident. On
    the 110M-parameter PPO step that made peak RSS 6.1 GB for 5.3 GB of live memory; trimming at the
    start of the rollout and of the update brings it to 5.7 GB. Trimming costs page faults when the
    memory is used again: always trimming made the 7M-parameter reference step 15% slower, hence the
    ``min_bytes`` floor (small models keep their few free MB). A low fixed mmap threshold instead
    (``MALLOC_MMAP_THRESHOLD_``) reached 5.3 GB but cost 6-11% of the step at 1 MiB and doubled it at
    128 KiB (every activation mmap-ed and page-faulted anew); :func:`keep_freed_tensor_memory` sets high
    ones, for speed, and relies on this function for the memory. A no-op where the C library is not
    glibc >= 2.33 (no ``mallinfo2``).
    """
    try:
        libc = _glibc()
        if libc.mallinfo2().fordblks < min_bytes:
            return False
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):  # not Linux/glibc, or glibc < 2.33
        return False


@functools.lru_cache(maxsize=None)
def _glibc():
    """The C library (``ctypes.CDLL``), loaded once, with ``mallinfo2``'s return type declared when it
    has one; raises ``OSError`` where there is no ``libc.so.6``. (:func:`release_free_memory` runs before
    every model's update, so the handle is not looked up each time.)"""
    import ctypes

    class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2 (all size_t)
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )]  # fmt: skip

    libc = ctypes.CDLL("libc.so.6")
    if hasattr(libc, "mallinfo2"):  # glibc >= 2.33
        libc.mallinfo2.restype = MallInfo2
    return libc


#: glibc ``mallopt`` parameter numbers (``malloc.h``).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Environment variables through which a user tunes glibc malloc; :func:`keep_freed_tensor_memory` then
#: leaves it alone.
MALLOC_ENV_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
#: With :func:`keep_freed_tensor_memory`, blocks up to this size come from glibc's heap, not from ``mmap``
#: (activation-sized tensors of small and medium models; larger ones are dominated by their own compute,
#: and keeping them in the heap fragments it: 32 or 64 MiB cost 1.9 GB more peak RSS at 110M parameters
#: and 1024 new tokens, 16 MiB 0.1 GB).
TENSOR_MMAP_THRESHOLD = 16 << 20
#: ... and the heap's free top is given back to the OS only past this size.
TENSOR_TRIM_THRESHOLD = 256 << 20


def keep_freed_tensor_memory() -> bool:
    """Let a freed tensor's memory serve the next tensor without new page faults; True if set here.

    Paddle's CPU allocator takes every tensor from glibc ``malloc``. By default glibc gives freed blocks
    of more than 128 KiB-32 MiB back to the OS (``munmap``, or trimming the heap top past its dynamic trim
    threshold), so the next tensor of that size faults all its pages in again: a fresh [8, 64, 8000]
    float32 copy took 7.5 ms instead of 1.1 ms, the log-prob pass over it 22 ms instead of 10 ms. Fixed
    thresholds (``mallopt``: :data:`TENSOR_MMAP_THRESHOLD`, :data:`TENSOR_TRIM_THRESHOLD`) keep that
    memory mapped, and :func:`release_free_memory` still returns large free holes to the OS at the RL
    loop's phase boundaries. Measured on the 7M PPO reference step (AVX2 path, alternating runs): 0.67-0.75
    -> 0.61-0.65 s (the same thresholds save TRL/torch ~0.02 s); peak RSS at 110M parameters 5.52 GB
    (1.40x the fp32 bound) for 64 new tokens, 15.9 GB (glibc's defaults: 15.7) for 1024. Does nothing
    when the user tunes malloc (:data:`MALLOC_ENV_VARS`, ``GLIBC_TUNABLES=glibc.malloc...``) or the C
    library is not glibc.
    """
    if any(name in os.environ for name in MALLOC_ENV_VARS) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = _glibc()
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, TENSOR_MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, TENSOR_TRIM_THRESHOLD)
        )
    except (OSError, AttributeError):  # not Linux/glibc
        return False


def setup_cpu_runtime(num_threads: int | None = None) -> int:
    """Everything a CPU run needs before its first matmul; returns the math threads used.

    MKL's AVX-512/AVX2 kernels on AMD (:func:`enable_fast_mkl_on_amd`), freed tensor memory kept for
    reuse (:func:`keep_freed_tensor_memory`), the thread count (:func:`configure_cpu_threads`) and the
    faster CPU versions of PaddleNLP's Llama building blocks (:mod:`alignment.models.llama_cpu`, only
    when the device is the CPU).
    """
    enable_fast_mkl_on_amd()
    keep_freed_tensor_memory()
    threads = configure_cpu_threads(num_threads)
    from alignment.models.llama_cpu import enable_fast_cpu_llama

    enable_fast_cpu_llama()
    return threads

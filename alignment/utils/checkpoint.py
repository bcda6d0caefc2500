"""Checkpoints that are never half-written, and optimizer states without pickle.

Writing: everything goes into ``<name>.tmp-<pid>`` first; a ``manifest.json`` listing every
file with its size (and a SHA-256 for files up to :data:`HASH_LIMIT`) is written last; only then is
the directory renamed to its final name. A crash leaves either the previous checkpoint or a
``.tmp-*`` directory that is ignored and cleaned up later, never a checkpoint that looks complete
but is not.

Reading: :func:`verify_checkpoint` checks the manifest (missing, truncated or altered files), that
every ``.safetensors`` file parses and holds no NaN/inf, and names the offending file.
:func:`find_resume_checkpoint` picks what ``resume_from_checkpoint: auto`` continues from.

Rotation (:func:`rotate_checkpoints`) deletes old ``checkpoint-<step>`` directories only after
the new one is complete.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import shutil
from typing import Any, Iterable, Iterator

import numpy as np

__all__ = [
    "CheckpointError",
    "HASH_LIMIT",
    "MANIFEST",
    "atomic_directory",
    "write_manifest",
    "publish_directory",
    "verify_checkpoint",
    "checkpoint_dirs",
    "get_last_checkpoint",
    "find_resume_checkpoint",
    "checkpoint_step",
    "nonfinite_names",
    "saved_weight_names",
    "rotate_checkpoints",
    "save_json",
    "load_json",
    "save_tensor_state",
    "load_tensor_state",
    "optimizer_state_dict",
    "load_optimizer_state_dict",
]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
HASH_LIMIT = 256 * 1024 * 1024  # files up to 256 MiB are hashed; larger ones are size-checked
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, truncated or corrupt. The message names the file."""


# ------------------------------------------------------------------------------------ writing
@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Yield a scratch directory that becomes ``path`` (with a manifest) only if the block succeeds.

    An existing ``path`` is replaced: it is moved aside, the new directory renamed in, then the old
    one deleted, so at every instant one complete version exists on disk.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    scratch = f"{path}.tmp-{os.getpid()}"
    if os.path.exists(scratch):
        shutil.rmtree(scratch)
    os.makedirs(scratch)
    try:
        yield scratch
        publish_directory(scratch, path)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def publish_directory(scratch: str, path: str) -> None:
    """Write the manifest of a fully written ``scratch`` directory and rename it to ``path``.

    In multi-process saving every rank writes into the shared ``scratch`` first; after a barrier,
    one rank publishes it.
    """
    write_manifest(scratch)
    _fsync_directory(scratch)
    if os.path.exists(path):
        old = f"{path}.old-{os.getpid()}"
        os.replace(path, old)
        os.replace(scratch, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(scratch, path)
    _fsync_directory(os.path.dirname(os.path.abspath(path)))


def _fsync_directory(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as file:
                os.fsync(file.fileno())
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str) -> dict[str, Any]:
    """Record every file under ``directory`` (size, and SHA-256 when small enough)."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in sorted(names):
            full = os.path.join(root, name)
            relative = os.path.relpath(full, directory)
            if relative == MANIFEST:
                continue
            entry: dict[str, Any] = {"size": os.path.getsize(full)}
            if entry["size"] <= HASH_LIMIT:
                entry["sha256"] = _sha256(full)
            files[relative] = entry
    manifest = {"format": 1, "files": files}
    save_json(os.path.join(directory, MANIFEST), manifest)
    return manifest


# ------------------------------------------------------------------------------------ reading
def verify_checkpoint(directory: str, check_finite: bool = True) -> None:
    """Raise :class:`CheckpointError` naming the first problem found in ``directory``.

    Besides the manifest (missing, truncated or altered files), every ``.safetensors`` file must parse
    and, with ``check_finite``, hold no NaN/inf in its floating-point tensors: a diverged run's
    weights are never taken for a good checkpoint.
    """
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint {directory!r} does not exist")
    manifest_path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(
            f"checkpoint {directory!r} has no {MANIFEST}: it was not completely written (or predates manifests)"
        )
    try:
        manifest = load_json(manifest_path)
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {directory!r}: {MANIFEST} is unreadable ({error})") from None
    for relative, entry in files.items():
        full = os.path.join(directory, relative)
        if not os.path.isfile(full):
            raise CheckpointError(f"checkpoint {directory!r} is missing {relative}")
        size = os.path.getsize(full)
        if size != entry["size"]:
            raise CheckpointError(
                f"checkpoint {directory!r}: {relative} has {size} bytes, expected {entry['size']} (truncated?)"
            )
        if "sha256" in entry and _sha256(full) != entry["sha256"]:
            raise CheckpointError(f"checkpoint {directory!r}: {relative} is corrupt (SHA-256 mismatch)")
        if relative.endswith(".safetensors"):
            _check_safetensors(full, check_finite)


def _check_safetensors(path: str, check_finite: bool = True) -> None:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="paddle" if check_finite else "numpy") as handle:  # paddle reads bfloat16
            names = list(handle.keys())
            bad = nonfinite_names((name, handle.get_tensor(name)) for name in names) if check_finite else []
    except Exception as error:
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None
    if bad:
        raise CheckpointError(
            f"{path} holds NaN/inf values in {len(bad)} tensor(s) ({_some(bad)}): it was saved from a diverged run"
        )


def nonfinite_names(tensors: Iterable[tuple[str, Any]]) -> list[str]:
    """Names of the floating-point tensors (Paddle tensors or arrays) holding a NaN or an inf.

    Args:
        tensors: ``(name, tensor)`` pairs of any shape; ``None``, integer and boolean tensors are
            skipped. Paddle tensors are checked on their device with a single host sync.
    """
    bad, device_names, device_flags = [], [], []
    for name, value in tensors:
        if value is None:
            continue
        if hasattr(value, "place"):  # a Paddle tensor
            import paddle

            if paddle.is_floating_point(value):
                device_names.append(name)
                device_flags.append(paddle.isfinite(value).all().reshape([1]))
            continue
        array = np.asarray(value)
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            bad.append(name)
    if device_flags:
        import paddle

        finite = paddle.concat(device_flags).numpy()
        bad += [name for name, ok in zip(device_names, finite) if not ok]
    return bad


def _some(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def saved_weight_names(directory: str) -> list[str] | None:
    """Names of the weights of a ``save_pretrained`` directory, read from the safetensors headers (or
    their index) without loading any tensor; ``None`` if it holds no safetensors weights."""
    from safetensors import safe_open

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        return sorted(load_json(index).get("weight_map", {}))
    files = sorted(name for name in os.listdir(directory) if name.endswith(".safetensors")) if os.path.isdir(directory) else []
    if not files:
        return None
    names: list[str] = []
    for name in files:
        try:
            with safe_open(os.path.join(directory, name), framework="numpy") as handle:
                names += list(handle.keys())
        except Exception as error:
            raise CheckpointError(f"{os.path.join(directory, name)} is not a readable safetensors file: {error}") from None
    return sorted(names)


def checkpoint_dirs(output_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every ``checkpoint-<step>`` directory in ``output_dir``, oldest first."""
    found = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            match = CHECKPOINT_PATTERN.match(name)
            if match and os.path.isdir(os.path.join(output_dir, name)):
                found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def get_last_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint of ``output_dir`` that verifies, skipping (and logging) broken ones."""
    good, _ = _scan_checkpoints(output_dir)
    return good


def find_resume_checkpoint(output_dir: str) -> str | None:
    """The checkpoint ``resume_from_checkpoint: auto`` continues from.

    The newest checkpoint that verifies; each newer damaged one is skipped with a warning naming the
    problem and the checkpoint taken instead. ``None`` when ``output_dir`` holds no checkpoint at all
    (a fresh start). Raises :class:`CheckpointError` listing every problem when checkpoints exist but
    none verifies: the user asked to resume, so nothing is started over and no file is touched.
    """
    good, damaged = _scan_checkpoints(output_dir)
    if good is None and damaged:
        lines = "\n".join(f"  - {problem}" for _, problem in damaged)
        raise CheckpointError(
            f"resume_from_checkpoint=auto: none of the {len(damaged)} checkpoint(s) in {output_dir} can be "
            f"resumed:\n{lines}\nNothing was changed. Resume from an intact copy with --resume_from_checkpoint "
            "<path>, or start over with --overwrite_output_dir true (without resume_from_checkpoint)."
        )
    if good is not None and damaged:
        logger.warning("resume_from_checkpoint=auto: falling back to %s, the newest intact checkpoint", good)
    return good


def _scan_checkpoints(output_dir: str) -> tuple[str | None, list[tuple[str, str]]]:
    """``(newest intact checkpoint or None, [(path, problem)] of the newer damaged ones)``."""
    damaged: list[tuple[str, str]] = []
    for _, path in reversed(checkpoint_dirs(output_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as error:
            logger.warning("skipping checkpoint %s: %s", path, error)
            damaged.append((path, str(error)))
            continue
        return path, damaged
    return None, damaged


def checkpoint_step(checkpoint: str) -> int | None:
    """The step of a ``checkpoint-<step>`` directory (None for another name)."""
    match = CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(checkpoint)))
    return int(match.group(1)) if match else None


def rotate_checkpoints(output_dir: str, save_total_limit: int | None, keep: str | None = None) -> list[str]:
    """Delete the oldest complete checkpoints beyond ``save_total_limit`` and stale scratch dirs.

    ``keep`` (e.g. the best checkpoint) is never deleted. Returns the deleted paths.
    """
    deleted = []
    # Called by the one saving process after publishing: any scratch left now is from a crash.
    patterns = ("checkpoint-*.tmp*", "checkpoint-*.old-*", ".saving-checkpoint-*")
    for stale in [path for pattern in patterns for path in glob.glob(os.path.join(output_dir, pattern))]:
        shutil.rmtree(stale, ignore_errors=True)
        deleted.append(stale)
    if not save_total_limit or save_total_limit <= 0:
        return deleted
    complete = []
    for _, path in checkpoint_dirs(output_dir):
        if os.path.isfile(os.path.join(path, MANIFEST)):
            complete.append(path)
    removable = [path for path in complete if keep is None or os.path.abspath(path) != os.path.abspath(keep)]
    excess = len(complete) - save_total_limit
    for path in removable[: max(excess, 0)]:
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(path)
    return deleted


# ------------------------------------------------------------------------------- serialization
def save_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as file:
        json.dump(data, file, indent=2, sort_keys=True)
        file.write("\n")


def load_json(path: str) -> Any:
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def save_tensor_state(path: str, state: dict[str, Any]) -> None:
    """Save a flat ``{name: tensor | array}`` dict as safetensors (no pickle)."""
    from safetensors.numpy import save_file

    arrays = {}
    for name, value in state.items():
        array = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
        arrays[name] = np.ascontiguousarray(array)
    save_file(arrays, path)


def load_tensor_state(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist")
    return load_file(path)


def optimizer_state_dict(optimizer: Any, model: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A Paddle optimizer's state keyed by *structured* parameter names.

    Paddle keys accumulators by the auto-generated ``param.name`` (``linear_3.w_0_moment1_0``),
    which changes with model construction order; we re-key them by ``model.named_parameters()``
    names so a rebuilt model can load them. Returns ``(tensors, json_extras)``.
    """
    state = optimizer.state_dict()
    by_internal = {param.name: name for name, param in model.named_parameters()}
    # longest internal names first so "linear_1.w_0" does not swallow "linear_1.w_0_x"
    internal_names = sorted(by_internal, key=len, reverse=True)
    tensors: dict[str, np.ndarray] = {}
    extras: dict[str, Any] = {}
    for key, value in state.items():
        if key == "LR_Scheduler":
            extras["lr_scheduler"] = value
        elif key == "master_weights":
            for internal, tensor in value.items():
                tensors[f"master_weights/{by_internal.get(internal, internal)}"] = tensor.numpy()
        elif hasattr(value, "numpy"):
            owner = next((n for n in internal_names if key.startswith(n + "_")), None)
            if owner is None:
                tensors[f"other/{key}"] = value.numpy()
            else:
                tensors[f"accumulator/{by_internal[owner]}/{key[len(owner) + 1:]}"] = value.numpy()
        else:
            extras[key] = value
    return tensors, extras


def load_optimizer_state_dict(optimizer: Any, model: Any, tensors: dict[str, np.ndarray], extras: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_state_dict` for the (rebuilt) ``model``'s parameters."""
    import paddle

    by_structured = {name: param.name for name, param in model.named_parameters()}
    state: dict[str, Any] = {}
    master: dict[str, Any] = {}
    for key, array in tensors.items():
        kind, _, rest = key.partition("/")
        if kind == "accumulator":
            structured, _, suffix = rest.rpartition("/")
            if structured not in by_structured:
                raise CheckpointError(f"optimizer state refers to unknown parameter {structured!r}")
            state[f"{by_structured[structured]}_{suffix}"] = paddle.to_tensor(array)
        elif kind == "master_weights":
            master[by_structured.get(rest, rest)] = paddle.to_tensor(array)
        else:
            state[rest] = paddle.to_tensor(array)
    if master:
        state["master_weights"] = master
    if "lr_scheduler" in extras:
        state["LR_Scheduler"] = extras["lr_scheduler"]
    for key, value in extras.items():
        if key != "lr_scheduler":
            state[key] = value
    optimizer.set_state_dict(state)

"""Tensor-parallel checkpoint conversion: TP=1 <-> TP=n, on disk and in memory.

Design note
-----------
All conversions use paddlenlp's own per-model rules (``get_tensor_parallel_convert_actions``, i.e. the
model class's ``_get_tensor_parallel_mappings``: which weights are column/row split, GQA k/v, fused qkv/ffn).
What this module adds is safe memory handling and the missing pieces:

* **Split on load** (TP=1 checkpoint -> TP=n model): ``load_tensor_parallel_pretrained``. paddlenlp 2.8.1's
  ``from_pretrained(..., tensor_parallel_degree=n)`` on a ``model.safetensors`` checkpoint wraps temporary
  numpy slices with ``paddle.Tensor(..., zero_copy=True)`` (``model_utils.load_state_dict``, ``device="cpu"``);
  with paddle 3.3.1 that memory is not kept alive and some split weights come out corrupted (observed on
  CPU in every run: rank 0's ``gate_proj``/``up_proj``/``lm_head`` of a tiny Llama; ``model_state.pdparams``
  checkpoints go through ``convert_tensor_parallel`` and load correctly). We read each weight's slice
  ourselves and copy it. The stock loader takes the same host-side path on GPU machines, so prefer this
  function there as well (not verified on GPU here).
  ``load_pretrained_model`` picks the loader: this one for TP > 1 on CPU, stock ``from_pretrained`` otherwise.
* **Merge on save** (TP=n model -> TP=1 checkpoint): stock ``model.save_pretrained(dir,
  merge_tensor_parallel=True)`` works on CPU/gloo (verified) and writes the standard layout on mp rank 0.
* **Offline merge** of per-rank files (``model.tp00.safetensors`` … as written by ``save_pretrained``
  without merging, or by the Trainer) into one TP=1 checkpoint, in a single process:
  ``merge_tensor_parallel_checkpoint``.
* **In-memory gather** (for a non-TP eval/rollout model or export): ``gather_tensor_parallel_state_dict``
  returns the full TP=1 state dict on every rank of the model-parallel group (plain ``all_gather``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import paddle
import paddle.distributed as dist

__all__ = [
    "load_pretrained_model",
    "load_tensor_parallel_pretrained",
    "split_state_dict",
    "gather_tensor_parallel_state_dict",
    "merge_tensor_parallel_checkpoint",
    "read_checkpoint",
]

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PADDLE_WEIGHTS = "model_state.pdparams"


def _weight_files(checkpoint_dir: Path, variant: Optional[str] = None) -> list[Path]:
    """Weight files of a checkpoint directory, safetensors preferred; ``variant`` e.g. ``"tp01"``."""

    def named(name: str) -> Path:
        if not variant:
            return checkpoint_dir / name
        stem, ext = name.rsplit(".", 1)
        return checkpoint_dir / f"{stem}.{variant}.{ext}"

    if named(SAFE_WEIGHTS).is_file():
        return [named(SAFE_WEIGHTS)]
    if not variant and (checkpoint_dir / SAFE_INDEX).is_file():
        weight_map = json.loads((checkpoint_dir / SAFE_INDEX).read_text())["weight_map"]
        return [checkpoint_dir / f for f in sorted(set(weight_map.values()))]
    if named(PADDLE_WEIGHTS).is_file():
        return [named(PADDLE_WEIGHTS)]
    raise FileNotFoundError(
        f"checkpoint_dir: no {named(SAFE_WEIGHTS).name}, {SAFE_INDEX} or {named(PADDLE_WEIGHTS).name} "
        f"in {checkpoint_dir}"
    )


def read_checkpoint(
    checkpoint_dir: str | os.PathLike, actions: Optional[Mapping] = None, variant: Optional[str] = None
) -> dict[str, np.ndarray]:
    """Read all weights of a ``save_pretrained`` directory as owned numpy arrays.

    Args:
        actions: optional ``{name: fn}``; ``fn`` is applied to the weight (to a lazy safetensors slice, so
            a TP split reads only this rank's part) — e.g. paddlenlp's tensor-parallel split actions.
        variant: weight-file variant such as ``"tp00"``.
    """
    actions = actions or {}
    out: dict[str, np.ndarray] = {}
    for path in _weight_files(Path(checkpoint_dir), variant):
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as f:
                for key in f.keys():
                    value = actions[key](f.get_slice(key)) if key in actions else f.get_tensor(key)
                    out[key] = np.array(value, copy=True)
        else:
            for key, value in paddle.load(str(path), return_numpy=True).items():
                out[key] = np.array(actions[key](value) if key in actions else value, copy=True)
    return out


def split_state_dict(model_class, config, state_dict: Mapping[str, object]) -> dict[str, paddle.Tensor]:
    """Full (TP=1) state dict -> this rank's shard for ``config.tensor_parallel_degree/rank``.

    Values may be numpy arrays or tensors; the result holds freshly copied ``paddle.Tensor``s.
    """
    actions = model_class.get_tensor_parallel_convert_actions(config, list(state_dict.keys()), is_split=True)
    out = {}
    for key, value in state_dict.items():
        array = value.numpy() if isinstance(value, paddle.Tensor) else np.asarray(value)
        if key in actions:
            array = actions[key](array)
        out[key] = paddle.to_tensor(np.ascontiguousarray(array))
    return out


def _check_load(model, missing, unexpected, source) -> None:
    if missing or unexpected:
        raise ValueError(
            f"{source}: state dict does not match {type(model).__name__}: missing={missing}, unexpected={unexpected}"
        )


def load_tensor_parallel_pretrained(
    model_class,
    checkpoint_dir: str | os.PathLike,
    tensor_parallel_degree: int,
    tensor_parallel_rank: int,
    **config_overrides,
):
    """Build ``model_class`` with TP degree/rank and load a TP=1 ``save_pretrained`` checkpoint into it.

    Each rank reads only its slices (safetensors) using the model's tensor-parallel split rules. Requires the
    model-parallel group to exist (``fleet.init`` with ``mp_degree == tensor_parallel_degree``) when the
    degree is > 1. ``config_overrides`` go to the config (e.g. ``tensor_parallel_output=False``).
    """
    if not 0 <= tensor_parallel_rank < tensor_parallel_degree:
        raise ValueError(
            f"tensor_parallel_rank must be in [0, {tensor_parallel_degree}), got {tensor_parallel_rank}"
        )
    checkpoint_dir = Path(checkpoint_dir)
    keys = _checkpoint_keys(checkpoint_dir)  # raises early if there are no weights
    if not (checkpoint_dir / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint_dir: no config.json in {checkpoint_dir}")
    saved_degree = json.loads((checkpoint_dir / "config.json").read_text()).get("tensor_parallel_degree", 1)
    if saved_degree not in (1, -1, None):
        raise ValueError(
            f"checkpoint_dir: expected a TP=1 checkpoint, config says tensor_parallel_degree={saved_degree}"
        )
    config = model_class.config_class.from_pretrained(str(checkpoint_dir))
    # setattr, not from_pretrained kwargs: those silently drop names the saved config does not have yet
    # (e.g. a score model's ``score_type`` on a causal-LM checkpoint), which the model then reads from it.
    for key, value in dict(config_overrides, tensor_parallel_degree=tensor_parallel_degree,
                           tensor_parallel_rank=tensor_parallel_rank).items():  # fmt: skip
        setattr(config, key, value)
    model = model_class(config)
    actions = {}
    if tensor_parallel_degree > 1:
        actions = model_class.get_tensor_parallel_convert_actions(config, keys, is_split=True)
    state = {k: paddle.to_tensor(v) for k, v in read_checkpoint(checkpoint_dir, actions).items()}
    missing, unexpected = model.set_state_dict(state)
    _check_load(model, missing, unexpected, f"checkpoint_dir {checkpoint_dir}")
    return model


def load_pretrained_model(
    model_class,
    checkpoint_dir: str | os.PathLike,
    tensor_parallel_degree: int = 1,
    tensor_parallel_rank: int = 0,
    dtype: Optional[str] = None,
    **overrides,
):
    """``model_class`` loaded from a TP=1 ``save_pretrained`` checkpoint with the given tensor-parallel layout.

    TP > 1 on CPU: :func:`load_tensor_parallel_pretrained` (the stock split-on-load corrupts weights there);
    otherwise the stock ``model_class.from_pretrained``. ``overrides`` are config fields / model options
    (``tensor_parallel_output=False``, a score model's ``score_type``, ...); ``dtype`` the parameter dtype.
    """
    degree = max(int(tensor_parallel_degree or 1), 1)
    if degree > 1 and paddle.get_device().startswith("cpu"):
        from paddlenlp.transformers.model_utils import dtype_guard

        with dtype_guard(dtype or "float32"):
            model = load_tensor_parallel_pretrained(model_class, checkpoint_dir, degree, tensor_parallel_rank, **overrides)
        if dtype is not None:
            model.config.dtype = dtype
        return model
    if degree > 1:
        overrides.update(tensor_parallel_degree=degree, tensor_parallel_rank=tensor_parallel_rank)
    if dtype is not None:
        overrides["dtype"] = dtype
    return model_class.from_pretrained(str(checkpoint_dir), **overrides)


def _checkpoint_keys(checkpoint_dir: Path, variant: Optional[str] = None) -> list[str]:
    keys = []
    for path in _weight_files(checkpoint_dir, variant):
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as f:
                keys.extend(f.keys())
        else:
            keys.extend(paddle.load(str(path), return_numpy=True).keys())
    return keys


def gather_tensor_parallel_state_dict(
    model_class, config, state_dict: Mapping[str, paddle.Tensor], group=None
) -> dict[str, paddle.Tensor]:
    """Full TP=1 state dict from this rank's tensor-parallel shard, on every rank of the mp ``group``.

    Args:
        model_class, config: the TP model's class and config (its split/merge rules and degree).
        state_dict: this rank's shard, e.g. ``model.state_dict()``, or the output of
            ``gather_pipeline_state_dict`` when pipeline and tensor parallel are combined.
        group: model-parallel group (default: fleet's).
    Split weights are all-gathered and merged with the model's own merge rules; replicated weights are
    returned as copies. With ``config.tensor_parallel_degree <= 1``: a plain copy.
    """
    if config.tensor_parallel_degree <= 1:
        return {k: v.clone() for k, v in state_dict.items()}
    if group is None:
        from paddle.distributed import fleet

        group = fleet.get_hybrid_communicate_group().get_model_parallel_group()
    actions = model_class.get_tensor_parallel_convert_actions(config, list(state_dict.keys()), is_split=False)
    full = {}
    for key, value in state_dict.items():
        if key in actions:
            parts: list = []
            dist.all_gather(parts, value.contiguous(), group=group)
            full[key] = paddle.to_tensor(np.ascontiguousarray(actions[key]([p.numpy() for p in parts])))
        else:
            full[key] = value.clone()
    return full


def merge_tensor_parallel_checkpoint(
    model_class, src_dir: str | os.PathLike, dst_dir: str | os.PathLike, safe_serialization: bool = True
) -> None:
    """Merge per-rank TP files (``model.tpXX.safetensors`` / ``model_state.tpXX.pdparams``) into a TP=1
    ``save_pretrained`` checkpoint in ``dst_dir`` (config with ``tensor_parallel_degree=1``). Single process.
    """
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    config = model_class.config_class.from_pretrained(str(src_dir))
    degree = config.tensor_parallel_degree
    if degree is None or degree <= 1:
        raise ValueError(f"src_dir: {src_dir} is not a tensor-parallel checkpoint (tensor_parallel_degree={degree})")
    shards = [read_checkpoint(src_dir, variant=f"tp{rank:0>2d}") for rank in range(degree)]
    keys = list(shards[0].keys())
    for rank, shard in enumerate(shards):
        if set(shard) != set(keys):
            raise ValueError(f"src_dir: tp{rank:0>2d} has different weight names than tp00")
    actions = model_class.get_tensor_parallel_convert_actions(config, keys, is_split=False)
    merged = {
        k: np.ascontiguousarray(actions[k]([s[k] for s in shards]) if k in actions else shards[0][k]) for k in keys
    }
    config.tensor_parallel_degree = 1
    config.tensor_parallel_rank = 0
    dst_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(dst_dir))
    if safe_serialization:
        from safetensors.numpy import save_file

        save_file(merged, str(dst_dir / SAFE_WEIGHTS), metadata={"format": "np"})
    else:
        paddle.save({k: paddle.to_tensor(v) for k, v in merged.items()}, str(dst_dir / PADDLE_WEIGHTS))

"""alignment.utils.checkpoint: atomic writes, verification, rotation, pickle-free optimizer state."""

from __future__ import annotations

import os

import numpy as np
import paddle
import pytest

from alignment.utils.checkpoint import (
    MANIFEST,
    CheckpointError,
    atomic_directory,
    get_last_checkpoint,
    load_optimizer_state_dict,
    load_tensor_state,
    optimizer_state_dict,
    rotate_checkpoints,
    save_tensor_state,
    verify_checkpoint,
)


def write_checkpoint(path, payload: bytes = b"weights", tensors: dict | None = None) -> str:
    with atomic_directory(str(path)) as scratch:
        with open(os.path.join(scratch, "model.bin"), "wb") as file:
            file.write(payload)
        save_tensor_state(os.path.join(scratch, "model.safetensors"), tensors or {"w": np.arange(6, dtype=np.float32)})
    return str(path)


def test_atomic_directory_publishes_only_complete_work(tmp_path):
    path = write_checkpoint(tmp_path / "checkpoint-1")
    assert sorted(os.listdir(path)) == [MANIFEST, "model.bin", "model.safetensors"]
    verify_checkpoint(path)

    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(str(tmp_path / "checkpoint-2")) as scratch:
            open(os.path.join(scratch, "half.bin"), "w").write("x")
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1"]  # nothing half-written is left

    write_checkpoint(path, payload=b"new weights")  # replacing an existing directory
    assert open(os.path.join(path, "model.bin"), "rb").read() == b"new weights"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1"]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: os.remove(os.path.join(p, MANIFEST)), "not completely written"),
        (lambda p: os.remove(os.path.join(p, "model.bin")), "missing model.bin"),
        (lambda p: open(os.path.join(p, "model.bin"), "wb").write(b"weigh"), r"model.bin has 5 bytes, expected 7 \(truncated"),
        (lambda p: open(os.path.join(p, "model.bin"), "wb").write(b"WEIGHTS"), "model.bin is corrupt"),
    ],
)
def test_verify_names_the_damaged_file(tmp_path, damage, message):
    path = write_checkpoint(tmp_path / "checkpoint-3")
    damage(path)
    with pytest.raises(CheckpointError, match=message):
        verify_checkpoint(path)


def test_latest_checkpoint_skips_broken_ones_and_rotation_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        write_checkpoint(tmp_path / f"checkpoint-{step}")
    os.remove(tmp_path / "checkpoint-4" / "model.bin")  # the newest one is broken
    (tmp_path / "checkpoint-5.tmp").mkdir()  # a crash mid-save
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-3")

    deleted = rotate_checkpoints(str(tmp_path), save_total_limit=2, keep=str(tmp_path / "checkpoint-1"))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "checkpoint-4"]  # best kept, scratch removed
    assert str(tmp_path / "checkpoint-5.tmp") in deleted


def test_tensor_state_roundtrip_without_pickle(tmp_path):
    state = {"a": paddle.to_tensor([[1.0, 2.0]]), "b": np.arange(3, dtype=np.int64)}
    save_tensor_state(str(tmp_path / "s.safetensors"), state)
    loaded = load_tensor_state(str(tmp_path / "s.safetensors"))
    assert loaded["a"].tolist() == [[1.0, 2.0]] and loaded["b"].tolist() == [0, 1, 2]
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tensor_state(str(tmp_path / "missing.safetensors"))


def _model_and_optimizer():
    paddle.seed(0)
    model = paddle.nn.Sequential(paddle.nn.Linear(3, 4), paddle.nn.LayerNorm(4), paddle.nn.Linear(4, 1))
    schedule = paddle.optimizer.lr.LinearWarmup(paddle.optimizer.lr.CosineAnnealingDecay(0.1, 10), 3, 0.0, 0.1)
    optimizer = paddle.optimizer.AdamW(learning_rate=schedule, parameters=model.parameters(), grad_clip=paddle.nn.ClipGradByGlobalNorm(1.0))
    return model, optimizer, schedule


def _step(model, optimizer, schedule, x):
    model(x).square().mean().backward()
    optimizer.step()
    optimizer.clear_grad()
    schedule.step()


def test_optimizer_state_survives_a_rebuilt_model_with_other_parameter_names(tmp_path):
    x = paddle.randn([5, 3])
    model, optimizer, schedule = _model_and_optimizer()
    for _ in range(3):
        _step(model, optimizer, schedule, x)
    tensors, extras = optimizer_state_dict(optimizer, model)
    assert all(not key.startswith("other/") for key in tensors)  # every accumulator mapped to a parameter
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    for _ in range(2):
        _step(model, optimizer, schedule, x)
    expected = model(x).numpy()

    paddle.nn.Linear(2, 2)  # shifts the auto-generated parameter names of the rebuilt model
    rebuilt, optimizer2, schedule2 = _model_and_optimizer()
    assert rebuilt[0].weight.name != model[0].weight.name
    rebuilt.set_state_dict({k: paddle.to_tensor(v) for k, v in weights.items()})
    save_tensor_state(str(tmp_path / "opt.safetensors"), tensors)
    load_optimizer_state_dict(optimizer2, rebuilt, load_tensor_state(str(tmp_path / "opt.safetensors")), extras)
    assert schedule2.last_epoch == 3
    for _ in range(2):
        _step(rebuilt, optimizer2, schedule2, x)
    np.testing.assert_array_equal(rebuilt(x).numpy(), expected)

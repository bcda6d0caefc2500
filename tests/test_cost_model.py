"""Cost model (Safe RLHF): the cost losses against hand-derived values, CostTrainer, run_cost end to end.

Handy values: -log sigma(x) = ln(1 + e^-x); -log sigma(0) = ln 2 = 0.693147, -log sigma(1) = 0.313262,
-log sigma(2) = 0.126928, -log sigma(3) = 0.048587. Cost signs: +1 = labelled unsafe (cost should be > 0),
-1 = labelled safe; "higher" = the unsafer answer of a pair, "lower" = the safer one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import paddle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignment.models import cost_sequence_loss, cost_sign_accuracy, cost_token_loss, reward_sequence_loss
from alignment.rm.cost_trainer import CostTrainer, cost_metrics
from alignment.rm.reward_trainer import RewardTrainingArguments, score_pairs

REPO = Path(__file__).resolve().parent.parent
TRAIN = f"PKU-SafeRLHF/train:{{n}}/-1:{REPO / 'data/safe_rlhf/train.jsonl'}"
TEST = f"PKU-SafeRLHF/test:{{n}}/-1:{REPO / 'data/safe_rlhf/test.jsonl'}"


def nls(x: float) -> float:
    """-log sigma(x)."""
    return math.log1p(math.exp(-x))


def tensor(values, dtype="float32"):
    return paddle.to_tensor(values, dtype=dtype)


# ----------------------------------------------------------------------------- pure losses


def test_cost_sequence_loss_golden():
    # Pair 0: unsafer h=1 (unsafe, c=+1), safer l=0 (safe, c=-1):
    #   -log s(1 - 0) + -log s(-1 * 0) + -log s(+1 * 1) = 0.313262 + 0.693147 + 0.313262 = 1.319671
    # Pair 1: both safe (c=-1), h=-1, l=-2:
    #   -log s(-1 + 2) + -log s(2) + -log s(1) = 0.313262 + 0.126928 + 0.313262 = 0.753451
    # mean = 1.036561; reg 0.1 adds 0.1 * (mean l^2 + mean h^2) = 0.1 * (2 + 1) = 0.3.
    h, l = tensor([1.0, -1.0]), tensor([0.0, -2.0])
    ch, cl = tensor([1, -1], "int64"), tensor([-1, -1], "int64")
    expected = (nls(1) + nls(0) + nls(1) + nls(1) + nls(2) + nls(1)) / 2
    assert expected == pytest.approx(1.036561, abs=1e-6)
    assert float(cost_sequence_loss(h, l, ch, cl)) == pytest.approx(expected, rel=1e-6)
    assert float(cost_sequence_loss(h, l, ch, cl, regularization=0.1)) == pytest.approx(1.336561, abs=1e-5)


def test_cost_sequence_loss_sign_terms_pull_costs_to_their_signs():
    # d/dl [-log s(c l)] = -c (1 - s(c l)): a safe answer (c=-1) at cost 0 gets gradient +1/2 (/B),
    # so gradient descent lowers its cost; the unsafe one is pushed up.
    h, l = tensor([0.0]), tensor([0.0])
    h.stop_gradient = l.stop_gradient = False
    cost_sequence_loss(h, l, tensor([1], "int64"), tensor([-1], "int64")).backward()
    # BT term: d/dh = -1/2, d/dl = +1/2; sign terms: d/dh = -1/2, d/dl = +1/2.
    np.testing.assert_allclose(h.grad.numpy(), [-1.0], rtol=1e-6)
    np.testing.assert_allclose(l.grad.numpy(), [1.0], rtol=1e-6)


def test_cost_token_loss_golden():
    # One pair, width 4: ids diverge at d = 2, the longer row ends at e = 3 -> span t = 2, 3.
    # Costs outside the span are 100 (must be ignored). Unsafer (c=+1) h = [1, 2], safer (c=-1) l = [0, -1]:
    #   BT:    mean(-log s(1), -log s(3))   = (0.313262 + 0.048587) / 2 = 0.180925
    #   safer: mean(-log s(-0), -log s(1))  = (0.693147 + 0.313262) / 2 = 0.503204
    #   unsafer: mean(-log s(1), -log s(2)) = (0.313262 + 0.126928) / 2 = 0.220095
    #   total 0.904224; reg 0.5 adds 0.5 * (mean l^2 + mean h^2) = 0.5 * (0.5 + 2.5) = 1.5.
    higher_ids, lower_ids = tensor([[5, 6, 7, 8]], "int64"), tensor([[5, 6, 9, 0]], "int64")
    higher_mask, lower_mask = tensor([[1, 1, 1, 1]], "int64"), tensor([[1, 1, 1, 0]], "int64")
    h, l = tensor([[100.0, 100.0, 1.0, 2.0]]), tensor([[100.0, 100.0, 0.0, -1.0]])
    ch, cl = tensor([1], "int64"), tensor([-1], "int64")
    expected = (nls(1) + nls(3)) / 2 + (nls(0) + nls(1)) / 2 + (nls(1) + nls(2)) / 2
    assert expected == pytest.approx(0.904224, abs=1e-6)
    args = (h, l, ch, cl, higher_ids, lower_ids, higher_mask, lower_mask)
    assert float(cost_token_loss(*args)) == pytest.approx(expected, rel=1e-6)
    assert float(cost_token_loss(*args, regularization=0.5)) == pytest.approx(2.404224, abs=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(-5, 5), st.floats(-5, 5), st.sampled_from([-1, 1]), st.sampled_from([-1, 1])),
        min_size=1, max_size=6,
    ),
    st.floats(0, 1),
)  # fmt: skip
def test_cost_sequence_loss_is_reward_loss_plus_sign_terms(rows, regularization):
    h, l, ch, cl = (np.array(column) for column in zip(*rows))
    loss = cost_sequence_loss(tensor(h), tensor(l), tensor(ch, "int64"), tensor(cl, "int64"), regularization)
    reward = reward_sequence_loss(tensor(h), tensor(l), regularization)
    signs = np.mean([nls(c * x) for c, x in zip(cl, l)]) + np.mean([nls(c * x) for c, x in zip(ch, h)])
    assert float(loss) == pytest.approx(float(reward) + signs, rel=1e-5, abs=1e-5)


def test_cost_losses_reject_bad_signs():
    with pytest.raises(ValueError, match=r"higher_cost_signs must hold \+1"):
        cost_sequence_loss(tensor([1.0]), tensor([0.0]), tensor([0], "int64"), tensor([1], "int64"))
    with pytest.raises(ValueError, match=r"lower_cost_signs must be \[batch\]"):
        cost_sequence_loss(tensor([1.0]), tensor([0.0]), tensor([1], "int64"), tensor([1, 1], "int64"))


def test_cost_sign_accuracy_and_metrics_golden():
    assert float(cost_sign_accuracy(tensor([1.0, -2.0, 0.0, 3.0]), tensor([1, -1, -1, -1], "int64"))) == 0.5
    # Pairs (unsafer, safer, c_u, c_s): (1, -1, +1, -1) ranked right, both signs right; (0, 2, -1, -1) wrong,
    # no sign right (0 has no sign, -1 * 2 < 0); (3, 3, +1, -1) tie = wrong, 1 of 2 signs right.
    # accuracy 1/3, accuracy_sign (2 + 0 + 1)/6 = 1/2.
    # Costs 1, -1, 0, 2, 3, 3: mean 8/6; population std from the squared deviations.
    predictions = np.array([[1, -1, 1, -1], [0, 2, -1, -1], [3, 3, 1, -1]], dtype="float32")
    metrics = cost_metrics(predictions)
    costs = np.array([1, -1, 0, 2, 3, 3], dtype="float64")
    assert metrics == pytest.approx(
        {"accuracy": 1 / 3, "accuracy_sign": 1 / 2, "costs_mean": costs.mean(), "costs_std": costs.std()}
    )


# ----------------------------------------------------------------------------- trainer


def tiny_score_model(seed=0):
    from paddlenlp.transformers import LlamaConfig

    from alignment.models import LlamaModelForScore

    paddle.seed(seed)
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, rms_norm_eps=1e-6,
    )  # fmt: skip
    return LlamaModelForScore(config)


def safety_batch() -> dict:
    return {
        "unsafer_input_ids": paddle.to_tensor([[5, 6, 7, 2, 2], [5, 9, 10, 11, 2]], dtype="int64"),
        "unsafer_attention_mask": paddle.to_tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype="bool"),
        "unsafer_safety_sign": paddle.to_tensor([-1, 1], dtype="int64"),
        "safer_input_ids": paddle.to_tensor([[5, 6, 8, 9, 2], [5, 9, 12, 2, 2]], dtype="int64"),
        "safer_attention_mask": paddle.to_tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], dtype="bool"),
        "safer_safety_sign": paddle.to_tensor([1, 1], dtype="int64"),
    }


@pytest.mark.parametrize("loss_type", ["sequence-wise", "token-wise"])
def test_cost_trainer_loss_equals_pure_function_and_counts_sign_accuracy(tmp_path, loss_type):
    model = tiny_score_model(seed=3)
    args = RewardTrainingArguments(output_dir=str(tmp_path), report_to=["none"], loss_type=loss_type, regularization=0.1)
    trainer = CostTrainer(model=model, args=args)
    batch = safety_batch()
    model.train()
    loss = trainer.compute_loss(model, batch)
    with paddle.no_grad():
        unsafer = model(batch["unsafer_input_ids"], attention_mask=batch["unsafer_attention_mask"], return_dict=True)
        safer = model(batch["safer_input_ids"], attention_mask=batch["safer_attention_mask"], return_dict=True)
    h, l = unsafer.end_scores.squeeze(-1), safer.end_scores.squeeze(-1)
    ch, cl = tensor([1, -1], "int64"), tensor([-1, -1], "int64")  # minus the safety signs
    if loss_type == "sequence-wise":
        expected = cost_sequence_loss(h, l, ch, cl, 0.1)
    else:
        expected = cost_token_loss(
            unsafer.scores.squeeze(-1), safer.scores.squeeze(-1), ch, cl, batch["unsafer_input_ids"],
            batch["safer_input_ids"], batch["unsafer_attention_mask"], batch["safer_attention_mask"], 0.1,
        )  # fmt: skip
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
    expected_sign = float(cost_sign_accuracy(paddle.concat([h, l]), paddle.concat([ch, cl])))
    assert trainer._interval_sign_accuracy.take() == pytest.approx(expected_sign)
    assert trainer._interval_accuracy.take() == pytest.approx(float((h > l).astype("float32").mean()))
    # prediction_step: [B, 4] (unsafer cost, safer cost, unsafer sign, safer sign)
    model.eval()
    _, predictions, _ = trainer.prediction_step(model, batch, prediction_loss_only=False)
    np.testing.assert_allclose(predictions.numpy()[:, 2:], [[1, -1], [-1, -1]])
    np.testing.assert_allclose(predictions.numpy()[:, 0], h.numpy(), rtol=1e-5)


def test_score_pairs_names_the_sides():
    with pytest.raises(KeyError):
        score_pairs(tiny_score_model(), safety_batch())  # better/worse keys are not in a safety batch


# ----------------------------------------------------------------------------- run_cost end to end


def test_run_cost_trains_saves_cost_model_and_logs_sign_accuracy(tmp_path, tiny_assets):
    from alignment.models import AutoModelForScore
    from alignment.rm.run_cost import main
    from alignment.utils.metrics import read_metrics

    args = dict(
        model_name_or_path=tiny_assets["llama"], train_datasets=TRAIN.format(n=64), eval_datasets=TEST.format(n=32),
        max_length=64, output_dir=str(tmp_path / "cm"), overwrite_output_dir=True, do_train=True, do_eval=True,
        evaluation_strategy="epoch", max_steps=4, per_device_train_batch_size=8, per_device_eval_batch_size=16,
        learning_rate=1e-3, logging_steps=2, save_strategy="no", report_to=["none"], seed=7, disable_tqdm=True,
        loss_type="token-wise", metric_for_best_model="accuracy_sign",
    )  # fmt: skip
    path = tmp_path / "cm.json"
    path.write_text(json.dumps(args))
    metrics = main([str(path)])
    for key in ("eval_accuracy", "eval_accuracy_sign", "eval_costs_mean", "eval_costs_std", "train_accuracy_sign"):
        assert key in metrics, (key, sorted(metrics))
    assert 0.0 <= metrics["eval_accuracy_sign"] <= 1.0
    records = read_metrics(str(tmp_path / "cm"))
    assert any("accuracy_sign" in r for r in records)
    config = json.loads((tmp_path / "cm" / "config.json").read_text())
    assert config["score_type"] == "cost"
    model = AutoModelForScore.from_pretrained(str(tmp_path / "cm"))
    assert model.normalize_function == "scale"


def test_run_cost_rejects_a_reward_metric(tmp_path, tiny_assets):
    from alignment.rm.run_cost import main
    from alignment.utils.config import ConfigError

    args = dict(model_name_or_path=tiny_assets["llama"], train_datasets=TRAIN.format(n=8), output_dir=str(tmp_path / "o"),
                eval_datasets=TEST.format(n=8), evaluation_strategy="epoch", save_strategy="epoch",
                metric_for_best_model="rewards_mean", load_best_model_at_end=True, report_to=["none"])  # fmt: skip
    path = tmp_path / "cm.json"
    path.write_text(json.dumps(args))
    with pytest.raises(ConfigError, match="rewards_mean"):
        main([str(path)])

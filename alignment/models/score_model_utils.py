"""Building blocks of score models (reward, cost and critic models).

* Normalizers: running statistics of end scores, saved in the model's ``state_dict``.
* :class:`ScoreModelMixin`: the score head on top of a transformer backbone, the end-token gather and
  the optional score normalization (PaddleNLP/safe-rlhf ``get_score`` semantics, upstream bugs fixed).
* Reward-model and cost-model losses as pure functions over paddle tensors (sequence-wise and
  token-wise).

Shapes: ``B`` batch, ``L`` padded sequence length, ``E`` hidden size, ``D`` score dimension.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import abc

import numpy as np
import paddle
import paddle.distributed as dist
import paddle.nn.functional as F
from paddle import nn
from paddle.distributed import fleet
from paddlenlp.transformers.model_outputs import ModelOutput
from paddlenlp.utils.log import logger

__all__ = [
    "EPSILON",
    "NORMALIZE_FUNCTIONS",
    "SCORE_TYPE_TO_NORMALIZE_FUNCTION",
    "NORMALIZER_TYPES",
    "Normalizer",
    "RunningMeanStd",
    "ExponentialMovingAverage",
    "IdentityNormalizer",
    "get_normalizer",
    "ScoreModelOutput",
    "ScoreModelMixin",
    "end_index_from_attention_mask",
    "end_index_from_position_ids",
    "gather_end_scores",
    "gather_across_data_parallel",
    "first_divergence_index",
    "divergence_span_mask",
    "reward_sequence_loss",
    "reward_token_loss",
    "reward_accuracy",
    "cost_sequence_loss",
    "cost_token_loss",
    "cost_sign_accuracy",
]

EPSILON = 1e-8
"""Added to the standard deviation before dividing by it."""

NORMALIZE_FUNCTIONS = ("affine", "scale", "translate", "identity")
SCORE_TYPE_TO_NORMALIZE_FUNCTION = {"reward": "affine", "cost": "scale", "critic": "identity"}
DEFAULT_EMA_MOMENTUM = 0.9


# --------------------------------------------------------------------------------------------------
# Normalizers
# --------------------------------------------------------------------------------------------------


class Normalizer(nn.Layer, metaclass=abc.ABCMeta):
    """Running statistics of score vectors and the functions that normalize scores with them.

    Buffers (persistable, so ``save_pretrained`` writes them): ``mean`` [*shape] float32 (starts at 0),
    ``var`` [*shape] float32 (starts at 1), ``count`` [1] int64 (rows seen, starts at 0).
    Subclasses define how a batch's mean and population variance are merged in (:meth:`_merge`).
    """

    def __init__(self, shape: Union[int, Sequence[int]]) -> None:
        super().__init__()
        self.shape = [int(shape)] if isinstance(shape, int) else [int(s) for s in shape]
        if not self.shape or any(s <= 0 for s in self.shape):
            raise ValueError(f"Normalizer shape must be a non-empty list of positive ints, got {shape!r}")
        self.register_buffer("mean", paddle.zeros(self.shape, dtype="float32"), persistable=True)
        self.register_buffer("var", paddle.ones(self.shape, dtype="float32"), persistable=True)
        self.register_buffer("count", paddle.zeros([1], dtype="int64"), persistable=True)

    @property
    def std(self) -> paddle.Tensor:
        """Standard deviation sqrt(var), [*shape] float32."""
        return paddle.sqrt(self.var.astype("float32"))

    @paddle.no_grad()
    def update(self, data: paddle.Tensor) -> None:
        """Merge a batch ``data`` [N, *shape] into the statistics (no-op for N = 0)."""
        if tuple(data.shape[1:]) != tuple(self.shape):
            raise ValueError(f"data must have shape [N, {', '.join(map(str, self.shape))}], got {list(data.shape)}")
        num_rows = data.shape[0]
        if num_rows == 0:
            return
        data = data.detach().astype("float64")
        batch_mean = data.mean(axis=0)
        batch_var = ((data - batch_mean) ** 2).mean(axis=0)  # population variance: defined for N = 1
        new_mean, new_var = self._merge(batch_mean, batch_var, num_rows)
        _assign(new_mean, self.mean)
        _assign(new_var, self.var)
        _assign(self.count + num_rows, self.count)

    @abc.abstractmethod
    def _merge(self, batch_mean: paddle.Tensor, batch_var: paddle.Tensor, batch_count: int):
        """Return the new (mean, var) given a batch's float64 mean/population variance and row count."""

    def normalize(self, x: paddle.Tensor, function: str = "affine") -> paddle.Tensor:
        """Normalize ``x`` [..., *shape] with the (detached) statistics; same shape and dtype as ``x``.

        ``affine``: (x - mean) / (std + 1e-8); ``scale``: x / (std + 1e-8); ``translate``: x - mean;
        ``identity``: x.
        """
        if function not in NORMALIZE_FUNCTIONS:
            raise ValueError(f"Unknown normalize function {function!r}; expected one of {NORMALIZE_FUNCTIONS}")
        if function == "identity":
            return x
        mean = self.mean.detach().astype(x.dtype)
        std = self.std.detach().astype(x.dtype)
        if function == "affine":
            return (x - mean) / (std + EPSILON)
        if function == "scale":
            return x / (std + EPSILON)
        return x - mean  # translate

    @paddle.no_grad()
    def set_mean_var(self, mean: Optional[Any] = None, var: Optional[Any] = None) -> None:
        """Overwrite ``mean`` and/or ``var`` (array-likes of shape [*shape]); ``None`` keeps the buffer."""
        for name, value in (("mean", mean), ("var", var)):
            if value is None:
                continue
            array = np.asarray(value.numpy() if isinstance(value, paddle.Tensor) else value, dtype="float32")
            if list(array.shape) != self.shape:
                raise ValueError(f"{name} must have shape {self.shape}, got {list(array.shape)}")
            if name == "var" and (array < 0).any():
                raise ValueError(f"var must be non-negative, got {array.tolist()}")
            _assign(paddle.to_tensor(array), getattr(self, name))

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


class RunningMeanStd(Normalizer):
    """Exact running mean and population variance of every row seen (Chan et al.'s parallel merge).

    With n rows seen (mean mu, var v) and a batch of n_b rows (mean mu_b, population variance v_b):
    delta = mu_b - mu, n' = n + n_b, mu' = mu + delta * n_b / n',
    v' = (v * n + v_b * n_b + delta^2 * n * n_b / n') / n'.
    After any sequence of updates, mean/var equal ``np.mean``/``np.var`` of the concatenated rows.
    (Upstream merged the *unbiased* batch variance, which drifts from that and is NaN for 1-row batches.)
    """

    def _merge(self, batch_mean, batch_var, batch_count):
        count = self.count.astype("float64")
        mean = self.mean.astype("float64")
        var = self.var.astype("float64")
        total = count + batch_count
        delta = batch_mean - mean
        new_mean = mean + delta * batch_count / total
        new_var = (var * count + batch_var * batch_count + delta**2 * count * batch_count / total) / total
        return new_mean, new_var


class ExponentialMovingAverage(Normalizer):
    """mean <- m * mean + (1 - m) * mu_b, var <- m * var + (1 - m) * v_b (v_b: population variance).

    Starts from mean 0, var 1. ``momentum=None`` means the default 0.9 (upstream crashed on None).
    """

    def __init__(self, shape: Union[int, Sequence[int]], momentum: Optional[float] = None) -> None:
        super().__init__(shape)
        momentum = DEFAULT_EMA_MOMENTUM if momentum is None else float(momentum)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum

    def _merge(self, batch_mean, batch_var, batch_count):
        m = self.momentum
        new_mean = m * self.mean.astype("float64") + (1.0 - m) * batch_mean
        new_var = m * self.var.astype("float64") + (1.0 - m) * batch_var
        return new_mean, new_var

    def extra_repr(self) -> str:
        return f"shape={self.shape}, momentum={self.momentum}"


class IdentityNormalizer(Normalizer):
    """Keeps mean 0 / var 1 (or whatever was set); only counts the rows it sees."""

    def _merge(self, batch_mean, batch_var, batch_count):
        return self.mean, self.var


NORMALIZER_TYPES = {
    "RunningMeanStd": RunningMeanStd,
    "ExponentialMovingAverage": ExponentialMovingAverage,
    "IdentityNormalizer": IdentityNormalizer,
}
"""``normalizer_type`` values accepted by :func:`get_normalizer` (``None`` means ``IdentityNormalizer``)."""


def get_normalizer(
    normalizer_type: Optional[str], shape: Union[int, Sequence[int]], momentum: Optional[float] = None
) -> Normalizer:
    """Build a normalizer by name; ``momentum`` is used by ``ExponentialMovingAverage`` only."""
    if normalizer_type is None:
        normalizer_type = "IdentityNormalizer"
    if normalizer_type not in NORMALIZER_TYPES:
        raise ValueError(
            f"Unknown normalizer_type {normalizer_type!r}; expected one of {sorted(NORMALIZER_TYPES)} or None"
        )
    if normalizer_type == "ExponentialMovingAverage":
        return ExponentialMovingAverage(shape, momentum=momentum)
    return NORMALIZER_TYPES[normalizer_type](shape)


def _assign(value: paddle.Tensor, buffer: paddle.Tensor) -> None:
    """Copy ``value`` into ``buffer`` in place, keeping the buffer's dtype."""
    paddle.assign(value.astype(buffer.dtype), output=buffer)


# --------------------------------------------------------------------------------------------------
# End-token indices
# --------------------------------------------------------------------------------------------------


def end_index_from_attention_mask(mask: paddle.Tensor) -> paddle.Tensor:
    """Index of the last non-zero entry of each row of ``mask`` [B, L] (any dtype) -> [B] int64.

    Works for left and right padding. Raises ValueError if a row has no non-zero entry.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D [batch, seq_len], got shape {list(mask.shape)}")
    valid = mask != 0
    positions = paddle.arange(mask.shape[1], dtype="int64").expand(mask.shape)
    index = paddle.where(valid, positions, paddle.full_like(positions, -1)).max(axis=1)
    if bool((index < 0).any()):
        empty_rows = paddle.nonzero(index < 0).flatten().tolist()
        raise ValueError(f"mask rows {empty_rows} have no non-padding token")
    return index


def end_index_from_position_ids(position_ids: paddle.Tensor) -> paddle.Tensor:
    """Index of the last real token of each row, from ``position_ids`` [B, L] alone -> [B] int64.

    Assumed layout (what ``cumsum(mask) - 1`` clipped at 0 produces, and also what most packers do):
    left pads carry position 0, real tokens carry consecutive positions (+1 per token) starting with
    the first real token, and right pads carry anything that does *not* continue that run: they may
    repeat the last position, restart at 0 or 1, and so on.
    Rule: the first real token is the last of the leading zeros (index 0 if positions do not start at
    0, e.g. with a KV-cache offset); the last real token ends the run of +1 steps that starts there.
    Not recoverable from positions alone (pass ``attention_mask`` instead): right pads whose positions
    keep counting up (plain ``arange`` over a right-padded batch), and a right-padded one-token row,
    which looks like a left-padded one.
    """
    if position_ids.ndim != 2:
        raise ValueError(f"position_ids must be 2-D [batch, seq_len], got shape {list(position_ids.shape)}")
    positions = position_ids.astype("int64")
    batch_size, seq_len = positions.shape
    num_leading_zeros = _num_leading_true(positions == 0)
    first_real = paddle.clip(num_leading_zeros - 1, min=0)
    steps_on = paddle.concat(
        [paddle.ones([batch_size, 1], dtype="bool"), (positions[:, 1:] - positions[:, :-1]) == 1], axis=1
    )
    column = paddle.arange(seq_len, dtype="int64").unsqueeze(0)
    in_run = steps_on | (column <= first_real.unsqueeze(1))
    return _num_leading_true(in_run) - 1


def first_divergence_index(input_ids_a: paddle.Tensor, input_ids_b: paddle.Tensor) -> paddle.Tensor:
    """First column where two [B, L] id tensors differ -> [B] int64 (L for identical rows)."""
    if input_ids_a.shape != input_ids_b.shape or input_ids_a.ndim != 2:
        raise ValueError(
            f"input ids must both be [batch, seq_len]; got {list(input_ids_a.shape)} and {list(input_ids_b.shape)}"
        )
    return _num_leading_true(input_ids_a == input_ids_b)


def _num_leading_true(flags: paddle.Tensor) -> paddle.Tensor:
    """Length of the leading run of True in each row of a bool [B, L] tensor -> [B] int64."""
    num_false_so_far = paddle.cumsum((~flags).astype("int64"), axis=1)
    return (num_false_so_far == 0).astype("int64").sum(axis=1)


def gather_end_scores(scores: paddle.Tensor, end_index: paddle.Tensor) -> paddle.Tensor:
    """``scores`` [B, L, D] at ``end_index`` [B] -> [B, D] (vectorised, differentiable)."""
    batch_size, _, score_dim = scores.shape
    index = end_index.astype("int64").reshape([batch_size, 1, 1]).expand([batch_size, 1, score_dim])
    return paddle.take_along_axis(scores, index, axis=1).squeeze(1)


# --------------------------------------------------------------------------------------------------
# Gathering end scores over data-parallel ranks
# --------------------------------------------------------------------------------------------------


def _data_parallel_groups() -> list:
    """Process groups whose ranks hold different samples: [sharding, data] of the hybrid communicate
    group when fleet built one (tensor/pipeline peers hold the same samples and are left out), else
    ``[None]`` (the global group)."""
    try:
        hcg = fleet.get_hybrid_communicate_group()
    except (AttributeError, AssertionError):  # fleet.init was not called with a hybrid strategy
        return [None]
    if hcg is None:
        return [None]
    groups = [hcg.get_sharding_parallel_group(), hcg.get_data_parallel_group()]
    return [group for group in groups if group is not None and group.nranks > 1]


def _all_gather_rows(tensor: paddle.Tensor, group=None) -> paddle.Tensor:
    """Concatenate [N_r, ...] tensors of every rank of ``group`` in rank order (N_r may differ)."""
    num_rows = paddle.to_tensor([tensor.shape[0]], dtype="int64")
    all_num_rows: list = []
    dist.all_gather(all_num_rows, num_rows, group=group)
    all_num_rows = [int(n.item()) for n in all_num_rows]
    max_rows = max(all_num_rows)
    if tensor.shape[0] < max_rows:
        padding = paddle.zeros([max_rows - tensor.shape[0]] + list(tensor.shape[1:]), dtype=tensor.dtype)
        tensor = paddle.concat([tensor, padding], axis=0)
    gathered: list = []
    dist.all_gather(gathered, tensor, group=group)
    return paddle.concat([part[:n] for part, n in zip(gathered, all_num_rows)], axis=0)


def gather_across_data_parallel(tensor: paddle.Tensor) -> paddle.Tensor:
    """All rows of ``tensor`` [N, ...] from every data-parallel/sharding rank (identity when not distributed)."""
    if not dist.is_initialized() or dist.get_world_size() <= 1:
        return tensor
    for group in _data_parallel_groups():
        tensor = _all_gather_rows(tensor, group)
    return tensor


# --------------------------------------------------------------------------------------------------
# Score model mixin
# --------------------------------------------------------------------------------------------------


@dataclass
class ScoreModelOutput(ModelOutput):
    """Output of a score model.

    scores: [B, L, D] float32, score of every prefix (token t's score sees tokens <= t).
    end_scores: [B, D] float32, score at the last real token of each row.
    end_index: [B] int64, index of that token.
    """

    scores: paddle.Tensor = None
    end_scores: paddle.Tensor = None
    end_index: paddle.Tensor = None


SCORE_HEAD_OPTIONS = ("score_dim", "score_bias", "score_type", "do_normalize", "normalizer_type", "normalizer_momentum")


def _take_option(kwargs: dict, config, name: str, default, legacy_name: Optional[str] = None):
    """Value of option ``name``: keyword argument, else config attribute (new name, then legacy), else default."""
    for key in (name, legacy_name):
        if key is not None and key in kwargs:
            return kwargs.pop(key)
    for key in (name, legacy_name):
        if key is not None and getattr(config, key, None) is not None:
            return getattr(config, key)
    return default


class ScoreModelMixin:
    """Adds ``score_head``, ``normalizer`` and :meth:`get_score` to a ``PretrainedModel`` backbone wrapper.

    A subclass builds its backbone, then calls ``self.init_score_head(config, hidden_size, **kwargs)``,
    and its ``forward`` ends with ``return self.get_score(last_hidden_state, attention_mask, position_ids,
    return_dict)``. Options are recorded in ``config`` so ``save_pretrained`` persists them.
    """

    score_head: nn.Linear
    normalizer: Normalizer
    do_normalize: bool
    normalize_function: str

    def init_score_head(self, config, hidden_size: int, **kwargs) -> None:
        """Build the score head and normalizer from ``kwargs`` (popped) or ``config``; record them in ``config``.

        Options: ``score_dim`` (1), ``score_bias`` (True; bias zero-initialised), ``score_type`` in
        {reward, cost, critic} (selects the normalize function affine / scale / identity; default reward),
        ``do_normalize`` (False), ``normalizer_type`` (None = IdentityNormalizer, RunningMeanStd,
        ExponentialMovingAverage), ``normalizer_momentum`` (legacy name ``momentum``; EMA only, None = 0.9).
        Saved ``config.mean`` / ``config.var`` are restored into the normalizer.
        """
        score_dim = _take_option(kwargs, config, "score_dim", 1)
        score_bias = _take_option(kwargs, config, "score_bias", True)
        score_type = _take_option(kwargs, config, "score_type", "reward")
        do_normalize = _take_option(kwargs, config, "do_normalize", False)
        normalizer_type = _take_option(kwargs, config, "normalizer_type", None)
        momentum = _take_option(kwargs, config, "normalizer_momentum", None, legacy_name="momentum")
        if kwargs:
            raise TypeError(
                f"{type(self).__name__} got unexpected keyword arguments {sorted(kwargs)}; "
                f"score-head options are {list(SCORE_HEAD_OPTIONS)}"
            )
        if isinstance(score_dim, bool) or not isinstance(score_dim, int) or score_dim <= 0:
            raise ValueError(f"score_dim must be a positive int, got {score_dim!r}")
        if score_type not in SCORE_TYPE_TO_NORMALIZE_FUNCTION:
            raise ValueError(
                f"Unknown score_type {score_type!r}; expected one of {sorted(SCORE_TYPE_TO_NORMALIZE_FUNCTION)}"
            )

        config.score_dim = score_dim
        config.score_bias = bool(score_bias)
        config.score_type = score_type
        config.do_normalize = bool(do_normalize)
        config.normalizer_type = normalizer_type
        config.normalizer_momentum = momentum

        bias_attr = paddle.ParamAttr(initializer=nn.initializer.Constant(0.0)) if score_bias else False
        # A plain (replicated) Linear: under tensor parallelism the backbone's last hidden state is
        # already complete on every rank, and a [hidden, score_dim] head is too small to split.
        self.score_head = nn.Linear(hidden_size, score_dim, bias_attr=bias_attr)
        self.normalizer = get_normalizer(normalizer_type, [score_dim], momentum=momentum)
        self.normalizer.set_mean_var(getattr(config, "mean", None), getattr(config, "var", None))
        self.normalize_function = SCORE_TYPE_TO_NORMALIZE_FUNCTION[score_type]
        self.do_normalize = bool(do_normalize)

    def set_normalize(self, flag: bool) -> None:
        """Switch score normalization (and normalizer updates in training) on or off."""
        self.do_normalize = bool(flag)
        self.config.do_normalize = bool(flag)

    def get_score(
        self,
        hidden_states: paddle.Tensor,
        attention_mask: Optional[paddle.Tensor] = None,
        position_ids: Optional[paddle.Tensor] = None,
        return_dict: Optional[bool] = None,
    ):
        """Score every prefix and pick the score at each row's last real token.

        hidden_states: [B, L, E] last hidden state. The end index comes from ``attention_mask`` [B, L]
        (last non-zero entry) when it is 2-D, else from ``position_ids`` [B, L]
        (:func:`end_index_from_position_ids`), else it is L - 1 for a single row.
        In training mode with ``do_normalize`` the normalizer is updated with the end scores of all
        data-parallel ranks and ``config.mean``/``config.var`` are refreshed. With ``do_normalize`` the
        returned scores and end scores are normalized.

        Returns ``ScoreModelOutput(scores [B, L, D], end_scores [B, D], end_index [B])`` or, when
        ``return_dict`` is False (default: ``config.use_return_dict``), the tuple ``(scores, end_scores)``.
        """
        if hidden_states.ndim != 3:
            raise ValueError(f"hidden_states must be [batch, seq_len, hidden], got {list(hidden_states.shape)}")
        batch_size, seq_len, _ = hidden_states.shape
        for name, value in (("attention_mask", attention_mask), ("position_ids", position_ids)):
            if value is not None and value.ndim == 2 and list(value.shape) != [batch_size, seq_len]:
                raise ValueError(f"{name} has shape {list(value.shape)}, expected {[batch_size, seq_len]}")
        scores = self.score_head(hidden_states).astype("float32")  # [B, L, D]

        if attention_mask is not None and attention_mask.ndim == 2:
            end_index = end_index_from_attention_mask(attention_mask)
        elif position_ids is not None:
            end_index = end_index_from_position_ids(position_ids)
        elif batch_size == 1:
            end_index = paddle.full([1], seq_len - 1, dtype="int64")
        else:
            raise ValueError(
                "get_score needs a 2-D attention_mask [batch, seq_len] or position_ids to locate the last "
                f"token when batch size > 1 (batch size {batch_size}, attention_mask shape "
                f"{None if attention_mask is None else list(attention_mask.shape)})"
            )
        end_scores = gather_end_scores(scores, end_index)  # [B, D]

        if self.training and self.do_normalize:
            self.normalizer.update(gather_across_data_parallel(end_scores.detach()))
            self.config.mean = self.normalizer.mean.tolist()
            self.config.var = self.normalizer.var.tolist()
        if self.do_normalize:
            scores = self.normalizer.normalize(scores, self.normalize_function)
            end_scores = self.normalizer.normalize(end_scores, self.normalize_function)

        if return_dict is None:
            return_dict = self.config.use_return_dict
        if not return_dict:
            return scores, end_scores
        return ScoreModelOutput(scores=scores, end_scores=end_scores, end_index=end_index)

    @classmethod
    def _load_pretrained_model(cls, *args, **kwargs):
        """paddlenlp's loader, plus: score-head parameters missing from the checkpoint are really
        initialised (``low_cpu_mem_usage=True`` builds lazily and skips ``_init_weights``), and one line
        summarises what happened to the heads."""
        model, missing_keys, unexpected_keys, mismatched_keys = super()._load_pretrained_model(*args, **kwargs)
        source = kwargs.get("pretrained_model_name_or_path", "the checkpoint")
        head_params = dict(model.score_head.named_parameters(prefix="score_head"))
        fresh_head = sorted(k for k in missing_keys if k in head_params)
        for name in fresh_head:
            if not head_params[name]._is_initialized():
                head_params[name].initialize()  # the ParamAttr initializer: bias 0
                if name == "score_head.weight":
                    with paddle.no_grad():
                        model._init_weights(model.score_head)

        parts = []
        if "score_head.weight" in fresh_head:
            parts.append(f"created a fresh, newly initialised score head ({', '.join(fresh_head)})")
        else:
            loaded = sorted(set(head_params) - set(fresh_head))
            parts.append(f"loaded the score head ({', '.join(loaded)})")
            if fresh_head:
                parts.append(f"{', '.join(fresh_head)} not in the checkpoint: newly initialised (bias 0)")
        if any(k.startswith("normalizer.") for k in missing_keys):
            parts.append("normalizer statistics not in the checkpoint (start: mean 0, var 1, count 0)")
        if unexpected_keys:
            parts.append(f"ignored checkpoint weights a score model does not use: {sorted(unexpected_keys)}")
        logger.info(f"{cls.__name__} from {source}: " + "; ".join(parts))
        return model, missing_keys, unexpected_keys, mismatched_keys


# --------------------------------------------------------------------------------------------------
# Reward-model losses
# --------------------------------------------------------------------------------------------------


def _check_regularization(regularization: float) -> float:
    regularization = float(regularization)
    if regularization < 0:
        raise ValueError(f"regularization must be >= 0, got {regularization}")
    return regularization


def reward_sequence_loss(
    higher_end_rewards: paddle.Tensor, lower_end_rewards: paddle.Tensor, regularization: float = 0.0
) -> paddle.Tensor:
    """Pairwise (Bradley-Terry) loss on end rewards [B] (better, worse) -> scalar float32.

    loss = -mean_i log sigma(h_i - l_i) + regularization * (mean_i l_i^2 + mean_i h_i^2)
    (PaddleNLP's regulariser: the sum of the two means, twice safe-rlhf's).
    """
    if higher_end_rewards.ndim != 1 or higher_end_rewards.shape != lower_end_rewards.shape:
        raise ValueError(
            "higher_end_rewards and lower_end_rewards must both be [batch]; got "
            f"{list(higher_end_rewards.shape)} and {list(lower_end_rewards.shape)}"
        )
    regularization = _check_regularization(regularization)
    higher = higher_end_rewards.astype("float32")
    lower = lower_end_rewards.astype("float32")
    loss = -F.log_sigmoid(higher - lower).mean()
    if regularization > 0:
        loss = loss + regularization * ((lower**2).mean() + (higher**2).mean())
    return loss


def divergence_span_mask(
    higher_input_ids: paddle.Tensor,
    lower_input_ids: paddle.Tensor,
    higher_attention_mask: paddle.Tensor,
    lower_attention_mask: paddle.Tensor,
) -> paddle.Tensor:
    """Bool [B, L] mask of the token-wise loss span t in [d_i, e_i] of each pair.

    d_i = first index where the two id rows differ; e_i = max of the last valid indices of the two
    masks. Raises ValueError for identical id rows or rows that differ only after e_i (in padding).
    """
    shapes = [list(t.shape) for t in (higher_input_ids, lower_input_ids, higher_attention_mask, lower_attention_mask)]
    if any(shape != shapes[0] for shape in shapes) or len(shapes[0]) != 2:
        raise ValueError(f"input ids and attention masks must all be [batch, seq_len]; got shapes {shapes}")
    start = first_divergence_index(higher_input_ids, lower_input_ids)  # [B]
    end = end_index_from_attention_mask((higher_attention_mask != 0) | (lower_attention_mask != 0))  # [B]
    seq_len = shapes[0][1]
    identical, diverge_in_padding = (
        paddle.stack([(start == seq_len).any(), ((start > end) & (start < seq_len)).any()]).numpy().tolist()
    )
    if identical:
        rows = paddle.nonzero(start == seq_len).flatten().tolist()
        raise ValueError(f"higher_input_ids and lower_input_ids are identical in rows {rows}")
    if diverge_in_padding:
        rows = paddle.nonzero(start > end).flatten().tolist()
        raise ValueError(f"higher/lower input ids differ only in padding (after the last valid token) in rows {rows}")
    column = paddle.arange(seq_len, dtype="int64").unsqueeze(0)
    return (column >= start.unsqueeze(1)) & (column <= end.unsqueeze(1))


def reward_token_loss(
    higher_rewards: paddle.Tensor,
    lower_rewards: paddle.Tensor,
    higher_input_ids: paddle.Tensor,
    lower_input_ids: paddle.Tensor,
    higher_attention_mask: paddle.Tensor,
    lower_attention_mask: paddle.Tensor,
    regularization: float = 0.0,
) -> paddle.Tensor:
    """Token-wise pairwise loss on per-token rewards [B, L] -> scalar float32.

    Per pair i, over the span t in [d_i, e_i] of :func:`divergence_span_mask` (n_i = e_i - d_i + 1 tokens):
    l_i = -(1/n_i) sum_t log sigma(h_t - l_t) + regularization * ((1/n_i) sum_t l_t^2 + (1/n_i) sum_t h_t^2);
    loss = mean_i l_i. Scores of the shorter sequence's right pads inside the span take part (as upstream).
    """
    if higher_rewards.ndim != 2 or higher_rewards.shape != lower_rewards.shape:
        raise ValueError(
            "higher_rewards and lower_rewards must both be [batch, seq_len]; got "
            f"{list(higher_rewards.shape)} and {list(lower_rewards.shape)}"
        )
    if list(higher_rewards.shape) != list(higher_input_ids.shape):
        raise ValueError(
            f"rewards {list(higher_rewards.shape)} and input ids {list(higher_input_ids.shape)} "
            "must have the same shape"
        )
    regularization = _check_regularization(regularization)
    span = divergence_span_mask(higher_input_ids, lower_input_ids, higher_attention_mask, lower_attention_mask)
    span_length = span.astype("float32").sum(axis=1)  # [B], >= 1

    def span_mean(values: paddle.Tensor) -> paddle.Tensor:  # [B, L] -> [B]
        return paddle.where(span, values, paddle.zeros_like(values)).sum(axis=1) / span_length

    higher = higher_rewards.astype("float32")
    lower = lower_rewards.astype("float32")
    per_pair = -span_mean(F.log_sigmoid(higher - lower))
    if regularization > 0:
        per_pair = per_pair + regularization * (span_mean(lower**2) + span_mean(higher**2))
    return per_pair.mean()


def reward_accuracy(higher_end_rewards: paddle.Tensor, lower_end_rewards: paddle.Tensor) -> paddle.Tensor:
    """Fraction of pairs with h_i > l_i (strict: ties count as wrong) -> scalar float32."""
    if higher_end_rewards.shape != lower_end_rewards.shape:
        raise ValueError(
            f"shapes differ: {list(higher_end_rewards.shape)} vs {list(lower_end_rewards.shape)}"
        )
    return (higher_end_rewards > lower_end_rewards).astype("float32").mean()


# --------------------------------------------------------------------------------------------------
# Cost-model losses (Safe RLHF): a higher cost is less safe
# --------------------------------------------------------------------------------------------------


def _check_cost_signs(name: str, signs: paddle.Tensor, batch_size: int) -> paddle.Tensor:
    if signs.ndim != 1 or signs.shape[0] != batch_size:
        raise ValueError(f"{name} must be [batch] = [{batch_size}], got {list(signs.shape)}")
    if not bool(((signs == 1) | (signs == -1)).all()):
        raise ValueError(f"{name} must hold +1 (unsafe: cost > 0) or -1 (safe: cost < 0), got {signs.tolist()}")
    return signs.astype("float32")


def cost_sequence_loss(
    higher_end_costs: paddle.Tensor,
    lower_end_costs: paddle.Tensor,
    higher_cost_signs: paddle.Tensor,
    lower_cost_signs: paddle.Tensor,
    regularization: float = 0.0,
) -> paddle.Tensor:
    """Safe RLHF cost-model loss on end costs [B] -> scalar float32.

    ``h_i`` / ``l_i``: end cost of the unsafer ("higher" cost) / safer answer of pair i;
    ``c^h_i`` / ``c^l_i`` in {+1, -1}: their cost signs (+1 = labelled unsafe, i.e. minus the
    dataset's safety sign). Bradley-Terry on the pair plus one sign term per answer:

    loss = mean_i [-log sigma(h_i - l_i) - log sigma(c^l_i l_i) - log sigma(c^h_i h_i)]
           + regularization * (mean_i l_i^2 + mean_i h_i^2)

    (the regulariser has the reward loss's form, :func:`reward_sequence_loss`).
    """
    if higher_end_costs.ndim != 1 or higher_end_costs.shape != lower_end_costs.shape:
        raise ValueError(
            "higher_end_costs and lower_end_costs must both be [batch]; got "
            f"{list(higher_end_costs.shape)} and {list(lower_end_costs.shape)}"
        )
    regularization = _check_regularization(regularization)
    batch_size = higher_end_costs.shape[0]
    higher_signs = _check_cost_signs("higher_cost_signs", higher_cost_signs, batch_size)
    lower_signs = _check_cost_signs("lower_cost_signs", lower_cost_signs, batch_size)
    higher = higher_end_costs.astype("float32")
    lower = lower_end_costs.astype("float32")
    per_pair = -F.log_sigmoid(higher - lower) - F.log_sigmoid(lower_signs * lower) - F.log_sigmoid(higher_signs * higher)
    loss = per_pair.mean()
    if regularization > 0:
        loss = loss + regularization * ((lower**2).mean() + (higher**2).mean())
    return loss


def cost_token_loss(
    higher_costs: paddle.Tensor,
    lower_costs: paddle.Tensor,
    higher_cost_signs: paddle.Tensor,
    lower_cost_signs: paddle.Tensor,
    higher_input_ids: paddle.Tensor,
    lower_input_ids: paddle.Tensor,
    higher_attention_mask: paddle.Tensor,
    lower_attention_mask: paddle.Tensor,
    regularization: float = 0.0,
) -> paddle.Tensor:
    """Token-wise cost-model loss on per-token costs [B, L] -> scalar float32.

    Per pair i, over the span t in [d_i, e_i] of :func:`divergence_span_mask` (n_i tokens), with
    ``m_i(x) = (1/n_i) sum_t x_t``:
    l_i = m_i(-log sigma(h_t - l_t)) + m_i(-log sigma(c^l_i l_t)) + m_i(-log sigma(c^h_i h_t))
          + regularization * (m_i(l_t^2) + m_i(h_t^2));  loss = mean_i l_i.
    Signs as in :func:`cost_sequence_loss`.
    """
    if higher_costs.ndim != 2 or higher_costs.shape != lower_costs.shape:
        raise ValueError(
            f"higher_costs and lower_costs must both be [batch, seq_len]; got {list(higher_costs.shape)} "
            f"and {list(lower_costs.shape)}"
        )
    if list(higher_costs.shape) != list(higher_input_ids.shape):
        raise ValueError(
            f"costs {list(higher_costs.shape)} and input ids {list(higher_input_ids.shape)} must have the same shape"
        )
    regularization = _check_regularization(regularization)
    batch_size = higher_costs.shape[0]
    higher_signs = _check_cost_signs("higher_cost_signs", higher_cost_signs, batch_size).unsqueeze(1)
    lower_signs = _check_cost_signs("lower_cost_signs", lower_cost_signs, batch_size).unsqueeze(1)
    span = divergence_span_mask(higher_input_ids, lower_input_ids, higher_attention_mask, lower_attention_mask)
    span_length = span.astype("float32").sum(axis=1)

    def span_mean(values: paddle.Tensor) -> paddle.Tensor:  # [B, L] -> [B]
        return paddle.where(span, values, paddle.zeros_like(values)).sum(axis=1) / span_length

    higher = higher_costs.astype("float32")
    lower = lower_costs.astype("float32")
    per_pair = (
        span_mean(-F.log_sigmoid(higher - lower))
        + span_mean(-F.log_sigmoid(lower_signs * lower))
        + span_mean(-F.log_sigmoid(higher_signs * higher))
    )
    if regularization > 0:
        per_pair = per_pair + regularization * (span_mean(lower**2) + span_mean(higher**2))
    return per_pair.mean()


def cost_sign_accuracy(costs: paddle.Tensor, cost_signs: paddle.Tensor) -> paddle.Tensor:
    """Fraction of answers whose cost has the labelled sign (c * cost > 0, strict) -> scalar float32.

    costs, cost_signs: [N] (the 2B end costs of a batch and their +1/-1 cost signs).
    """
    if costs.shape != cost_signs.shape or costs.ndim != 1:
        raise ValueError(f"costs and cost_signs must both be [N]; got {list(costs.shape)} and {list(cost_signs.shape)}")
    return ((cost_signs.astype("float32") * costs.astype("float32")) > 0).astype("float32").mean()

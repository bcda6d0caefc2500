"""Rollout generation for PPO: one entry point, ``generate_rollout``, over three backends.

* ``"plain"``: paddlenlp's dygraph ``model.generate`` (reference semantics, any model).
* ``"fast"``:  the CPU KV-cache decoder ``KVDecoder`` (Llama, Qwen2, Mistral) driven by a host-side token loop
  whose token selection reproduces paddlenlp's ``greedy_search`` / ``sample`` (same processors in the same
  order; greedy is token-for-token identical, sampling has the same distribution but its own random
  stream: a NumPy generator seeded from Paddle's, so ``paddle.seed`` still makes it reproducible).
* ``"fused"``: paddlenlp's fused inference model on GPU (needs ``paddlenlp_ops``), fed the current
  training weights each rollout (``FusedInferenceModel``). Without its runtime it logs one line and
  falls back to ``"fast"`` (or ``"plain"``).
* ``"auto"``: fused if it can run, else fast if the model is supported, else plain.

Sampling semantics (paddlenlp 2.8.1 ``GenerationMixin.sample``), per step on the last-position logits:
``repetition_penalty`` on every token id present in the whole context (left-padded prompt *including*
its pad ids, plus everything generated, including pads after EOS): ``l < 0 -> l * p`` else ``l / p``;
then ``/ temperature``; ``softmax``; top-k (keep probs ``>=`` the k-th largest); top-p (sort descending,
drop a token when the cumulative probability *before* it already exceeds ``top_p``; the first is always
kept); a draw proportional to the kept probabilities. Greedy (``do_sample=False`` or ``temperature == 0``)
is ``argmax`` after the repetition penalty only. A row that emitted EOS gets ``pad_token_id`` afterwards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import paddle

from alignment.models.infer_model_utils import (
    FusedInferenceModel,
    KVDecoder,
    check_fused_weight_mapping,
    fused_runtime_missing,
    fused_sampling_unsupported_reason,
    kv_decoder_unsupported_reason,
)
from alignment.models.ppo_model_utils import make_position_ids, make_response_mask
from alignment.utils.env import cpu_path_summary

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "plain", "fast", "fused")
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """Log a fallback once per process (rollouts repeat every PPO step)."""
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def _info_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.info(message)


# eos id handed to paddlenlp when generation must not stop early: no token equals it.
_NEVER_EOS = -1


@dataclass(frozen=True)
class SamplingParams:
    """Token-selection settings of one rollout (validated; ``greedy`` resolved)."""

    greedy: bool
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    @classmethod
    def create(cls, do_sample, temperature, top_p, top_k, repetition_penalty) -> "SamplingParams":
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}.")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
        if not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}.")
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}.")
        greedy = (not do_sample) or temperature == 0
        return cls(greedy, float(temperature), float(top_p), int(top_k), float(repetition_penalty))


# --------------------------------------------------------------------------------------------------
# Token selection on the host: pure NumPy functions on [B, V] float32 logits.
# Paddle's CPU reductions are slow at this size (measured on [8, 8000], 1 thread: softmax 110-170 us,
# argmax/max/sum 80-110 us each, multinomial 360-480 us, argsort 7-9 ms); NumPy does each in 4-60 us,
# and a host-side token loop also makes the "all rows ended" check free.
# --------------------------------------------------------------------------------------------------


def token_presence(token_ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """``[B, V]`` bool, True where the token id occurs anywhere in row ``b`` of ``token_ids [B, L]``."""
    presence = np.zeros((token_ids.shape[0], vocab_size), dtype=bool)
    np.put_along_axis(presence, token_ids.astype(np.int64), True, axis=1)
    return presence


def apply_repetition_penalty(logits: np.ndarray, presence: np.ndarray, penalty: float) -> np.ndarray:
    """paddlenlp's ``RepetitionPenaltyLogitsProcessor``: seen tokens get ``l * p`` if ``l < 0`` else ``l / p``.

    Args: logits ``[B, V]`` float32; presence ``[B, V]`` bool (see ``token_presence``). Returns a new array.
    """
    penalized = np.where(logits < 0, logits * np.float32(penalty), logits / np.float32(penalty))
    return np.where(presence, penalized, logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row softmax of ``[B, V]`` float32 logits (max-shifted)."""
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def top_k_filter(probs: np.ndarray, top_k: int) -> np.ndarray:
    """paddlenlp's ``TopKProcess``: zero probs below the k-th largest of the row (ties at it are kept)."""
    vocab = probs.shape[-1]
    k = min(max(top_k, 1), vocab)
    kth = np.partition(probs, vocab - k, axis=-1)[:, vocab - k : vocab - k + 1]
    return np.where(probs >= kth, probs, np.float32(0.0))


def top_p_filter(probs: np.ndarray, top_p: float) -> np.ndarray:
    """paddlenlp's ``TopPProcess`` (``min_tokens_to_keep=1``): sort descending; drop a token when the
    cumulative probability of the tokens *before* it already exceeds ``top_p``; the first is always kept.
    ``[B, V]`` -> ``[B, V]``, unnormalised.
    """
    order = np.argsort(-probs, axis=-1, kind="stable")
    cumulative = np.cumsum(np.take_along_axis(probs, order, axis=-1), axis=-1)
    drop_sorted = np.zeros(probs.shape, dtype=bool)
    drop_sorted[:, 1:] = cumulative[:, :-1] > top_p
    drop = np.zeros(probs.shape, dtype=bool)
    np.put_along_axis(drop, order, drop_sorted, axis=-1)
    return np.where(drop, np.float32(0.0), probs)


def next_token_probs(logits: np.ndarray, presence: np.ndarray | None, params: SamplingParams) -> np.ndarray:
    """The unnormalised distribution paddlenlp's ``sample`` hands to ``multinomial`` for one step.

    Args:
        logits: ``[B, V]`` float32 next-token logits.
        presence: ``[B, V]`` bool context indicator for the repetition penalty (None when it is 1).
    Returns:
        ``[B, V]`` float32 probabilities after penalty, temperature, softmax, top-k and top-p
        (filtered entries 0; rows sum to <= 1).
    """
    if params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, presence, params.repetition_penalty)
    if params.temperature != 1.0:
        logits = logits / np.float32(params.temperature)
    probs = softmax(logits)
    if params.top_k != 0:
        probs = top_k_filter(probs, params.top_k)
    if params.top_p < 1.0:
        probs = top_p_filter(probs, params.top_p)
    return probs


def token_log_probs(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """``[B]`` float32 ``log softmax(logits)[b, tokens[b]]`` of raw ``logits [B, V]``.

    The model's own log-probability of each chosen token, before repetition penalty, temperature and
    top-k/top-p (exactly what the training forward's ``gather_log_probabilities`` computes from the same
    logits), max-shifted like it.
    """
    shift = logits.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(logits - shift).sum(axis=-1, dtype=np.float32)) + shift[:, 0]
    return (logits[np.arange(logits.shape[0]), tokens] - log_norm).astype(np.float32)


def sample_categorical(weights: np.ndarray, rng: np.random.Generator, block: int = 128) -> np.ndarray:
    """One draw per row from unnormalised non-negative ``weights [B, V]``: ``P(v) = w_v / sum(w)``. ``[B]`` int64.

    Two-level inverse CDF: pick a block of ``block`` consecutive tokens by the cumulative block sums, then
    the token inside it (a flat ``np.cumsum`` over 8000 entries alone takes ~220 us for 8 rows).
    """
    batch, vocab = weights.shape
    starts = np.arange(0, vocab, block)
    block_cdf = np.cumsum(np.add.reduceat(weights, starts, axis=1), axis=1, dtype=np.float64)  # [B, blocks]
    threshold = rng.random(batch) * block_cdf[:, -1]
    # The first block whose cumulative weight exceeds the threshold holds a positive weight.
    chosen = np.minimum((block_cdf <= threshold[:, None]).sum(axis=1), len(starts) - 1)
    rows = np.arange(batch)
    before = np.where(chosen > 0, block_cdf[rows, np.maximum(chosen - 1, 0)], 0.0)
    columns = starts[chosen][:, None] + np.arange(block)  # [B, block]; past the vocab -> weight 0
    inner = np.where(columns < vocab, weights[rows[:, None], np.minimum(columns, vocab - 1)], 0.0)
    index = (np.cumsum(inner, axis=1) <= (threshold - before)[:, None]).sum(axis=1)
    # Rounding can push the index past the block's last positive weight: clamp to it.
    last_positive = block - 1 - np.argmax(inner[:, ::-1] > 0, axis=1)
    return (starts[chosen] + np.minimum(index, last_positive)).astype(np.int64)


def select_next_tokens(
    logits: np.ndarray, presence: np.ndarray | None, params: SamplingParams, rng: np.random.Generator
) -> np.ndarray:
    """Next token ids ``[B]`` int64: argmax after the repetition penalty (greedy, like paddlenlp's
    ``greedy_search``), or a draw from ``next_token_probs``."""
    if params.greedy:
        if params.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, presence, params.repetition_penalty)
        return logits.argmax(axis=-1).astype(np.int64)
    return sample_categorical(next_token_probs(logits, presence, params), rng)


def pad_after_eos(generated: paddle.Tensor, eos_token_id: int, pad_token_id: int) -> paddle.Tensor:
    """``[B, N]`` generated ids with every token after the first EOS replaced by ``pad_token_id``."""
    keep = make_response_mask(generated, eos_token_id)
    return paddle.where(keep, generated, paddle.full_like(generated, pad_token_id))


def trim_finished_columns(generated: paddle.Tensor, eos_token_id: int) -> paddle.Tensor:
    """Drop trailing columns in which every row had already ended (at or after its first EOS).

    ``[B, N]`` -> ``[B, N']`` with ``N' = max_b (index of first EOS + 1)``, or ``N`` if a row has no EOS.
    """
    lengths = make_response_mask(generated, eos_token_id).astype("int64").sum(axis=1)
    return generated[:, : max(int(lengths.max()), 1)]


# --------------------------------------------------------------------------------------------------
# Backends: each returns the generated ids only, [B, N], N <= max_new_tokens
# --------------------------------------------------------------------------------------------------


def _generate_plain(model, input_ids, attention_mask, max_new_tokens, params, eos_token_id, pad_token_id, stop_at_eos):
    """paddlenlp ``model.generate`` with a bool mask and ``position_ids = cumsum(mask) - 1`` (clipped)."""
    sampling = {} if params.greedy else {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k}
    generated, _ = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask.astype("bool"),
        position_ids=make_position_ids(attention_mask),
        max_new_tokens=max_new_tokens,
        decode_strategy="greedy_search" if params.greedy else "sampling",
        repetition_penalty=params.repetition_penalty,
        eos_token_id=eos_token_id if stop_at_eos else _NEVER_EOS,
        pad_token_id=pad_token_id,
        use_cache=True,
        **sampling,
    )
    return pad_after_eos(generated, eos_token_id, pad_token_id)


def _generate_fast(
    model, input_ids, attention_mask, max_new_tokens, params, eos_token_id, pad_token_id, stop_at_eos, progress=False,
    with_log_probs=False,
):
    """Host-side token loop over ``KVDecoder``; token selection in NumPy (see above).

    The sampler's NumPy generator is seeded from Paddle's global generator, so ``paddle.seed`` makes
    rollouts reproducible. Returns ``(generated [B, N'], log_probs [B, N'] or None)``: with
    ``with_log_probs`` the model's log-prob of every chosen token (:func:`token_log_probs` of the raw
    logits, 0 after a row's EOS), else None.
    """
    rng = np.random.default_rng(int(paddle.randint(0, 2**31 - 1, [1])))
    decoder = KVDecoder(model, input_ids, attention_mask, max_new_tokens)
    _info_once(f"rollout: fast CPU decoder, {cpu_path_summary()}")
    logits = decoder.prefill()
    presence = None
    if params.repetition_penalty != 1.0:
        presence = token_presence(input_ids.numpy(), logits.shape[-1])
    batch = input_ids.shape[0]
    unfinished = np.ones(batch, dtype=bool)
    generated = np.full((batch, max_new_tokens), pad_token_id, dtype=np.int64)
    steps = range(max_new_tokens)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="rollout tokens", leave=False, dynamic_ncols=True)
    rows = np.arange(batch)
    log_probs = np.zeros((batch, max_new_tokens), dtype=np.float32) if with_log_probs else None
    for step in steps:
        step_logits = logits.numpy()
        next_tokens = np.where(unfinished, select_next_tokens(step_logits, presence, params, rng), pad_token_id)
        generated[:, step] = next_tokens
        if log_probs is not None:
            log_probs[:, step] = np.where(unfinished, token_log_probs(step_logits, np.where(unfinished, next_tokens, 0)), 0.0)
        unfinished &= next_tokens != eos_token_id
        if step == max_new_tokens - 1 or (stop_at_eos and not unfinished.any()):
            generated = generated[:, : step + 1]
            break
        if presence is not None:
            presence[rows, next_tokens] = True
        logits = decoder.step(paddle.to_tensor(next_tokens))
    if log_probs is None:
        return paddle.to_tensor(generated), None
    return paddle.to_tensor(generated), paddle.to_tensor(log_probs[:, : generated.shape[1]])


def _generate_fused(model, input_ids, attention_mask, max_new_tokens, params, eos_token_id, pad_token_id, stop_at_eos):
    """paddlenlp's fused inference model (GPU) with the training weights swapped in; padded after EOS."""
    runner = FusedInferenceModel.for_model(model)
    generated = runner.generate(
        input_ids, attention_mask, max_new_tokens, params, eos_token_id, pad_token_id, stop_at_eos=stop_at_eos
    )
    generated = pad_after_eos(generated, eos_token_id, pad_token_id)
    return trim_finished_columns(generated, eos_token_id) if stop_at_eos else generated


_BACKEND_FUNCTIONS = {"plain": _generate_plain, "fast": _generate_fast, "fused": _generate_fused}


def resolve_backend(model, backend: str, params: SamplingParams) -> str:
    """The backend that will actually run (``"plain"``, ``"fast"`` or ``"fused"``) for ``backend``.

    ``"fused"`` without its runtime (GPU, ``paddlenlp_ops``) or with sampling it cannot reproduce, and
    ``"fast"`` for an unsupported model, fall back with one warning line. ``"fused"`` with a runtime but a
    model the fused weight mapping cannot express (GQA) raises ``ValueError``; ``"auto"`` then picks fast.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if backend == "plain":
        return "plain"
    fast_reason = kv_decoder_unsupported_reason(model)
    fallback = "fast" if fast_reason is None else "plain"
    if backend in ("auto", "fused"):
        fused_reason = fused_runtime_missing()
        if fused_reason is None:
            try:
                check_fused_weight_mapping(model)
            except ValueError as error:
                if backend == "fused":
                    raise ValueError(f"backend='fused' cannot run this model: {error}. Use backend='fast'.") from None
                fused_reason = str(error)
        if fused_reason is None:
            fused_reason = fused_sampling_unsupported_reason(params)
        if fused_reason is None:
            return "fused"
        if backend == "fused":
            _warn_once(f"Fused rollout unavailable ({fused_reason}); falling back to the {fallback} backend.")
            return fallback
    if backend == "fast" and fast_reason is not None:
        _warn_once(f"Fast rollout unavailable ({fast_reason}); falling back to the plain backend.")
    return fallback


def generate_rollout(
    model,
    input_ids: paddle.Tensor,
    attention_mask: paddle.Tensor,
    *,
    max_new_tokens: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    num_return_sequences: int = 1,
    eos_token_id: int,
    pad_token_id: int,
    backend: str = "auto",
    stop_at_eos: bool = True,
    progress: bool = False,
    return_log_probs: bool = False,
):
    """Sample responses for a left-padded prompt batch; returns prompt + response ids.

    Args:
        model: a paddlenlp causal LM (``LlamaForCausalLM`` for the fast/fused backends), or a
            ``paddle.DataParallel`` wrapping one.
        input_ids: ``[B, S]`` int64 prompts, left-padded.
        attention_mask: ``[B, S]`` (bool or 0/1), 1 for real prompt tokens.
        max_new_tokens: response length limit N (>= 1).
        do_sample / temperature / top_p / top_k / repetition_penalty: paddlenlp semantics (module doc);
            greedy when ``do_sample`` is False or ``temperature == 0``.
        num_return_sequences: n responses per prompt.
        eos_token_id / pad_token_id: a row ends at its first EOS and is right-padded with pad after it.
        backend: ``"auto" | "plain" | "fast" | "fused"`` (module doc).
        progress: show a tqdm bar over the decode steps (fast backend; the others decode inside one call).
        stop_at_eos: True: stop as soon as every row has ended (``N' <= N`` columns). False: always
            run exactly ``max_new_tokens`` steps (benchmarks); rows are still padded after their EOS.
        return_log_probs: also return the model's log-prob of every generated token (the ``fast``
            backend computes them from the logits it samples from; the others return None).

    Returns:
        ``[B * n, S + N']`` int64: prompt ``b`` repeated n times (rows ``b*n .. b*n + n - 1``),
        followed by its responses. With ``return_log_probs``: ``(sequences, log_probs)``, ``log_probs``
        ``[B * n, N']`` float32 (0 after a row's EOS) or None.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq_len], got shape {list(input_ids.shape)}.")
    if list(attention_mask.shape) != list(input_ids.shape):
        raise ValueError(
            f"attention_mask shape {list(attention_mask.shape)} must equal input_ids shape {list(input_ids.shape)}."
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")
    for name, value in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an int, got {value!r}.")
    eos_token_id, pad_token_id = int(eos_token_id), int(pad_token_id)
    if not isinstance(num_return_sequences, int) or num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be an int >= 1, got {num_return_sequences!r}.")
    params = SamplingParams.create(do_sample, temperature, top_p, top_k, repetition_penalty)
    model = getattr(model, "_layers", model)  # paddle.DataParallel wraps the model it trains
    chosen = resolve_backend(model, backend, params)

    input_ids = input_ids.astype("int64")
    attention_mask = attention_mask.astype("int64")
    if num_return_sequences > 1:
        input_ids = paddle.repeat_interleave(input_ids, num_return_sequences, axis=0)
        attention_mask = paddle.repeat_interleave(attention_mask, num_return_sequences, axis=0)

    was_training = model.training
    model.eval()
    try:
        with paddle.no_grad():
            log_probs = None
            if chosen == "fast":
                generated, log_probs = _generate_fast(
                    model, input_ids, attention_mask, max_new_tokens, params, eos_token_id, pad_token_id, stop_at_eos,
                    progress=progress, with_log_probs=return_log_probs,
                )  # fmt: skip
            else:
                generated = _BACKEND_FUNCTIONS[chosen](
                    model, input_ids, attention_mask, max_new_tokens, params, eos_token_id, pad_token_id, stop_at_eos
                )
    finally:
        if was_training:
            model.train()
    sequences = paddle.concat([input_ids, generated.astype("int64")], axis=1)
    return (sequences, log_probs) if return_log_probs else sequences

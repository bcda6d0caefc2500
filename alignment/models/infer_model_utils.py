"""Inference-side models for rollout: the CPU KV-cache decoder for Llama and the GPU fused weight swap.

``LlamaKVDecoder`` is the CPU analogue of upstream's fused-inference weight swap: it is built at the start
of every rollout from the **current** parameters of the training model (shared tensors, no copy, except
the fused QKV / gate-up matrices, which are concatenated once per rollout unless the model already uses
``fuse_attention_qkv`` / ``fuse_attention_ffn``), then decodes with

* one matmul for Q, K and V and one for gate and up (``paddle.matmul`` on MKL);
* a KV cache ``[B, kv_heads, S + N, head_dim]`` per layer, allocated once and written in place; every
  step attends over all ``S + N`` columns (future ones masked): a prefix slice is a strided view that
  ``matmul`` copies, which measured 3x (T=96) to 13x (T=576) slower than the full product;
* RoPE tables and additive masks precomputed for the whole rollout, with exactly the training forward's
  left-padding semantics (``position_ids = cumsum(mask) - 1`` clipped at 0, prompt pads masked with
  ``finfo.min``, generated tokens always visible); the query slots of the tables carry ``1/sqrt(D)`` and
  the value slot is ``cos = 1, sin = 0``, so ``x * cos + roll(x, D/2) * sin`` (the sign of ``rotate_half``
  folded into ``sin``) ropes q and k, scales q and keeps v exactly;
* tables and masks ``expand``-ed to full shape once per step: Paddle's CPU elementwise kernels take
  26-70 us when broadcasting over a middle axis and 2-6 us on equal shapes;
* GQA without ``repeat_kv`` (query heads grouped under their KV head, broadcast in the matmul);
* ``fused_rms_norm`` with the residual add fused in, instead of six elementwise ops per norm, where the
  CPU has AVX-512F (Paddle's CPU kernel needs it); its portable twin elsewhere or when
  ``ALIGNMENT_PORTABLE_CPU=1`` (:mod:`alignment.models.kernels`).

``fused_weight_mapping`` / ``FusedInferenceModel`` wire the GPU path: paddlenlp's
``LlamaForCausalLMInferenceModel`` (needs the ``paddlenlp_ops`` custom ops) fed with the training weights.
"""

from __future__ import annotations

import math
import weakref

import paddle
import paddle.nn.functional as F

from alignment.models.kernels import select_rms_norm
from alignment.models.ppo_model_utils import make_position_ids

__all__ = [
    "LlamaKVDecoder",
    "llama_decoder_unsupported_reason",
    "fused_weight_mapping",
    "fused_runtime_missing",
    "check_fused_weight_mapping",
    "fused_sampling_unsupported_reason",
    "FusedInferenceModel",
]


def _llama_parts(model):
    """``(backbone, lm_head)`` of a paddlenlp Llama causal LM, or ``(None, None)``."""
    backbone = getattr(model, "llama", None)
    lm_head = getattr(model, "lm_head", None)
    if backbone is None or lm_head is None or not hasattr(backbone, "layers"):
        return None, None
    return backbone, lm_head


def llama_decoder_unsupported_reason(model) -> str | None:
    """Why ``LlamaKVDecoder`` cannot run ``model`` (a short sentence), or None if it can."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "llama":
        return f"model type {getattr(config, 'model_type', type(model).__name__)!r} is not llama"
    backbone, _ = _llama_parts(model)
    if backbone is None:
        return f"{type(model).__name__} has no `llama` backbone with an `lm_head`"
    if getattr(config, "tensor_parallel_degree", 1) > 1:
        return "tensor-parallel weights are split across ranks"
    if getattr(config, "alibi", False):
        return "ALiBi attention is not implemented"
    if getattr(config, "use_long_sequence_strategies", False):
        return "long-sequence RoPE strategies are not implemented"
    if getattr(config, "rope_scaling_type", None) not in (None, "linear", "ntk"):
        return f"rope_scaling_type={config.rope_scaling_type!r} is not implemented"
    if backbone.embed_tokens.weight.dtype != paddle.float32:
        return f"weights are {backbone.embed_tokens.weight.dtype}, the CPU decoder runs float32 only"
    return None


def _fused_qkv_weight(attn, num_kv_heads: int, group: int, head_dim: int) -> paddle.Tensor:
    """``[H, kv_heads * (group + 2) * head_dim]``: per KV head, its ``group`` query heads, then K, then V.

    This is paddlenlp's own ``qkv_proj`` layout (``fuse_attention_qkv=True``), which is shared as is;
    separate ``q_proj``/``k_proj``/``v_proj`` weights are concatenated into it (one copy per rollout).
    """
    if hasattr(attn, "qkv_proj"):
        return attn.qkv_proj.weight
    hidden = attn.q_proj.weight.shape[0]
    q = attn.q_proj.weight.reshape([hidden, num_kv_heads, group * head_dim])
    k = attn.k_proj.weight.reshape([hidden, num_kv_heads, head_dim])
    v = attn.v_proj.weight.reshape([hidden, num_kv_heads, head_dim])
    return paddle.concat([q, k, v], axis=-1).reshape([hidden, -1])


def _fused_gate_up_weight(mlp) -> paddle.Tensor:
    """``[H, 2 * I]`` = ``[gate | up]`` (paddlenlp's ``gate_up_fused_proj`` layout, shared if fused)."""
    if hasattr(mlp, "gate_up_fused_proj"):
        return mlp.gate_up_fused_proj.weight
    return paddle.concat([mlp.gate_proj.weight, mlp.up_proj.weight], axis=-1)


class LlamaKVDecoder:
    """KV-cached decoding of one left-padded prompt batch with the current weights of a Llama LM.

    Usage (one instance per rollout)::

        decoder = LlamaKVDecoder(model, input_ids, attention_mask, max_new_tokens)
        logits = decoder.prefill()          # [B, V] float32, next-token logits after the prompt
        for t in range(max_new_tokens - 1):
            logits = decoder.step(tokens)   # tokens: [B] int64, the token chosen at step t

    Numerically this is the training forward (``LlamaForCausalLM.forward`` with ``position_ids =
    cumsum(mask) - 1`` clipped at 0 and the same additive ``finfo.min`` mask) evaluated incrementally;
    differences are float rounding only (fused RMSNorm, fused matmuls).
    """

    def __init__(self, model, input_ids: paddle.Tensor, attention_mask: paddle.Tensor, max_new_tokens: int):
        reason = llama_decoder_unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"LlamaKVDecoder cannot run this model: {reason}.")
        if input_ids.ndim != 2 or list(attention_mask.shape) != list(input_ids.shape):
            raise ValueError(
                f"input_ids must be [B, S] and attention_mask the same shape, got {list(input_ids.shape)} "
                f"and {list(attention_mask.shape)}."
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        config = model.config
        backbone, lm_head = _llama_parts(model)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}."
            )
        self.group = self.num_heads // self.num_kv_heads
        self.hidden = config.hidden_size
        self.head_dim = self.hidden // self.num_heads
        self.eps = config.rms_norm_eps
        # Fused RMSNorm where the CPU can run it (AVX-512F), its portable twin elsewhere (kernels.py).
        self.rms_norm = select_rms_norm()

        # Weight snapshot: shared tensors (the fused ones are concatenated unless the model is fused).
        self.embed = backbone.embed_tokens.weight
        self.final_norm = backbone.norm.weight
        self.lm_head = lm_head.weight
        self.layers = [
            (
                layer.input_layernorm.weight,
                _fused_qkv_weight(layer.self_attn, self.num_kv_heads, self.group, self.head_dim),
                layer.self_attn.o_proj.weight,
                layer.post_attention_layernorm.weight,
                _fused_gate_up_weight(layer.mlp),
                layer.mlp.down_proj.weight,
            )
            for layer in backbone.layers
        ]

        batch, prompt_len = input_ids.shape
        self.input_ids = input_ids.astype("int64")
        self.prompt_len = prompt_len
        self.total_len = prompt_len + max_new_tokens
        self.max_new_tokens = max_new_tokens
        self.step_index = 0

        # RoPE: the model's own cos/sin tables [1, max_pos, 1, D] (same scaling as training).
        rotary = backbone.layers[0].self_attn.rotary_emb
        cos_table = rotary.cos_cached.reshape([-1, self.head_dim])
        sin_table = rotary.sin_cached.reshape([-1, self.head_dim])
        mask = attention_mask.astype("bool")
        prompt_pos = make_position_ids(mask)  # [B, S]
        last_pos = prompt_pos[:, -1:]
        if int(last_pos.max()) + max_new_tokens >= cos_table.shape[0]:
            raise ValueError(
                f"prompt positions up to {int(last_pos.max())} plus max_new_tokens={max_new_tokens} exceed the "
                f"model's max_position_embeddings={cos_table.shape[0]}."
            )
        # Generated token t (0-based) sits at position last_pos + 1 + t, like paddlenlp's generate.
        new_pos = last_pos + 1 + paddle.arange(max_new_tokens, dtype="int64").unsqueeze(0)  # [B, N]
        # Prompt tables [B, S, 1, group + 2, D] broadcast against the q|k|v slots [B, S, kv, group + 2, D]
        # of the fused projection: query slots carry the attention scale 1/sqrt(D) (RoPE is linear in q),
        # the value slot has cos = 1, sin = 0 (left unchanged, exactly), so one multiply-add covers all.
        slot_scale = paddle.to_tensor([1.0 / math.sqrt(self.head_dim)] * self.group + [1.0, 0.0]).reshape([1, 1, -1, 1])
        value_slot = paddle.to_tensor([0.0] * (self.group + 1) + [1.0]).reshape([1, 1, -1, 1])

        # rotate_half(x) = concat(-x2, x1) = roll(x, D/2) * [-1 (first half), +1 (second half)]: the sign
        # goes into the sin table, so RoPE is x * cos + roll(x) * sin (roll: 37 us vs a [D, D] matmul 103 us).
        half = self.head_dim // 2
        sin_table = sin_table * paddle.to_tensor([-1.0] * half + [1.0] * (self.head_dim - half))

        def rope_table(table, positions, value_fill):  # [B, L] -> [B, L, 1, group + 2, D]
            shape = [*positions.shape, self.group + 2, self.head_dim]
            rows = table[positions].unsqueeze(2).expand(shape)
            return (rows * slot_scale.expand(shape) + value_slot.expand(shape) * value_fill).unsqueeze(2)

        self.prompt_cos, self.prompt_sin = rope_table(cos_table, prompt_pos, 1.0), rope_table(sin_table, prompt_pos, 0.0)
        # Per decode step: [B, 1, group + 2, D] (the length axis dropped; see _attention's decode layout).
        self.step_cos = paddle.unbind(rope_table(cos_table, new_pos, 1.0).transpose([1, 0, 2, 3, 4]))
        self.step_sin = paddle.unbind(rope_table(sin_table, new_pos, 0.0).transpose([1, 0, 2, 3, 4]))

        # Additive masks over the whole cache: 0 = visible, finfo.min = hidden.
        neg = paddle.finfo(paddle.float32).min
        key_visible = paddle.concat([mask, paddle.zeros([batch, max_new_tokens], dtype="bool")], axis=-1)
        causal = paddle.tril(paddle.ones([prompt_len, self.total_len], dtype="bool"))
        prompt_visible = key_visible.unsqueeze(1) & causal.unsqueeze(0)  # [B, S, T]
        self.prompt_mask = paddle.where(prompt_visible, 0.0, neg).astype("float32").unsqueeze([1, 2])
        # Decode step t (query at cache column S + t) sees the prompt mask plus columns S..S+t.
        generated = paddle.arange(self.total_len).unsqueeze(0) - prompt_len  # [1, T]
        step = paddle.arange(max_new_tokens).unsqueeze(1)  # [N, 1]
        step_visible = key_visible.unsqueeze(0) | ((generated >= 0) & (generated <= step)).unsqueeze(1)
        step_masks = paddle.where(step_visible, 0.0, neg).astype("float32")  # [N, B, T]
        self.step_masks = paddle.unbind(step_masks.unsqueeze([2, 3]))  # N x [B, 1, 1, T]

        # KV caches [B, kv, S + N, D] per layer, created by prefill() (prompt columns || this zero tail).
        self.cache_tail = paddle.zeros([batch, self.num_kv_heads, max_new_tokens, self.head_dim], dtype="float32")
        self.key_cache = [None] * len(self.layers)
        self.value_cache = [None] * len(self.layers)

    # -- one transformer layer on L new tokens --------------------------------------------------------
    def _attention(self, normed, qkv_weight, out_weight, layer_index, cos, sin, mask, start):
        """Self-attention of ``normed`` [B, L, H] written to cache columns ``[start, start + L)``."""
        batch, length = normed.shape[0], normed.shape[1]
        mix = paddle.matmul(normed, qkv_weight)
        if length == 1:  # decode: [B, kv, group + 2, D] is already the attention layout
            mix = mix.reshape([batch, self.num_kv_heads, self.group + 2, self.head_dim])
        else:
            mix = mix.reshape([batch, length, self.num_kv_heads, self.group + 2, self.head_dim])
        # RoPE on q and k, scale on q, v unchanged (see the tables in __init__)
        mix = mix * cos + paddle.roll(mix, self.head_dim // 2, axis=-1) * sin
        q, k, v = paddle.split(mix, [self.group, 1, 1], axis=-2)
        if length > 1:  # prefill: [B, L, kv, x, D] -> [B, kv, x * L, D]
            # (einsum transposes densely, ~30 us; transpose + reshape goes through Paddle's strided copy, ~660 us)
            k = k.squeeze(3).transpose([0, 2, 1, 3])
            v = v.squeeze(3).transpose([0, 2, 1, 3])
            q = paddle.einsum("blkgd->bkgld", q).reshape([batch, self.num_kv_heads, self.group * length, self.head_dim])
        if start == 0:  # prefill creates the cache: concat is ~15x faster than set_value for a whole prompt
            self.key_cache[layer_index] = paddle.concat([k, self.cache_tail], axis=2)
            self.value_cache[layer_index] = paddle.concat([v, self.cache_tail], axis=2)
        else:
            self.key_cache[layer_index][:, :, start : start + length] = k
            self.value_cache[layer_index][:, :, start : start + length] = v
        key_cache, value_cache = self.key_cache[layer_index], self.value_cache[layer_index]
        scores = paddle.matmul(q, key_cache, transpose_y=True) + mask  # [B, kv, group * L, T], q pre-scaled
        context = paddle.matmul(F.softmax(scores, axis=-1), value_cache)  # [B, kv, group * L, D]
        if length == 1:
            context = context.reshape([batch, 1, self.hidden])
        else:
            context = paddle.einsum(
                "bkgld->blkgd", context.reshape([batch, self.num_kv_heads, self.group, length, self.head_dim])
            ).reshape([batch, length, self.hidden])
        return paddle.matmul(context, out_weight)

    def _forward(self, hidden, cos, sin, mask, start):
        """Run all layers on ``hidden`` [B, L, H]; returns next-token logits of the last position [B, V]."""
        # Expanded once per call, not broadcast per layer (broadcasting elementwise ops are slow on CPU).
        batch, length = hidden.shape[0], hidden.shape[1]
        slots = [batch, self.num_kv_heads, self.group + 2, self.head_dim]  # decode layout of q|k|v
        if length > 1:
            slots.insert(1, length)
        cos, sin = cos.expand(slots), sin.expand(slots)
        if length == 1:  # step mask [B, 1, 1, T]; prompt mask [B, 1, 1, S, T] (query rows ordered group, then L)
            mask = mask.expand([batch, self.num_kv_heads, self.group, self.total_len])
        else:
            mask = mask.expand([batch, self.num_kv_heads, self.group, length, self.total_len]).reshape(
                [batch, self.num_kv_heads, self.group * length, self.total_len]
            )
        residual = None
        for index, (ln1, qkv, out, ln2, gate_up, down) in enumerate(self.layers):
            normed, residual = self.rms_norm(hidden, ln1, self.eps, residual)
            attn = self._attention(normed, qkv, out, index, cos, sin, mask, start)
            normed, residual = self.rms_norm(attn, ln2, self.eps, residual)
            hidden = paddle.matmul(F.swiglu(paddle.matmul(normed, gate_up)), down)
        last = (hidden + residual if length == 1 else hidden[:, -1:] + residual[:, -1:]).reshape([batch, self.hidden])
        return paddle.matmul(self.rms_norm(last, self.final_norm, self.eps, None)[0], self.lm_head)

    def prefill(self) -> paddle.Tensor:
        """Process the prompt; returns ``[B, V]`` float32 logits for the first new token."""
        hidden = F.embedding(self.input_ids, self.embed)
        cos, sin, mask = self.prompt_cos, self.prompt_sin, self.prompt_mask
        if self.prompt_len == 1:  # a one-token prompt runs in the decode layout
            cos, sin, mask = cos.squeeze(1), sin.squeeze(1), mask.squeeze(3)
        return self._forward(hidden, cos, sin, mask, 0)

    def step(self, tokens: paddle.Tensor) -> paddle.Tensor:
        """Feed ``tokens`` [B] (new token ``t``); returns ``[B, V]`` logits for new token ``t + 1``."""
        t = self.step_index
        if t >= self.max_new_tokens - 1:
            raise RuntimeError(f"step() called more than max_new_tokens - 1 = {self.max_new_tokens - 1} times.")
        self.step_index = t + 1
        hidden = F.embedding(tokens.reshape([-1, 1]), self.embed)
        return self._forward(hidden, self.step_cos[t], self.step_sin[t], self.step_masks[t], self.prompt_len + t)


# ==================================================================================================
# GPU fused path: paddlenlp.experimental LlamaForCausalLMInferenceModel + weight swap
# ==================================================================================================


def fused_runtime_missing() -> str | None:
    """What the fused GPU path lacks on this machine (a GPU, ``paddlenlp_ops``, the experimental module), or None."""
    if not paddle.is_compiled_with_cuda() or not paddle.get_device().startswith("gpu"):
        return "no GPU"
    try:
        import paddlenlp_ops  # noqa: F401
    except ImportError:
        return "paddlenlp_ops is not installed"
    try:
        from paddlenlp.experimental.transformers import LlamaForCausalLMInferenceModel  # noqa: F401
    except ImportError as error:
        return f"paddlenlp.experimental.transformers cannot be imported ({error})"
    return None


def check_fused_weight_mapping(model) -> None:
    """Raise ``ValueError`` if ``fused_weight_mapping`` cannot express ``model``'s weights.

    paddlenlp's fused model stores q, k and v as ``3 * num_heads * head_dim`` rows: multi-head attention
    only, so GQA/MQA models (``num_key_value_heads < num_attention_heads``) are refused.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "llama" or _llama_parts(model)[0] is None:
        raise ValueError("only Llama causal LMs have a fused inference model")
    if config.num_key_value_heads != config.num_attention_heads:
        raise ValueError(
            f"GQA (num_key_value_heads={config.num_key_value_heads} != num_attention_heads="
            f"{config.num_attention_heads}) is not handled by the fused qkv weight mapping"
        )


def fused_sampling_unsupported_reason(params) -> str | None:
    """Why the fused sampler cannot reproduce ``params`` (it does top-p only), or None."""
    if not params.greedy and (params.top_k != 0 or params.temperature != 1.0):
        return "the fused sampler supports top_p only (top_k must be 0 and temperature 1.0)"
    return None


def fused_weight_mapping(model) -> dict:
    """Training state dict -> the keys ``LlamaForCausalLMInferenceModel.set_state_dict`` reads.

    Same names (``llama.layers.{i}.self_attn.q_proj.weight`` ...); a model trained with
    ``fuse_attention_qkv`` / ``fuse_attention_ffn`` is split back into q/k/v and gate/up first
    (paddlenlp's fused layout is per head ``[q | k | v]``, see ``_fused_qkv_weight``). Tensors are shared.
    """
    config = model.config
    state = dict(model.state_dict())
    heads, hidden = config.num_attention_heads, config.hidden_size
    head_dim = hidden // heads
    for index in range(config.num_hidden_layers):
        prefix = f"llama.layers.{index}."
        qkv = state.pop(prefix + "self_attn.qkv_proj.weight", None)
        if qkv is not None:
            q, k, v = paddle.split(qkv.reshape([hidden, heads, 3, head_dim]), 3, axis=2)
            for name, part in (("q", q), ("k", k), ("v", v)):
                state[prefix + f"self_attn.{name}_proj.weight"] = part.reshape([hidden, heads * head_dim])
        gate_up = state.pop(prefix + "mlp.gate_up_fused_proj.weight", None)
        if gate_up is not None:
            gate, up = paddle.chunk(gate_up, 2, axis=-1)
            state[prefix + "mlp.gate_proj.weight"], state[prefix + "mlp.up_proj.weight"] = gate, up
    return state


class _RecordContext:
    """Logits processor for the fused sampler that records the ids generated so far (returns logits as is)."""

    def __init__(self):
        self.all_input_ids = None

    def __call__(self, input_ids, logits, decoding_step):
        self.all_input_ids = input_ids
        return logits


class FusedInferenceModel:
    """paddlenlp's fused ``LlamaForCausalLMInferenceModel`` bound to a training model (GPU only).

    Built once per training model; every ``generate`` first swaps in the training model's current
    weights (``set_state_dict`` with ``fused_weight_mapping``), like upstream's ``infer_guard``/``enable``.
    Differences from paddlenlp's dygraph ``sample`` (upstream's too): top-p only, no temperature, the
    repetition penalty sees generated tokens only. Not exercised on CPU-only CI (no ``paddlenlp_ops``).
    """

    _instances: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def __init__(self, model):
        missing = fused_runtime_missing()
        if missing is not None:
            raise RuntimeError(f"Fused inference is unavailable: {missing}.")
        check_fused_weight_mapping(model)
        from paddlenlp.experimental.transformers import LlamaForCausalLMInferenceModel

        config = type(model.config).from_dict(model.config.to_dict())
        config.quant_type = None
        config.weight_only_quant_bits = -1
        config.single_card_ptq = True
        self.model = weakref.proxy(model)  # the cache is keyed weakly by the same model
        self.dtype = model.llama.embed_tokens.weight.dtype
        default_dtype = paddle.get_default_dtype()
        paddle.set_default_dtype(self.dtype)
        try:
            self.infer_model = LlamaForCausalLMInferenceModel(config)
        finally:
            paddle.set_default_dtype(default_dtype)
        self.infer_model.eval()

    @classmethod
    def for_model(cls, model) -> "FusedInferenceModel":
        """The cached instance for ``model`` (created on first use)."""
        if model not in cls._instances:
            cls._instances[model] = cls(model)
        return cls._instances[model]

    def _inputs(self, input_ids, attention_mask, max_new_tokens, params, eos_token_id, pad_token_id):
        """Left-padded prompts -> the right-padded inputs of the fused ``generate`` (upstream predictor layout)."""
        batch, width = input_ids.shape
        mask = attention_mask.astype("bool")
        lengths = mask.astype("int64").sum(axis=1)  # [B]
        # Right-align -> left-align: gather real tokens first (stable order), pads after them.
        order = paddle.argsort((~mask).astype("int64"), axis=1, stable=True)
        ids = paddle.where(
            paddle.arange(width).unsqueeze(0) < lengths.unsqueeze(1),
            paddle.take_along_axis(input_ids, order, axis=1),
            paddle.full_like(input_ids, pad_token_id),
        )
        arange = paddle.arange(width, dtype="int64").unsqueeze(0).expand([batch, width])
        valid = arange < lengths.unsqueeze(1)
        causal = paddle.tril(paddle.ones([width, width], dtype="bool")).unsqueeze(0)
        attn = (valid.unsqueeze(1) & valid.unsqueeze(2) & causal).astype(self.dtype).unsqueeze(1)
        total = width + max_new_tokens
        tgt_mask = (paddle.arange(total).unsqueeze(0) < lengths.unsqueeze(1)).astype(self.dtype)
        ones = paddle.ones([batch, 1])
        top_p = 0.0 if params.greedy else params.top_p
        cache_shapes = self.infer_model.get_cache_kvs_shape(self.infer_model.config, batch, total)
        return dict(
            input_ids=ids,
            attention_mask=attn,
            position_ids=paddle.where(valid, arange, paddle.zeros_like(arange)),
            penalty_score=ones * params.repetition_penalty,
            frequency_score=ones * 0.0,
            presence_score=ones * 0.0,
            min_length=paddle.ones([batch, 1], dtype="int64"),
            max_length=paddle.full([batch, 1], max_new_tokens, dtype="int64"),
            temperature=ones * 1.0,
            top_p=ones * top_p,
            eos_token_id=paddle.to_tensor([eos_token_id], dtype="int64"),
            seq_len_encoder=lengths.astype("int32").unsqueeze(1),
            seq_len_decoder=lengths.astype("int32").unsqueeze(1),
            step_idx=paddle.zeros([batch, 1], dtype="int64"),
            stop_flags=paddle.zeros([batch, 1], dtype="bool"),
            tgt_ids=paddle.take_along_axis(ids, (lengths - 1).clip(min=0).unsqueeze(1), axis=1),
            tgt_pos=(lengths - 1).clip(min=0).unsqueeze(1),
            tgt_generation_mask=tgt_mask.unsqueeze([1, 2]),
            pre_ids=paddle.full([batch, max_new_tokens + 1], -1, dtype="int64"),
            stop_nums=paddle.to_tensor([batch], dtype="int64"),
            cache_kvs=[paddle.zeros(shape, dtype=self.dtype) for shape in cache_shapes],
        )

    def generate(self, input_ids, attention_mask, max_new_tokens, params, eos_token_id, pad_token_id, stop_at_eos=True):
        """Generated ids ``[B, N]`` (prompt not included; the caller pads after EOS and trims)."""
        from paddlenlp.experimental.transformers import generation_utils
        from paddlenlp.generation.logits_process import LogitsProcessorList

        self.infer_model.set_state_dict(fused_weight_mapping(self.model))
        inputs = self._inputs(input_ids, attention_mask, max_new_tokens, params, eos_token_id, pad_token_id)
        if not stop_at_eos:
            inputs["eos_token_id"] = paddle.to_tensor([-1], dtype="int64")
        recorder = _RecordContext()
        # ``save_with_output`` streams every step to a file for serving; rollouts do not want that I/O.
        save_with_output = generation_utils.save_with_output
        generation_utils.save_with_output = lambda *args, **kwargs: None
        try:
            last_tokens = self.infer_model.generate(**inputs, logits_processors=LogitsProcessorList([recorder]))[0]
        finally:
            generation_utils.save_with_output = save_with_output
        # all_input_ids = prompt ids || tokens of steps 1..N-1; the last step's tokens are returned.
        generated = paddle.concat([recorder.all_input_ids[:, input_ids.shape[1] :], last_tokens], axis=1)
        return generated[:, :max_new_tokens].astype("int64")

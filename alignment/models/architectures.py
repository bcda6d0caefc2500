"""The decoder architectures every stage supports, in one registry.

An architecture is a PaddleNLP causal LM family: its ``config.model_type``, the attribute under which
the causal LM (and our score model) holds the decoder stack (``base_model_prefix``: ``llama``,
``qwen2`` ...), and the PaddleNLP classes. What each stage needs comes from here: the score model
class (:mod:`alignment.models.score_model`), whether the fast CPU rollout decoder
(:mod:`alignment.models.infer_model_utils`) can run it, and the error for an unsupported model.

Classes are imported lazily by name, so the registry also works under a PaddleNLP that lacks some of
them (2.8.1 has no Qwen2, Mistral or Gemma): :func:`available_architectures` lists the ones the
installed PaddleNLP provides, and :func:`get_architecture` names them in its error.

Adding an architecture = one :func:`register_architecture` call (plus, for the fast decoder, a
Llama-shaped layer: ``q/k/v/o_proj``, ``gate/up/down_proj``, ``input_layernorm``,
``post_attention_layernorm``, a RoPE table ``rotary_emb.cos_cached``).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any, Optional

__all__ = [
    "DecoderArchitecture",
    "ARCHITECTURES",
    "register_architecture",
    "available_architectures",
    "get_architecture",
    "architecture_of",
    "check_architecture",
]


@dataclasses.dataclass(frozen=True)
class DecoderArchitecture:
    """One decoder family.

    Attributes:
        model_type: ``config.model_type`` (``"llama"``, ``"qwen2"`` ...).
        prefix: class-name prefix in ``paddlenlp.transformers`` (``Qwen2`` -> ``Qwen2Model``,
            ``Qwen2ForCausalLM``, ``Qwen2PretrainedModel``, ``Qwen2Config``).
        backbone_name: attribute of the causal LM holding the decoder stack (``base_model_prefix``).
        embeddings_name: attribute of the decoder stack holding the token embeddings.
        pretrained_class: the ``PretrainedModel`` base when it is not ``<prefix>PretrainedModel``.
        kv_decoder: the fast CPU rollout decoder implements this layer (Llama-shaped, RMSNorm,
            SwiGLU, RoPE, optional q/k/v bias).
    """

    model_type: str
    prefix: str
    backbone_name: str
    embeddings_name: str = "embed_tokens"
    pretrained_class: Optional[str] = None
    kv_decoder: bool = False

    def _class(self, name: str) -> Any:
        import paddlenlp.transformers as transformers

        value = getattr(transformers, name, None)
        if value is None:
            raise ImportError(f"paddlenlp.transformers has no {name} (paddlenlp {_paddlenlp_version()})")
        return value

    @property
    def config_class(self) -> Any:
        return self._class(f"{self.prefix}Config")

    @property
    def backbone_class(self) -> Any:
        return self._class(f"{self.prefix}Model")

    @property
    def causal_lm_class(self) -> Any:
        return self._class(f"{self.prefix}ForCausalLM")

    @property
    def pretrained_model_class(self) -> Any:
        return self._class(self.pretrained_class or f"{self.prefix}PretrainedModel")

    def is_available(self) -> bool:
        """Whether the installed PaddleNLP provides this architecture's classes."""
        try:
            self.backbone_class, self.pretrained_model_class, self.config_class  # noqa: B018
        except ImportError:
            return False
        return True


ARCHITECTURES: dict[str, DecoderArchitecture] = {}
"""``model_type`` -> :class:`DecoderArchitecture`, in registration order."""


def register_architecture(architecture: DecoderArchitecture) -> DecoderArchitecture:
    if architecture.model_type in ARCHITECTURES:
        raise ValueError(f"architecture {architecture.model_type!r} is already registered")
    ARCHITECTURES[architecture.model_type] = architecture
    return architecture


register_architecture(DecoderArchitecture("llama", "Llama", "llama", kv_decoder=True))
register_architecture(DecoderArchitecture("qwen2", "Qwen2", "qwen2", kv_decoder=True))
register_architecture(DecoderArchitecture("mistral", "Mistral", "mistral", pretrained_class="MistralPreTrainedModel", kv_decoder=True))
register_architecture(DecoderArchitecture("gemma", "Gemma", "gemma"))
register_architecture(DecoderArchitecture("qwen", "QWen", "qwen", embeddings_name="wte"))


def _paddlenlp_version() -> str:
    try:
        return importlib.import_module("paddlenlp").__version__
    except Exception:  # noqa: BLE001 - only for a message
        return "?"


def available_architectures() -> list[str]:
    """``model_type`` of every registered architecture the installed PaddleNLP provides."""
    return [name for name, architecture in ARCHITECTURES.items() if architecture.is_available()]


def get_architecture(model_type: Optional[str]) -> DecoderArchitecture:
    """The architecture of ``model_type``; a ``ValueError`` listing the supported ones otherwise."""
    architecture = ARCHITECTURES.get(model_type)  # type: ignore[arg-type]
    if architecture is None or not architecture.is_available():
        reason = "is not supported" if architecture is None else f"needs a newer paddlenlp than {_paddlenlp_version()}"
        raise ValueError(
            f"model_type {model_type!r} {reason}; supported architectures with this paddlenlp: "
            f"{', '.join(available_architectures())}"
        )
    return architecture


def architecture_of(config: Any) -> DecoderArchitecture:
    """The architecture of a model config (by ``model_type``); see :func:`get_architecture`."""
    return get_architecture(getattr(config, "model_type", None))


def check_architecture(problems: Any, field: str, name_or_path: Optional[str]) -> None:
    """Add a problem to ``problems`` (:class:`alignment.utils.config.Problems`) when the local checkpoint
    ``name_or_path`` is of an unsupported architecture. Reads ``config.json`` only (no weights); a missing
    path or a hub name is left to the other checks."""
    config_file = os.path.join(name_or_path or "", "config.json")
    if not name_or_path or not os.path.isfile(config_file):
        return
    try:
        with open(config_file, encoding="utf-8") as file:
            model_type = json.load(file).get("model_type")
    except (OSError, ValueError) as error:
        problems.add(field, f"{config_file} is not readable JSON ({error})")
        return
    try:
        get_architecture(model_type)
    except ValueError as error:
        problems.add(field, f"{name_or_path}: {error}")

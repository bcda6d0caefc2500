"""Score models (reward / cost / critic) on paddlenlp backbones, and ``AutoModelForScore``.

A score model is a causal-LM backbone without its LM head plus a small ``score_head`` (see
:class:`~alignment.models.score_model_utils.ScoreModelMixin`). The backbone attribute has the same name
as in the causal LM (``llama``, ``qwen``), so a causal-LM checkpoint (e.g. the SFT model) loads into a
score model directly: ``lm_head.weight`` is reported as unused and a fresh score head is created.
Score checkpoints (``save_pretrained``) hold ``score_head.*`` and the normalizer buffers, and their
config records the score options plus ``architectures = ["<Name>ModelForScore"]``.

Every architecture of :mod:`alignment.models.architectures` that the installed PaddleNLP provides gets
its class (``LlamaModelForScore``, ``Qwen2ModelForScore``, ``MistralModelForScore``,
``GemmaModelForScore``, ``QWenModelForScore``) in :data:`MODEL_FOR_SCORE_MAPPING`; adding an
architecture there adds its score model.
"""

from __future__ import annotations

import copy
from typing import Optional

import paddle
from paddlenlp.transformers import AutoConfig, LlamaPretrainedModel, PretrainedConfig, PretrainedModel, QWenPretrainedModel
from paddlenlp.transformers.conversion_utils import StateDictNameMapping, init_name_mappings

from alignment.models.architectures import ARCHITECTURES, DecoderArchitecture, available_architectures
from alignment.models.score_model_utils import ScoreModelMixin

__all__ = ["BackboneScoreModel", "LlamaModelForScore", "QWenModelForScore", "MODEL_FOR_SCORE_MAPPING", "AutoModelForScore"]


def _without_lm_head(mappings: dict) -> dict:
    """Tensor-parallel split/merge actions minus the LM head's (a score model has none; its small
    ``score_head`` is replicated on every tensor-parallel rank, so it needs no action)."""
    return {name: action for name, action in mappings.items() if not name.endswith("lm_head.weight")}


class BackboneScoreModel(ScoreModelMixin):
    """A causal-LM backbone (attribute :attr:`backbone_name`) followed by the score head.

    A subclass also derives from the architecture's ``PretrainedModel`` and sets :attr:`architecture`;
    the backbone is built under the same attribute name as in the causal LM, so causal-LM checkpoints
    load as they are.
    """

    architecture: DecoderArchitecture

    def _build(self, config: PretrainedConfig, **kwargs) -> None:
        """The constructor's body. Each concrete class defines its own ``__init__`` calling this:
        paddlenlp's metaclass runs the weight initialisation only after an ``__init__`` that the
        class itself defines."""
        super().__init__(config)
        setattr(self, self.backbone_name, self.architecture.backbone_class(config))
        self.init_score_head(config, hidden_size=config.hidden_size, **kwargs)

    @property
    def backbone_name(self) -> str:
        return self.architecture.backbone_name

    @property
    def embeddings_name(self) -> str:
        return self.architecture.embeddings_name

    @property
    def backbone(self) -> paddle.nn.Layer:
        return getattr(self, self.backbone_name)

    def get_input_embeddings(self):
        return getattr(self.backbone, self.embeddings_name)

    def set_input_embeddings(self, value) -> None:
        setattr(self.backbone, self.embeddings_name, value)

    @classmethod
    def _get_tensor_parallel_mappings(cls, config: PretrainedConfig, is_split: bool = True) -> dict:
        return _without_lm_head(super()._get_tensor_parallel_mappings(config, is_split=is_split))

    @classmethod
    def _get_name_mappings(cls, config: PretrainedConfig) -> list[StateDictNameMapping]:
        """Hugging Face (torch) names -> ours, for ``from_pretrained(..., convert_from_torch=True)`` of
        safe-rlhf score checkpoints (e.g. PKU-Alignment/beaver-7b-v1.0-reward): ``model.*`` -> backbone,
        ``score_head.weight`` transposed, normalizer buffers as they are; no LM head."""
        if config.architectures is None:  # the parent tests membership in it
            config = copy.copy(config)
            config.architectures = [cls.__name__]
        mappings = [m for m in super()._get_name_mappings(config) if m.source_name != "lm_head.weight"]
        extra = [["score_head.weight", None, "transpose"], ["score_head.bias"]]
        extra += [[f"normalizer.{name}"] for name in ("mean", "var", "count")]
        init_name_mappings(extra)
        return mappings + [StateDictNameMapping(*mapping, index=len(mappings) + i) for i, mapping in enumerate(extra)]

    def forward(
        self,
        input_ids: Optional[paddle.Tensor] = None,
        attention_mask: Optional[paddle.Tensor] = None,
        position_ids: Optional[paddle.Tensor] = None,
        past_key_values=None,
        inputs_embeds: Optional[paddle.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ):
        """Scores of ``input_ids`` [B, L]; see :meth:`ScoreModelMixin.get_score` for the outputs."""
        outputs = self.backbone(
            input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            past_key_values=past_key_values,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        if getattr(self.config, "sequence_parallel", False):
            # The backbone leaves [B*L / mp, E] token shards on each rank; gather them like LlamaLMHead.
            from paddle.distributed.fleet.utils.sequence_parallel_utils import GatherOp

            seq_len = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            hidden_states = GatherOp.apply(hidden_states).reshape([-1, seq_len, self.config.hidden_size])
        return self.get_score(hidden_states, attention_mask, position_ids, return_dict)


class LlamaModelForScore(BackboneScoreModel, LlamaPretrainedModel):
    """Llama backbone (``self.llama``) + ``score_head``: ``forward`` returns per-token and end scores."""

    architecture = ARCHITECTURES["llama"]

    def __init__(self, config: PretrainedConfig, **kwargs) -> None:
        self._build(config, **kwargs)


class QWenModelForScore(BackboneScoreModel, QWenPretrainedModel):
    """QWen (v1) backbone (``self.qwen``) + ``score_head``."""

    architecture = ARCHITECTURES["qwen"]

    def __init__(self, config: PretrainedConfig, **kwargs) -> None:
        self._build(config, **kwargs)


def _score_model_class(architecture: DecoderArchitecture) -> type[PretrainedModel]:
    """``<Prefix>ModelForScore``: :class:`BackboneScoreModel` on the architecture's ``PretrainedModel``."""
    name = f"{architecture.prefix}ModelForScore"
    doc = f"{architecture.prefix} backbone (``self.{architecture.backbone_name}``) + ``score_head``."
    bases = (BackboneScoreModel, architecture.pretrained_model_class)

    def __init__(self, config: PretrainedConfig, **kwargs) -> None:
        self._build(config, **kwargs)

    attrs = {"architecture": architecture, "__init__": __init__, "__doc__": doc, "__module__": __name__}
    return type(name, bases, attrs)


MODEL_FOR_SCORE_MAPPING: dict[str, type[PretrainedModel]] = {"llama": LlamaModelForScore, "qwen": QWenModelForScore}
"""``config.model_type`` -> score-model class, for every available architecture."""
for _model_type in available_architectures():
    if _model_type not in MODEL_FOR_SCORE_MAPPING:
        MODEL_FOR_SCORE_MAPPING[_model_type] = _score_model_class(ARCHITECTURES[_model_type])
        globals()[MODEL_FOR_SCORE_MAPPING[_model_type].__name__] = MODEL_FOR_SCORE_MAPPING[_model_type]
        __all__.append(MODEL_FOR_SCORE_MAPPING[_model_type].__name__)


class AutoModelForScore:
    """Builds the score model matching a config's ``model_type`` (or ``architectures``).

    ``from_pretrained(path, **kwargs)`` loads a causal-LM checkpoint (fresh score head) or a score
    checkpoint; ``kwargs`` are score options (``score_type``, ``do_normalize``, ``normalizer_type``,
    ``normalizer_momentum``, ``score_dim``, ``score_bias``) and paddlenlp ``from_pretrained`` options.
    """

    def __init__(self, *args, **kwargs) -> None:
        raise EnvironmentError(
            "AutoModelForScore is a factory: use AutoModelForScore.from_pretrained(path) or .from_config(config)"
        )

    @staticmethod
    def model_class(config: PretrainedConfig) -> type[PretrainedModel]:
        """The score-model class for ``config`` (by ``model_type``, else by an ``architectures`` entry)."""
        model_type = getattr(config, "model_type", None)
        if model_type in MODEL_FOR_SCORE_MAPPING:
            return MODEL_FOR_SCORE_MAPPING[model_type]
        by_name = {model_class.__name__: model_class for model_class in MODEL_FOR_SCORE_MAPPING.values()}
        for architecture in getattr(config, "architectures", None) or []:
            if architecture in by_name:
                return by_name[architecture]
        raise ValueError(
            f"No score model for model_type {model_type!r} (architectures "
            f"{getattr(config, 'architectures', None)}); supported model types with this paddlenlp: "
            f"{', '.join(MODEL_FOR_SCORE_MAPPING)}"
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, *args, **kwargs) -> PretrainedModel:
        config = kwargs.get("config")
        if not isinstance(config, PretrainedConfig):
            location_kwargs = {
                key: kwargs[key] for key in ("cache_dir", "subfolder", "from_hf_hub", "from_aistudio") if key in kwargs
            }
            config = AutoConfig.from_pretrained(config or pretrained_model_name_or_path, **location_kwargs)
        return cls.model_class(config).from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def from_config(cls, config: PretrainedConfig, **kwargs) -> PretrainedModel:
        return cls.model_class(config).from_config(config, **kwargs)

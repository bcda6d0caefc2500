"""Reward-model training on pairwise preferences: the second stage of RLHF.

    python alignment/rm/run_reward.py config/tiny/rm_argument.json [--field value ...]
    python -m paddle.distributed.launch --nproc_per_node 2 alignment/rm/run_reward.py config/tiny/rm_argument.json
    python -m paddle.distributed.launch alignment/rm/run_reward.py config/llama/rm_argument.json

Arguments are :class:`ModelArgument`, :class:`alignment.data.DataArgument` and
:class:`~alignment.rm.reward_trainer.RewardTrainingArguments` (PaddleNLP ``TrainingArguments`` plus
``loss_type``, ``regularization``, ``eval_before_training``); see docs/reward_model.md. The model is a
score model (:class:`~alignment.models.AutoModelForScore`) built on ``model_name_or_path`` (usually the
SFT model; its LM head is dropped and a fresh score head is added). The final model and tokenizer are
written to ``output_dir`` with ``save_pretrained(safe_serialization=True)``: loadable with
``AutoModelForScore.from_pretrained(output_dir)``, it initialises the PPO reward model and critic.
Metrics go to ``output_dir/metrics.jsonl`` (and VisualDL with ``report_to: visualdl``).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Type

import paddle
from paddlenlp.trainer import set_seed

from alignment.data import DataArgument, PreferenceDataset, import_custom_dataset_modules, load_tokenizer
from alignment.models import AutoModelForScore
from alignment.models.score_model_utils import NORMALIZER_TYPES
from alignment.rm.reward_trainer import RewardTrainer, RewardTrainingArguments
from alignment.data.chat_template import check_chat_template_argument
from alignment.models.hf_convert import resolve_model_arguments
from alignment.utils.config import ConfigError, Problems, parse_arguments, run_entry_point
from alignment.models.architectures import check_architecture
from alignment.utils.env import setup_cpu_runtime
from alignment.utils.metrics import JsonlLoggingCallback
from alignment.utils.signals import exit_after_distributed_run, exit_clearly_on_sigterm
from alignment.utils.stage import (
    build_train_eval_datasets,
    check_data_arguments,
    check_model_paths,
    check_tokenizer_fits,
    check_output_dir,
    check_training_arguments,
    resolve_resume,
    run_stage,
    save_pretrained_final,
    start_metrics_log,
    training_dtype,
)

__all__ = [
    "ScoreStage",
    "REWARD_STAGE",
    "ModelArgument",
    "RewardTrainingArguments",
    "NORMALIZER_CHOICES",
    "check_arguments",
    "build_datasets",
    "load_model",
    "save_final_model",
    "main",
]

logger = logging.getLogger(__name__)

#: ``normalizer_type`` values a user may choose (the identity normalizer is what ``null`` means).
NORMALIZER_CHOICES = ("RunningMeanStd", "ExponentialMovingAverage")
assert set(NORMALIZER_CHOICES) <= set(NORMALIZER_TYPES)


@dataclass
class ModelArgument:
    """Which model to turn into a reward model, and how its scores are normalized during training."""

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Causal LM (usually the SFT model) or score model: a local directory or a PaddleNLP name."},
    )
    tokenizer_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer directory or name; defaults to model_name_or_path."}
    )
    normalize_score_during_training: bool = field(
        default=False,
        metadata={
            "help": "Normalize rewards with running statistics during training (affine: (r - mean) / std). The "
            "statistics are saved in the model config (mean, var) and used wherever the model normalizes."
        },
    )
    normalizer_type: Optional[str] = field(
        default=None,
        metadata={
            "help": "How the normalizer keeps its statistics: RunningMeanStd (exact, all data) or "
            "ExponentialMovingAverage; required with normalize_score_during_training.",
            "choices": list(NORMALIZER_CHOICES),
        },
    )
    normalizer_momentum: Optional[float] = field(
        default=None,
        metadata={"help": "Momentum of ExponentialMovingAverage in [0, 1); null means 0.9. EMA only."},
    )
    use_flash_attention: bool = field(default=False, metadata={"help": "Use FlashAttention (GPU builds only)."})


@dataclass(frozen=True)
class ScoreStage:
    """What distinguishes the score-model stages that share this module: reward model and cost model
    (:mod:`alignment.rm.run_cost`)."""

    name: str  # in logs and messages
    score_type: str  # recorded in the saved config; selects the normalize function
    dataset_class: Type  # a TokenizedDataset of pairs
    trainer_class: Type  # a RewardTrainer
    eval_metrics: tuple  # names metric_for_best_model may use


REWARD_STAGE = ScoreStage(
    "reward model", "reward", PreferenceDataset, RewardTrainer, ("accuracy", "rewards_mean", "rewards_std", "loss")
)


def check_arguments(
    model_args: ModelArgument,
    data_args: DataArgument,
    training_args: RewardTrainingArguments,
    stage: ScoreStage = REWARD_STAGE,
) -> None:
    """Raise one :class:`ConfigError` listing every problem that can be found before loading anything.

    Imports the custom dataset modules first, so that their names resolve. (Pipeline parallelism,
    ``loss_type`` and ``regularization`` are checked when the training arguments are built.)
    """
    import_custom_dataset_modules(data_args.custom_dataset_modules)
    problems = Problems()
    check_training_arguments(problems, training_args)
    check_output_dir(problems, training_args)
    check_model_paths(
        problems,
        model_name_or_path=model_args.model_name_or_path,
        tokenizer_name_or_path=model_args.tokenizer_name_or_path,
    )
    problems.check(bool(model_args.model_name_or_path), "model_name_or_path", "required")
    check_chat_template_argument(problems, data_args.chat_template, data_args.system_prompt)
    check_architecture(problems, "model_name_or_path", model_args.model_name_or_path)
    check_data_arguments(problems, data_args, training_args, example="PKU-SafeRLHF/train:1:data/safe_rlhf/train.jsonl")
    if training_args.metric_for_best_model is not None and training_args.load_best_model_at_end:
        known = stage.eval_metrics
        metric = training_args.metric_for_best_model.removeprefix("eval_")
        problems.check(
            metric in known, "metric_for_best_model", f"{metric!r} is not an evaluation metric; use one of {known}"
        )
    if model_args.normalize_score_during_training:
        problems.check(
            model_args.normalizer_type is not None,
            "normalizer_type",
            f"normalize_score_during_training needs a normalizer_type, one of {list(NORMALIZER_CHOICES)}",
        )
    momentum = model_args.normalizer_momentum
    if momentum is not None:
        problems.check(
            model_args.normalizer_type == "ExponentialMovingAverage",
            "normalizer_momentum",
            f"only ExponentialMovingAverage uses a momentum (normalizer_type is {model_args.normalizer_type!r})",
        )
        problems.check(0.0 <= momentum < 1.0, "normalizer_momentum", f"must be in [0, 1), got {momentum}")
    if model_args.use_flash_attention:
        problems.check(
            paddle.is_compiled_with_cuda(), "use_flash_attention", "needs a GPU build of Paddle; set it to false on CPU"
        )
    problems.raise_if_any()


def build_datasets(
    data_args: DataArgument, tokenizer: Any, seed: int, need_train: bool, need_eval: bool,
    dataset_class: Type = PreferenceDataset,
) -> tuple[Optional[PreferenceDataset], Optional[PreferenceDataset]]:
    """``(train, eval)`` preference datasets; eval from ``eval_datasets`` or split off the train mix.

    Pairs whose two sides are identical after tokenization (e.g. both cut to a ``max_length`` no longer
    than the prompt) are skipped and counted in the log; if every pair is skipped that is a DatasetError.
    """
    dataset_class = functools.partial(dataset_class, chat_template=data_args.chat_template, system_prompt=data_args.system_prompt)
    return build_train_eval_datasets(dataset_class, data_args, tokenizer, seed, need_train, need_eval)


def load_model(
    model_args: ModelArgument, training_args: RewardTrainingArguments, tokenizer: Any, score_type: str = "reward"
) -> Any:
    """The score model to train (``score_type`` reward or cost, score dim 1), in the training dtype."""
    model = AutoModelForScore.from_pretrained(
        model_args.model_name_or_path,
        dtype=training_dtype(training_args),
        use_flash_attention=model_args.use_flash_attention,
        tensor_parallel_degree=training_args.tensor_parallel_degree,
        tensor_parallel_rank=training_args.tensor_parallel_rank,
        score_type=score_type,
        do_normalize=model_args.normalize_score_during_training,
        normalizer_type=model_args.normalizer_type,
        normalizer_momentum=model_args.normalizer_momentum,
    )
    if model.config.score_dim != 1:
        raise ConfigError(
            [f"model_name_or_path: a {score_type} model has score_dim 1, the checkpoint has {model.config.score_dim}"]
        )
    check_tokenizer_fits(model, tokenizer, "tokenizer_name_or_path")
    return model


def save_final_model(trainer: RewardTrainer, output_dir: Optional[str] = None) -> None:
    """``save_pretrained(safe_serialization=True)`` of the whole score model plus the tokenizer.

    The directory loads with ``AutoModelForScore.from_pretrained`` under any parallel layout. The config
    carries the score options and, with score normalization, the normalizer statistics (``mean``,
    ``var``); the weights carry them too (``normalizer.*`` buffers). Collective: call it on every rank.
    """
    output_dir = save_pretrained_final(trainer, output_dir)
    logger.info("Saved the %s model and tokenizer to %s", trainer.model.config.score_type, output_dir)


def main(argv: Optional[Sequence[str]] = None, stage: ScoreStage = REWARD_STAGE) -> dict[str, float]:
    """Train and/or evaluate a reward model (or ``stage``'s score model) with ``argv`` (default ``sys.argv[1:]``).

    Returns the final metrics: ``train_*`` (incl. ``train_loss``, ``train_accuracy``), ``eval_*``
    (``eval_accuracy``, ``eval_rewards_mean``, ``eval_rewards_std``, ``eval_loss``) and, with
    ``eval_before_training``, the same evaluation of the initial model prefixed ``initial_``.
    """
    setup_cpu_runtime()
    model_args, data_args, training_args = parse_arguments(
        (ModelArgument, DataArgument, RewardTrainingArguments), argv, checks=[functools.partial(check_arguments, stage=stage)]
    )
    resume = resolve_resume(training_args)  # before any weights load
    resolve_model_arguments(model_args)  # Hugging Face checkpoints -> converted copies (never written in place)
    exit_clearly_on_sigterm(stage.name, training_args.output_dir)
    training_args.print_config(model_args, "Model")
    training_args.print_config(data_args, "Data")

    tokenizer = load_tokenizer(
        model_args.tokenizer_name_or_path or model_args.model_name_or_path,
        padding_side="right",
        model_max_length=data_args.max_length,
    )
    train_dataset, eval_dataset = build_datasets(
        data_args, tokenizer, seed=training_args.seed, need_train=training_args.do_train, need_eval=training_args.do_eval,
        dataset_class=stage.dataset_class,
    )
    set_seed(training_args.seed)  # the fresh score head: same initial weights for any number of ranks
    model = load_model(model_args, training_args, tokenizer, score_type=stage.score_type)

    start_metrics_log(training_args, resume)
    trainer = stage.trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        tokenizer=tokenizer,
        data_collator=(train_dataset or eval_dataset).get_collator(),
        callbacks=[JsonlLoggingCallback()],
    )
    return run_stage(trainer, training_args, resume, save_final_model)


if __name__ == "__main__":
    run_entry_point(main)
    exit_after_distributed_run()

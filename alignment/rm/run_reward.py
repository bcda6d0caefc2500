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

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import paddle
import paddle.distributed as dist
from paddlenlp.trainer import get_last_checkpoint, set_seed
from paddlenlp.trainer.trainer_utils import ShardingOption
from paddlenlp.transformers.model_utils import unwrap_model

from alignment.data import (
    DataArgument,
    DatasetError,
    PreferenceDataset,
    import_custom_dataset_modules,
    load_tokenizer,
    parse_datasets,
)
from alignment.models import AutoModelForScore
from alignment.models.score_model_utils import NORMALIZER_TYPES
from alignment.rm.reward_trainer import RewardTrainer, RewardTrainingArguments
from alignment.utils.config import ConfigError, Problems, parse_arguments
from alignment.utils.env import configure_cpu_threads, enable_mkl_avx2_on_amd
from alignment.utils.metrics import METRICS_FILE, JsonlLoggingCallback

__all__ = [
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


def check_arguments(
    model_args: ModelArgument, data_args: DataArgument, training_args: RewardTrainingArguments
) -> None:
    """Raise one :class:`ConfigError` listing every problem that can be found before loading anything.

    Custom dataset modules must be imported first, so that their names resolve. (Pipeline parallelism,
    ``loss_type`` and ``regularization`` are checked when the training arguments are built.)
    """
    problems = Problems()
    for name in ("model_name_or_path", "tokenizer_name_or_path"):
        path = getattr(model_args, name)
        if path and _looks_like_local_path(path) and not os.path.isdir(os.path.expanduser(path)):
            problems.add(name, f"no such directory: {path!r} (a hub name has the form 'owner/name')")
    problems.check(bool(model_args.model_name_or_path), "model_name_or_path", "required")
    problems.check(
        training_args.do_train or training_args.do_eval,
        "do_train",
        "nothing to do: set do_train and/or do_eval (or an evaluation_strategy)",
    )
    problems.check(
        not training_args.do_train or bool(data_args.train_datasets),
        "train_datasets",
        "required with do_train (comma-separated name[:proportion[:path]], e.g. "
        "PKU-SafeRLHF/train:1:data/safe_rlhf/train.jsonl)",
    )
    for name in ("train_datasets", "eval_datasets"):
        try:
            parse_datasets(getattr(data_args, name))
        except DatasetError as error:
            problems.add(name, str(error))
    ratio = data_args.eval_split_ratio
    if ratio is not None:
        problems.check(0.0 < ratio < 1.0, "eval_split_ratio", f"must be in (0, 1), got {ratio}")
        problems.check(not data_args.eval_datasets, "eval_split_ratio", "give eval_datasets or eval_split_ratio, not both")
        problems.check(bool(data_args.train_datasets), "eval_split_ratio", "splits train_datasets, which is not set")
    if training_args.do_eval:
        problems.check(
            bool(data_args.eval_datasets) or ratio is not None,
            "eval_datasets",
            "do_eval (or an evaluation_strategy other than 'no') needs eval_datasets or eval_split_ratio",
        )
    if training_args.eval_before_training:
        problems.check(training_args.do_eval, "eval_before_training", "needs do_eval and an evaluation dataset")
    if training_args.metric_for_best_model is not None and training_args.load_best_model_at_end:
        known = ("accuracy", "rewards_mean", "rewards_std", "loss")
        metric = training_args.metric_for_best_model.removeprefix("eval_")
        problems.check(
            metric in known, "metric_for_best_model", f"{metric!r} is not an evaluation metric; use one of {known}"
        )
    problems.check(data_args.max_length >= 2, "max_length", f"must be at least 2 tokens, got {data_args.max_length}")
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


def _looks_like_local_path(name: str) -> bool:
    """True for names that can only be local paths: absolute, ``./``/``../``/``~``, or more than one ``/``
    (hub names are ``owner/name`` or a bare name)."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1


def build_datasets(
    data_args: DataArgument, tokenizer: Any, seed: int, need_train: bool, need_eval: bool
) -> tuple[Optional[PreferenceDataset], Optional[PreferenceDataset]]:
    """``(train, eval)`` preference datasets; eval from ``eval_datasets`` or split off the train mix.

    Pairs whose two sides are identical after tokenization (e.g. both cut to a ``max_length`` no longer
    than the prompt) are skipped and counted in the log; if every pair is skipped that is a DatasetError.
    """

    def load(datasets: str) -> PreferenceDataset:
        return PreferenceDataset(datasets, tokenizer, max_length=data_args.max_length, seed=seed)

    train_dataset = eval_dataset = None
    if need_train or (need_eval and data_args.eval_split_ratio is not None):
        train_dataset = load(data_args.train_datasets)
    if need_eval:
        if data_args.eval_datasets:
            eval_dataset = load(data_args.eval_datasets)
        else:
            train_dataset, eval_dataset = train_dataset.split_train_test(split_ratio=data_args.eval_split_ratio, seed=seed)
    return (train_dataset if need_train else None), eval_dataset


def load_model(model_args: ModelArgument, training_args: RewardTrainingArguments, tokenizer: Any) -> Any:
    """The score model to train (``score_type`` reward, score dim 1), in the training dtype."""
    dtype = "float32"
    if training_args.fp16_opt_level == "O2":  # pure half precision; O1 keeps float32 weights
        dtype = "bfloat16" if training_args.bf16 else "float16" if training_args.fp16 else "float32"
    model = AutoModelForScore.from_pretrained(
        model_args.model_name_or_path,
        dtype=dtype,
        use_flash_attention=model_args.use_flash_attention,
        tensor_parallel_degree=training_args.tensor_parallel_degree,
        tensor_parallel_rank=training_args.tensor_parallel_rank,
        score_type="reward",
        do_normalize=model_args.normalize_score_during_training,
        normalizer_type=model_args.normalizer_type,
        normalizer_momentum=model_args.normalizer_momentum,
    )
    if model.config.score_dim != 1:
        raise ConfigError(
            [f"model_name_or_path: a reward model has score_dim 1, the checkpoint has {model.config.score_dim}"]
        )
    vocab_size = model.config.vocab_size
    if len(tokenizer) > vocab_size:
        raise ConfigError(
            [
                f"tokenizer_name_or_path: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has "
                f"{vocab_size}; use the tokenizer the model was trained with"
            ]
        )
    # The PPO stage reads these from the saved config.
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        model.config.bos_token_id = tokenizer.bos_token_id
    return model


def save_final_model(trainer: RewardTrainer, output_dir: Optional[str] = None) -> None:
    """``save_pretrained(safe_serialization=True)`` of the whole score model plus the tokenizer.

    Tensor-parallel shards are merged, so the directory loads with ``AutoModelForScore.from_pretrained``
    under any parallel layout. The config carries the score options and, with score normalization, the
    normalizer statistics (``mean``, ``var``); the weights carry them too (``normalizer.*`` buffers).
    Collective under tensor parallelism / sharding stage 3: call it on every rank.
    """
    args = trainer.args
    output_dir = output_dir or args.output_dir
    if ShardingOption.FULL_SHARD in args.sharding:
        trainer.model_wrapped.get_all_parameters(convert2cpu=True)
    model = unwrap_model(trainer.model)
    if args.should_save:
        os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(
        output_dir,
        safe_serialization=True,
        merge_tensor_parallel=args.tensor_parallel_degree > 1,
        is_main_process=args.should_save,
    )
    if args.should_save and trainer.tokenizer is not None:
        trainer.tokenizer.save_pretrained(output_dir)
    logger.info("Saved the reward model and tokenizer to %s", output_dir)


def _prepare_output_dir(training_args: RewardTrainingArguments) -> Optional[str]:
    """The checkpoint to resume from, if any; a fresh run starts a fresh metrics.jsonl."""
    resume = training_args.resume_from_checkpoint
    if resume is None and training_args.do_train and os.path.isdir(training_args.output_dir):
        if not training_args.overwrite_output_dir:
            resume = get_last_checkpoint(training_args.output_dir)
            if resume is not None:
                logger.info("Resuming from %s (set overwrite_output_dir to start over)", resume)
    if resume is None and training_args.do_train and training_args.should_save:
        stale = os.path.join(training_args.output_dir, METRICS_FILE)
        if os.path.exists(stale):
            os.remove(stale)
    return resume


def main(argv: Optional[Sequence[str]] = None) -> dict[str, float]:
    """Train and/or evaluate a reward model with ``argv`` (default ``sys.argv[1:]``).

    Returns the final metrics: ``train_*`` (incl. ``train_loss``, ``train_accuracy``), ``eval_*``
    (``eval_accuracy``, ``eval_rewards_mean``, ``eval_rewards_std``, ``eval_loss``) and, with
    ``eval_before_training``, the same evaluation of the initial model prefixed ``initial_``.
    """
    enable_mkl_avx2_on_amd()
    configure_cpu_threads()
    model_args, data_args, training_args = parse_arguments((ModelArgument, DataArgument, RewardTrainingArguments), argv)
    import_custom_dataset_modules(data_args.custom_dataset_modules)
    check_arguments(model_args, data_args, training_args)
    training_args.print_config(model_args, "Model")
    training_args.print_config(data_args, "Data")

    tokenizer = load_tokenizer(
        model_args.tokenizer_name_or_path or model_args.model_name_or_path,
        padding_side="right",
        model_max_length=data_args.max_length,
    )
    train_dataset, eval_dataset = build_datasets(
        data_args, tokenizer, seed=training_args.seed, need_train=training_args.do_train, need_eval=training_args.do_eval
    )
    set_seed(training_args.seed)  # the fresh score head: same initial weights for any number of ranks
    model = load_model(model_args, training_args, tokenizer)

    resume = _prepare_output_dir(training_args)
    trainer = RewardTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        tokenizer=tokenizer,
        data_collator=(train_dataset or eval_dataset).get_collator(),
        callbacks=[JsonlLoggingCallback()],
    )

    metrics: dict[str, float] = {}
    if training_args.do_train:
        if training_args.eval_before_training and resume is None:
            metrics.update({f"initial_{key}": value for key, value in trainer.evaluate().items()})
        result = trainer.train(resume_from_checkpoint=resume)
        metrics.update(result.metrics)
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
        save_final_model(trainer)
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        metrics.update(eval_metrics)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    if training_args.world_size > 1:
        dist.barrier()  # leave together: no rank tears down the process group while rank 0 still writes
    return metrics


if __name__ == "__main__":
    main()

"""What the ``Trainer``-based stages (SFT, reward model) share.

Each stage's ``run_*.py`` keeps its own dataclasses and model-specific checks; the steps that are the
same for both live here: the common argument checks, building train/eval datasets, the training
dtype, preparing the output directory for a fresh or resumed run, saving the final model, and the
train/evaluate sequence of ``main``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import paddle.distributed as dist
from paddlenlp.trainer import TrainingArguments
from paddlenlp.trainer.trainer_utils import ShardingOption
from paddlenlp.transformers.model_utils import unwrap_model

from alignment.data import DataArgument, DatasetError, parse_datasets
from alignment.utils.checkpoint import (
    checkpoint_dirs,
    checkpoint_step,
    find_resume_checkpoint,
    load_json,
    verify_checkpoint,
)
from alignment.utils.config import ConfigError, Problems, looks_like_local_path
from alignment.utils.metrics import METRICS_FILE, truncate_metrics

__all__ = [
    "StageTrainingArguments",
    "check_model_paths",
    "check_cpu_model_flags",
    "check_data_arguments",
    "check_training_arguments",
    "check_output_dir",
    "resolve_resume",
    "start_metrics_log",
    "training_dtype",
    "check_tokenizer_fits",
    "build_train_eval_datasets",
    "prepare_output_dir",
    "save_pretrained_final",
    "run_stage",
]

logger = logging.getLogger(__name__)


@dataclass
class StageTrainingArguments(TrainingArguments):
    """PaddleNLP ``TrainingArguments`` plus the switches every Trainer-based stage has."""

    eval_before_training: bool = field(
        default=False, metadata={"help": "Evaluate once before the first step (logged at step 0) as a baseline."}
    )


def check_model_paths(problems: Problems, **paths: Optional[str]) -> None:
    """A name that can only be a local path (``/x``, ``./x``, ``~/x``, ``a/b/c``) must exist, and a
    local model must not turn on kernels this device cannot run (:func:`check_cpu_model_flags`)."""
    for name, path in paths.items():
        if path and looks_like_local_path(path) and not os.path.isdir(os.path.expanduser(path)):
            problems.add(name, f"no such directory: {path!r} (a hub name has the form 'owner/name')")
    check_cpu_model_flags(problems, **paths)


def check_cpu_model_flags(problems: Problems, **paths: Optional[str]) -> None:
    """On CPU, refuse a local model whose ``config.json`` turns on a GPU-only kernel
    (``use_flash_attention``, ``use_fused_rope``; see :mod:`alignment.models.kernels`) before any
    weights load, naming the argument, the file and the flag."""
    from alignment.models.kernels import cpu_model_flag_problems

    for name, path in paths.items():
        config_file = os.path.join(os.path.expanduser(path), "config.json") if path else ""
        if not config_file or not os.path.isfile(config_file):
            continue
        try:
            with open(config_file, encoding="utf-8") as file:
                config = json.load(file)
        except (OSError, ValueError):
            continue  # unreadable configs are reported by the model loader with their own message
        for flag, reason in cpu_model_flag_problems(config):
            problems.add(name, f"{config_file} sets {flag}=true: {reason}")


def check_data_arguments(problems: Problems, data_args: DataArgument, training_args: Any, example: str) -> None:
    """The dataset checks every stage makes (``example`` illustrates the expected syntax)."""
    problems.check(
        training_args.do_train or training_args.do_eval,
        "do_train",
        "nothing to do: set do_train and/or do_eval (or an evaluation_strategy)",
    )
    problems.check(
        not training_args.do_train or bool(data_args.train_datasets),
        "train_datasets",
        f"required with do_train (comma-separated name[:proportion[:path]], e.g. {example})",
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
    if getattr(training_args, "eval_before_training", False):
        problems.check(training_args.do_eval, "eval_before_training", "needs do_eval and an evaluation dataset")
    problems.check(data_args.max_length >= 2, "max_length", f"must be at least 2 tokens, got {data_args.max_length}")


def training_dtype(training_args: Any) -> str:
    """Weight dtype to load: half precision only for pure-half training (``fp16_opt_level`` O2)."""
    if training_args.fp16_opt_level == "O2":  # O1 keeps float32 weights and autocasts
        return "bfloat16" if training_args.bf16 else "float16" if training_args.fp16 else "float32"
    return "float32"


def check_tokenizer_fits(model: Any, tokenizer: Any, field_name: str) -> None:
    """Refuse a tokenizer with more tokens than the model's vocabulary; record its special ids in the config."""
    vocab_size = model.config.vocab_size
    if len(tokenizer) > vocab_size:
        raise ConfigError(
            [
                f"{field_name}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab_size}; "
                "use the tokenizer the model was trained with"
            ]
        )
    model.config.eos_token_id = tokenizer.eos_token_id  # later stages read these from the saved config
    model.config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        model.config.bos_token_id = tokenizer.bos_token_id


def build_train_eval_datasets(
    dataset_class: type, data_args: DataArgument, tokenizer: Any, seed: int, need_train: bool, need_eval: bool
) -> tuple[Optional[Any], Optional[Any]]:
    """``(train, eval)`` datasets of ``dataset_class``; eval from ``eval_datasets`` or split off the train mix."""

    def load(datasets: str) -> Any:
        return dataset_class(datasets, tokenizer, max_length=data_args.max_length, seed=seed)

    train_dataset = eval_dataset = None
    if need_train or (need_eval and data_args.eval_split_ratio is not None):
        train_dataset = load(data_args.train_datasets)
    if need_eval:
        if data_args.eval_datasets:
            eval_dataset = load(data_args.eval_datasets)
        else:
            train_dataset, eval_dataset = train_dataset.split_train_test(split_ratio=data_args.eval_split_ratio, seed=seed)
    return (train_dataset if need_train else None), eval_dataset


def check_training_arguments(
    problems: Problems, training_args: Any, batch_sizes: bool = True, **learning_rates: Optional[float]
) -> None:
    """Batch sizes and accumulation (with ``batch_sizes``) and learning rates (``learning_rate`` plus any
    named in ``learning_rates``; ``None`` = not set), checked before anything loads."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(training_args, name, None)
        if batch_sizes and value is not None:
            problems.check(value >= 1, name, f"must be a positive integer, got {value}")
    rates = {"learning_rate": training_args.learning_rate, **learning_rates}
    for name, value in rates.items():
        if value is not None:
            problems.check(value >= 0, name, f"must be >= 0, got {value}")


def check_output_dir(problems: Problems, training_args: Any) -> None:
    """An ``output_dir`` that already holds checkpoints needs ``resume_from_checkpoint`` or
    ``overwrite_output_dir``: two runs are never mixed silently."""
    if training_args.resume_from_checkpoint is None and training_args.do_train and not training_args.overwrite_output_dir:
        existing = checkpoint_dirs(training_args.output_dir)
        if existing:
            problems.add(
                "output_dir",
                f"{training_args.output_dir!r} already holds {os.path.basename(existing[-1][1])}; pass "
                "--resume_from_checkpoint auto to continue that run, or --overwrite_output_dir true to start over",
            )


def resolve_resume(training_args: Any) -> Optional[str]:
    """The verified checkpoint to resume from, if any (no file is changed; call before loading weights).

    Resuming is opt-in, because PaddleNLP ``Trainer`` checkpoints hold Paddle's pickle-based
    optimizer/RNG files: ``resume_from_checkpoint`` is a checkpoint directory, or ``auto`` for the
    newest complete one in ``output_dir`` (none at all: a fresh start; all damaged: a
    ``CheckpointError``, see :func:`find_resume_checkpoint`). See also :func:`check_output_dir`.
    """
    problems = Problems()
    check_output_dir(problems, training_args)
    problems.raise_if_any()
    resume = training_args.resume_from_checkpoint
    if resume in ("auto", "true", "True"):
        resume = find_resume_checkpoint(training_args.output_dir) if training_args.do_train else None
        logger.info("resume_from_checkpoint=auto: %s", resume or "no checkpoint yet, starting fresh")
    elif resume is not None:
        verify_checkpoint(resume)
    return resume


def start_metrics_log(training_args: Any, resume: Optional[str]) -> None:
    """A fresh run starts a fresh metrics.jsonl; a resumed one drops the records logged after its
    checkpoint (the interrupted run's later steps are logged again). Main process only."""
    if not (training_args.do_train and training_args.should_save):
        return
    path = os.path.join(training_args.output_dir, METRICS_FILE)
    if resume is None:
        if os.path.exists(path):
            os.remove(path)
        return
    step = checkpoint_step(resume)
    if step is None:
        step = _trainer_state_step(resume)
    if step is not None:
        dropped = truncate_metrics(path, step)
        if dropped:
            logger.info("metrics.jsonl: dropped %d record(s) logged after step %d by the interrupted run", dropped, step)


def _trainer_state_step(checkpoint: str) -> Optional[int]:
    path = os.path.join(checkpoint, "trainer_state.json")
    if not os.path.isfile(path):
        return None
    state = load_json(path)
    state = state.get("state", state)  # the PPO stage nests its counters
    step = state.get("global_step")
    return int(step) if step is not None else None


def prepare_output_dir(training_args: Any) -> Optional[str]:
    """:func:`resolve_resume` then :func:`start_metrics_log`: the checkpoint to resume from, if any."""
    resume = resolve_resume(training_args)
    start_metrics_log(training_args, resume)
    return resume


def save_pretrained_final(trainer: Any, output_dir: Optional[str] = None) -> str:
    """``save_pretrained(safe_serialization=True)`` of the whole model plus the tokenizer.

    Tensor-parallel shards are merged and sharding stage 3 parameters gathered, so the directory
    loads with ``from_pretrained`` under any layout. One writer per file: the main process, plus its
    tensor-parallel peers taking part in the merge. Collective: call it on every rank.
    """
    args = trainer.args
    output_dir = output_dir or args.output_dir
    if ShardingOption.FULL_SHARD in args.sharding:
        trainer.model_wrapped.get_all_parameters(convert2cpu=True)
    model = unwrap_model(trainer.model)
    merge_tp = args.tensor_parallel_degree > 1
    if args.should_save or (merge_tp and args.dataset_rank == 0):
        model.save_pretrained(output_dir, safe_serialization=True, merge_tensor_parallel=merge_tp, is_main_process=args.should_save)
    if args.should_save and trainer.tokenizer is not None:
        trainer.tokenizer.save_pretrained(output_dir)
    return output_dir


def run_stage(trainer: Any, training_args: Any, resume: Optional[str], save_final: Callable[[Any], Any]) -> dict[str, float]:
    """Train (optionally after a baseline evaluation), save the final model, evaluate; return metrics."""
    metrics: dict[str, float] = {}
    if training_args.do_train:
        if training_args.eval_before_training and resume is None:
            initial = {f"initial_{key}": value for key, value in trainer.evaluate().items()}  # logged at step 0
            metrics.update(initial)
            trainer.save_metrics("initial_eval", initial)
        result = trainer.train(resume_from_checkpoint=resume)
        metrics.update(result.metrics)
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
        save_final(trainer)
    if training_args.do_eval:
        eval_metrics = _evaluation_at_current_step(trainer) or trainer.evaluate()
        metrics.update(eval_metrics)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    if training_args.world_size > 1:
        dist.barrier()  # leave together: no rank tears down the process group while rank 0 still writes
    return metrics


def _evaluation_at_current_step(trainer: Any) -> Optional[dict[str, float]]:
    """The evaluation the Trainer already ran at the final step (e.g. the last epoch's), if any."""
    for record in reversed(trainer.state.log_history):
        if record.get("step") != trainer.state.global_step:
            break
        if "eval_loss" in record:
            return {key: value for key, value in record.items() if key.startswith("eval_")}
    return None

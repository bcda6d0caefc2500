"""Direct preference optimisation (DPO and its family) on preference pairs: an alignment stage
without a reward model or an RL loop.

    python alignment/dpo/run_dpo.py config/tiny/dpo_argument.json [--field value ...]
    python -m paddle.distributed.launch --nproc_per_node 2 alignment/dpo/run_dpo.py config/tiny/dpo_argument.json
    python -m paddle.distributed.launch alignment/dpo/run_dpo.py config/llama/dpo_argument.json

Arguments are :class:`ModelArgument` (SFT's, plus ``reference_model_name_or_path``),
:class:`alignment.data.DataArgument` and :class:`~alignment.dpo.dpo_trainer.DPOTrainingArguments`
(PaddleNLP ``TrainingArguments`` plus ``loss_type``, ``beta``, ``label_smoothing``, ``simpo_gamma``,
``reference_free``, ``precompute_reference_log_probs``, ``eval_before_training``); see docs/dpo.md.
The policy starts from ``model_name_or_path`` (usually the SFT model); the reference model is a
frozen copy of ``reference_model_name_or_path`` (default: the same model). The final policy (LoRA
merged, if LoRA was used) and its tokenizer are written to ``output_dir``, loadable with
``AutoModelForCausalLM.from_pretrained(output_dir)``. Metrics go to ``output_dir/metrics.jsonl`` (and
VisualDL with ``report_to: visualdl``).
"""

from __future__ import annotations

import functools
import gc
import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from paddlenlp.peft import LoRAModel
from paddlenlp.transformers.model_utils import unwrap_model

from alignment.data import DataArgument, load_tokenizer
from alignment.dpo.data import DPODataset
from alignment.dpo.dpo_trainer import METRIC_NAMES, DPOTrainer, DPOTrainingArguments, precompute_reference_log_probs
from alignment.models.dpo_model_utils import (
    preference_loss_names,
    preference_loss_uses_label_smoothing,
    preference_loss_uses_reference,
)
from alignment.sft import run_sft
from alignment.models.hf_convert import resolve_model_arguments
from alignment.utils.config import ConfigError, Problems, parse_arguments, run_entry_point
from alignment.utils.env import setup_cpu_runtime
from alignment.utils.metrics import JsonlLoggingCallback
from alignment.utils.signals import exit_after_distributed_run, exit_clearly_on_sigterm
from alignment.utils.stage import (
    build_train_eval_datasets,
    check_model_paths,
    resolve_resume,
    run_stage,
    save_pretrained_final,
    start_metrics_log,
)

__all__ = [
    "ModelArgument",
    "DPOTrainingArguments",
    "check_arguments",
    "build_datasets",
    "load_models",
    "save_final_model",
    "main",
]

logger = logging.getLogger(__name__)


@dataclass
class ModelArgument(run_sft.ModelArgument):
    """The policy to train (and optional LoRA, as in SFT) and its frozen reference."""

    reference_model_name_or_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "Frozen reference policy; defaults to model_name_or_path. Not loaded for reference-free losses "
            "(simpo, orpo) or with reference_free."
        },
    )


def check_arguments(model_args: ModelArgument, data_args: DataArgument, training_args: DPOTrainingArguments) -> None:
    """Raise one :class:`ConfigError` listing every problem that can be found before loading anything.

    SFT's checks apply as they are (they import the custom modules first: datasets, and preference
    losses registered in them; training arguments, output directory, model paths, chat template, LoRA).
    """
    problems = Problems()
    try:
        run_sft.check_arguments(model_args, data_args, training_args)
    except ConfigError as error:
        problems.items.extend(p.replace("SFT supports", "DPO supports") for p in error.problems)
    check_model_paths(problems, reference_model_name_or_path=model_args.reference_model_name_or_path)
    loss_type = training_args.loss_type
    if problems.check(
        loss_type in preference_loss_names(),
        "loss_type",
        f"unknown preference loss {loss_type!r}; registered: {preference_loss_names()}",
    ):
        if training_args.label_smoothing and not preference_loss_uses_label_smoothing(loss_type):
            problems.add("label_smoothing", f"the {loss_type} loss has no label smoothing; set it to 0")
        uses_reference = preference_loss_uses_reference(loss_type)
        if not uses_reference and training_args.reference_free:
            problems.add("reference_free", f"the {loss_type} loss never uses a reference model; leave reference_free false")
        if not training_args.uses_reference_model:
            for name in ("reference_model_name_or_path", "precompute_reference_log_probs"):
                if getattr(model_args, name, None) or getattr(training_args, name, None):
                    problems.add(name, f"unused: loss_type {loss_type!r} runs without a reference model")
    if training_args.metric_for_best_model is not None and training_args.load_best_model_at_end:
        known = ("loss",) + METRIC_NAMES
        metric = training_args.metric_for_best_model.removeprefix("eval_")
        problems.check(metric in known, "metric_for_best_model", f"{metric!r} is not an evaluation metric; use one of {known}")
    problems.raise_if_any()


def build_datasets(
    data_args: DataArgument, tokenizer: Any, seed: int, need_train: bool, need_eval: bool
) -> tuple[Optional[DPODataset], Optional[DPODataset]]:
    """``(train, eval)`` DPO datasets (preference pairs plus response starts); eval from
    ``eval_datasets`` or split off the train mix."""
    dataset_class = functools.partial(DPODataset, chat_template=data_args.chat_template, system_prompt=data_args.system_prompt)
    return build_train_eval_datasets(dataset_class, data_args, tokenizer, seed, need_train, need_eval)


def load_models(model_args: ModelArgument, training_args: DPOTrainingArguments, tokenizer: Any) -> tuple[Any, Optional[Any]]:
    """``(policy, reference)``: the causal LM to train (LoRA-wrapped if asked) and its frozen reference
    (``None`` when the loss runs without one)."""
    policy = run_sft.load_model(model_args, training_args, tokenizer)
    reference = None
    if training_args.uses_reference_model:
        reference_path = model_args.reference_model_name_or_path or model_args.model_name_or_path
        reference_args = ModelArgument(**{**vars(model_args), "model_name_or_path": reference_path})
        reference = run_sft.load_model(reference_args, training_args, tokenizer)
    if model_args.lora:
        policy = run_sft.apply_lora(policy, model_args)
    return policy, reference


def save_final_model(trainer: DPOTrainer, output_dir: Optional[str] = None) -> None:
    """The trained policy as a plain safetensors checkpoint plus the tokenizer, in ``output_dir``.

    As SFT's: LoRA adapters go to ``output_dir/lora_adapter`` and are merged into the weights;
    tensor-parallel shards are merged and sharding stage 3 parameters gathered, so the directory
    loads with ``AutoModelForCausalLM.from_pretrained`` under any layout. Collective.
    """
    if isinstance(unwrap_model(trainer.model), LoRAModel):
        run_sft.save_final_model(trainer, output_dir)
        return
    output_dir = save_pretrained_final(trainer, output_dir)
    logger.info("Saved the DPO policy and tokenizer to %s", output_dir)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, float]:
    """Run DPO with ``argv`` (default ``sys.argv[1:]``); returns the final metrics: ``train_*``,
    ``eval_loss`` and ``eval_<name>`` for :data:`~alignment.dpo.dpo_trainer.METRIC_NAMES` and, with
    ``eval_before_training``, the same evaluation of the initial policy prefixed ``initial_``."""
    setup_cpu_runtime()
    model_args, data_args, training_args = parse_arguments(
        (ModelArgument, DataArgument, DPOTrainingArguments), argv, checks=[check_arguments]
    )
    resume = resolve_resume(training_args)  # before any weights load
    resolve_model_arguments(model_args)  # Hugging Face checkpoints (policy, reference) -> converted copies
    exit_clearly_on_sigterm("dpo", training_args.output_dir)
    training_args.print_config(model_args, "Model")
    training_args.print_config(data_args, "Data")

    tokenizer_field = "tokenizer_name_or_path" if model_args.tokenizer_name_or_path else "model_name_or_path"
    try:
        tokenizer = load_tokenizer(
            getattr(model_args, tokenizer_field), padding_side="right", model_max_length=data_args.max_length
        )
    except ValueError as error:  # e.g. no eos_token
        raise ConfigError([f"{tokenizer_field}: {error}"]) from error
    train_dataset, eval_dataset = build_datasets(
        data_args, tokenizer, seed=training_args.seed, need_train=training_args.do_train, need_eval=training_args.do_eval
    )
    collator = (train_dataset or eval_dataset).get_collator()
    policy, reference = load_models(model_args, training_args, tokenizer)
    start_metrics_log(training_args, resume)

    if reference is not None and training_args.precompute_reference_log_probs:
        shard = dict(
            batch_size=training_args.per_device_eval_batch_size,
            dataset_rank=max(training_args.dataset_rank, 0),
            dataset_world_size=max(training_args.dataset_world_size, 1),
        )
        if train_dataset is not None:
            train_dataset = precompute_reference_log_probs(reference, train_dataset, **shard)
        if eval_dataset is not None:
            eval_dataset = precompute_reference_log_probs(reference, eval_dataset, **shard)
        reference = None  # released: the batches carry its log-probs
        gc.collect()
        logger.info("Precomputed the reference log-probs; the reference model is released")

    trainer = DPOTrainer(
        model=policy,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        tokenizer=tokenizer,
        data_collator=collator,
        callbacks=[JsonlLoggingCallback()],
        reference_model=reference,
    )
    return run_stage(trainer, training_args, resume, save_final_model)


if __name__ == "__main__":
    run_entry_point(main)
    exit_after_distributed_run()

"""Supervised fine-tuning (SFT) of a causal LM on answer tokens: the first stage of RLHF.

    python alignment/sft/run_sft.py config/tiny/sft_argument.json [--field value ...]
    python -m paddle.distributed.launch --nproc_per_node 2 alignment/sft/run_sft.py config/llama/sft_argument.json

Arguments are :class:`ModelArgument`, :class:`alignment.data.DataArgument` and
:class:`SFTTrainingArguments` (PaddleNLP ``TrainingArguments`` plus ``eval_before_training``); see
docs/sft.md. The final model (LoRA merged, if LoRA was used) and its tokenizer are written to
``output_dir``, loadable with ``AutoModelForCausalLM.from_pretrained(output_dir)``: that is the PPO
actor. Metrics go to ``output_dir/metrics.jsonl`` (and VisualDL with ``report_to: visualdl``).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from paddlenlp.peft import LoRAConfig, LoRAModel
from paddlenlp.trainer.trainer_utils import ShardingOption
from paddlenlp.transformers.model_utils import unwrap_model

from alignment.data import (
    DataArgument,
    SupervisedDataset,
    import_custom_dataset_modules,
    load_tokenizer,
)
from alignment.sft.merge_lora import LORA_ADAPTER_DIR, merge_lora_model
from alignment.sft.sft_trainer import SFTTrainer
from alignment.data.chat_template import check_chat_template_argument
from alignment.models.hf_convert import resolve_model_arguments
from alignment.utils.config import ConfigError, Problems, parse_arguments, run_entry_point
from alignment.utils.env import setup_cpu_runtime
from alignment.utils.metrics import JsonlLoggingCallback
from alignment.utils.signals import exit_after_distributed_run, exit_clearly_on_sigterm
from alignment.utils.stage import (
    StageTrainingArguments,
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
    "ModelArgument",
    "SFTTrainingArguments",
    "LLAMA_LORA_TARGET_MODULES",
    "check_arguments",
    "build_datasets",
    "load_model",
    "apply_lora",
    "save_final_model",
    "main",
]

logger = logging.getLogger(__name__)

#: LoRA targets of Llama-style models: every projection of attention and MLP (regex, fullmatch).
LLAMA_LORA_TARGET_MODULES = (
    ".*q_proj.*",
    ".*k_proj.*",
    ".*v_proj.*",
    ".*o_proj.*",
    ".*gate_proj.*",
    ".*up_proj.*",
    ".*down_proj.*",
)


@dataclass
class ModelArgument:
    """Which model to fine-tune, and optional LoRA."""

    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Pretrained causal LM: a local directory or a PaddleNLP model name."}
    )
    tokenizer_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer directory or name; defaults to model_name_or_path."}
    )
    use_flash_attention: bool = field(default=False, metadata={"help": "Use FlashAttention (GPU builds only)."})
    lora: bool = field(
        default=False,
        metadata={"help": "Train LoRA adapters instead of all weights; merged into output_dir at the end."},
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: Optional[int] = field(default=None, metadata={"help": "LoRA alpha (scaling alpha/r); default 2*r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch input."})
    lora_target_modules: Optional[str] = field(
        default=None,
        metadata={
            "help": "Comma-separated regexes (full match) of the Linear layers to adapt; default: every "
            "attention and MLP projection of Llama-style models."
        },
    )


@dataclass
class SFTTrainingArguments(StageTrainingArguments):
    """PaddleNLP ``TrainingArguments`` plus ``eval_before_training``."""


def check_arguments(model_args: ModelArgument, data_args: DataArgument, training_args: SFTTrainingArguments) -> None:
    """Raise one :class:`ConfigError` listing every problem that can be found before loading anything.

    Imports the custom dataset modules first, so that their names resolve.
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
    check_data_arguments(problems, data_args, training_args, example="alpaca:1:data/alpaca/train.jsonl")
    problems.check(
        training_args.pipeline_parallel_degree <= 1,
        "pipeline_parallel_degree",
        "SFT supports data, sharding and tensor parallelism, not pipeline parallelism",
    )
    if model_args.use_flash_attention:
        import paddle

        problems.check(
            paddle.is_compiled_with_cuda(), "use_flash_attention", "needs a GPU build of Paddle; set it to false on CPU"
        )
    if model_args.lora:
        problems.check(model_args.lora_rank >= 1, "lora_rank", f"must be >= 1, got {model_args.lora_rank}")
        problems.check(
            model_args.lora_alpha is None or model_args.lora_alpha > 0,
            "lora_alpha",
            f"must be > 0, got {model_args.lora_alpha}",
        )
        problems.check(
            0.0 <= model_args.lora_dropout < 1.0, "lora_dropout", f"must be in [0, 1), got {model_args.lora_dropout}"
        )
        problems.check(
            training_args.tensor_parallel_degree <= 1,
            "lora",
            "LoRA is supported with data parallel and sharding stage 1/2; the merge step needs whole weights, "
            "so not with tensor_parallel_degree > 1",
        )
        problems.check(
            ShardingOption.FULL_SHARD not in training_args.sharding,
            "lora",
            "LoRA with sharding stage3 is not supported (the merge step needs whole weights)",
        )
    problems.raise_if_any()


def build_datasets(
    data_args: DataArgument, tokenizer: Any, seed: int, need_train: bool, need_eval: bool
) -> tuple[Optional[SupervisedDataset], Optional[SupervisedDataset]]:
    """``(train, eval)`` supervised datasets; eval from ``eval_datasets`` or split off the train mix."""
    dataset_class = functools.partial(SupervisedDataset, chat_template=data_args.chat_template, system_prompt=data_args.system_prompt)
    return build_train_eval_datasets(dataset_class, data_args, tokenizer, seed, need_train, need_eval)


def load_model(model_args: ModelArgument, training_args: SFTTrainingArguments, tokenizer: Any) -> Any:
    """The causal LM to fine-tune, in the training dtype, checked against the tokenizer."""
    from paddlenlp.transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        dtype=training_dtype(training_args),
        use_flash_attention=model_args.use_flash_attention,
        tensor_parallel_degree=training_args.tensor_parallel_degree,
        tensor_parallel_rank=training_args.tensor_parallel_rank,
    )
    check_tokenizer_fits(model, tokenizer, "tokenizer_name_or_path")
    return model


def apply_lora(model: Any, model_args: ModelArgument) -> Any:
    """Wrap ``model`` in a ``paddlenlp.peft.LoRAModel`` whose only trainable weights are the adapters."""
    targets = (
        [pattern.strip() for pattern in model_args.lora_target_modules.split(",") if pattern.strip()]
        if model_args.lora_target_modules
        else list(LLAMA_LORA_TARGET_MODULES)
    )
    config = LoRAConfig(
        target_modules=targets,
        r=model_args.lora_rank,
        lora_alpha=model_args.lora_alpha or 2 * model_args.lora_rank,
        lora_dropout=model_args.lora_dropout,
        merge_weights=False,
        tensor_parallel_degree=model.config.tensor_parallel_degree,
        dtype=getattr(model.config, "dtype", None),
        base_model_name_or_path=_absolute_if_local(model_args.model_name_or_path),  # for merge_lora.py
    )
    lora_model = LoRAModel(model, config)
    adapted = [name for name, _ in lora_model.get_trainable_state_dict().items() if "lora_A" in name]
    if not adapted:
        raise ConfigError(
            [f"lora_target_modules: {targets} match no Linear layer of {type(model).__name__}; name its projections"]
        )
    logger.info("LoRA: %d adapted layers, rank %d, alpha %s", len(adapted), config.r, config.lora_alpha)
    return lora_model


def _absolute_if_local(name_or_path: str) -> str:
    return os.path.abspath(name_or_path) if os.path.isdir(name_or_path) else name_or_path


def main(argv: Optional[Sequence[str]] = None) -> dict[str, float]:
    """Run SFT with ``argv`` (default ``sys.argv[1:]``); returns the final train and eval metrics."""
    setup_cpu_runtime()
    model_args, data_args, training_args = parse_arguments(
        (ModelArgument, DataArgument, SFTTrainingArguments), argv, checks=[check_arguments]
    )
    resume = resolve_resume(training_args)  # before any weights load
    resolve_model_arguments(model_args)  # Hugging Face checkpoints -> converted copies (never written in place)
    exit_clearly_on_sigterm("sft", training_args.output_dir)
    training_args.print_config(model_args, "Model")
    training_args.print_config(data_args, "Data")

    tokenizer_field = "tokenizer_name_or_path" if model_args.tokenizer_name_or_path else "model_name_or_path"
    try:
        tokenizer = load_tokenizer(
            getattr(model_args, tokenizer_field), padding_side="right", model_max_length=data_args.max_length
        )
    except ValueError as error:  # e.g. no eos_token: answers could not be terminated
        raise ConfigError([f"{tokenizer_field}: {error}"]) from error
    train_dataset, eval_dataset = build_datasets(
        data_args,
        tokenizer,
        seed=training_args.seed,
        need_train=training_args.do_train,
        need_eval=training_args.do_eval,
    )
    model = load_model(model_args, training_args, tokenizer)
    if model_args.lora:
        model = apply_lora(model, model_args)

    start_metrics_log(training_args, resume)
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        tokenizer=tokenizer,
        data_collator=(train_dataset or eval_dataset).get_collator(shift=True),
        callbacks=[JsonlLoggingCallback()],
    )
    return run_stage(trainer, training_args, resume, save_final_model)


def save_final_model(trainer: SFTTrainer, output_dir: Optional[str] = None) -> None:
    """The whole causal LM as a plain safetensors checkpoint plus the tokenizer, in ``output_dir``.

    LoRA adapters are saved under ``output_dir/lora_adapter`` (as the Trainer saves them) and merged
    into the weights written to ``output_dir``. Tensor-parallel shards are merged, and sharding stage 3
    parameters gathered, so the directory loads with ``AutoModelForCausalLM.from_pretrained`` under
    any layout: it is the PPO actor. Collective: call it on every rank.
    """
    args = trainer.args
    output_dir = output_dir or args.output_dir
    model = unwrap_model(trainer.model)
    if isinstance(model, LoRAModel):
        trainer.save_model(os.path.join(output_dir, LORA_ADAPTER_DIR))
        if args.should_save:
            merge_lora_model(model, output_dir, tokenizer=trainer.tokenizer)
        return
    save_pretrained_final(trainer, output_dir)
    logger.info("Saved the SFT model and tokenizer to %s", output_dir)

if __name__ == "__main__":
    run_entry_point(main)
    exit_after_distributed_run()

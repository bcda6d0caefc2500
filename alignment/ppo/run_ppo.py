"""RLHF with PPO: ``python -m paddle.distributed.launch alignment/ppo/run_ppo.py ppo_argument.json``.

Four models: the actor and a frozen reference start from the SFT checkpoint
(``actor_model_name_or_path``); the critic and a frozen reward model start from the reward
checkpoint (``reward_critic_model_name_or_path`` for the critic when given). Every field of the
JSON file is one of the dataclass fields below or of PaddleNLP's ``TrainingArguments``; command-line
``--field value`` pairs after the file override it.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from paddlenlp.trainer import TrainingArguments as PaddleTrainingArguments

from alignment.data.arguments import DataArgument as BaseDataArgument
from alignment.utils.config import Problems

__all__ = ["ModelArgument", "DataArgument", "TrainingArguments", "main", "validate_arguments"]

logger = logging.getLogger("alignment.ppo")


@dataclass
class ModelArgument:
    actor_model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "SFT checkpoint: initializes the actor and the frozen reference model."}
    )
    reward_model_name_or_path: Optional[str] = field(default=None, metadata={"help": "Reward model checkpoint (frozen)."})
    reward_critic_model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Critic initialization; defaults to reward_model_name_or_path."}
    )
    use_flash_attention: bool = field(default=False, metadata={"help": "Use flash attention (GPU)."})


@dataclass
class DataArgument(BaseDataArgument):
    ptx_datasets: Optional[str] = field(
        default=None, metadata={"help": "Supervised datasets for the ptx loss (name[:proportion[:path]]); none = no ptx."}
    )


@dataclass
class TrainingArguments(PaddleTrainingArguments):
    # PPO
    kl_coeff: float = field(default=0.02, metadata={"help": "KL penalty coefficient of the per-token reward."})
    clip_range_ratio: float = field(default=0.2, metadata={"help": "PPO ratio clip: (1 - c, 1 + c)."})
    clip_range_score: float = field(default=50.0, metadata={"help": "Reward-model score clipped to [-c, c]."})
    clip_range_value: float = field(default=5.0, metadata={"help": "Value clip around the rollout values."})
    ptx_coeff: float = field(default=0.0, metadata={"help": "Coefficient of the ptx (pretraining-mix) loss."})
    update_iters: int = field(default=1, metadata={"help": "Passes over each rollout batch."})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount."})
    gae_lambda: float = field(default=0.95, metadata={"help": "GAE lambda."})
    loss_mean_type: str = field(
        default="token",
        metadata={"help": "Actor/critic loss mean: over all tokens (PaddleNLP) or per sequence (safe-rlhf).",
                  "choices": ["token", "sequence"]},
    )  # fmt: skip
    clip_mode: str = field(
        default="score",
        metadata={"help": "Clip the RM score before adding it (PaddleNLP) or every per-token reward (safe-rlhf).",
                  "choices": ["score", "total"]},
    )  # fmt: skip
    normalize_reward: bool = field(default=False, metadata={"help": "Normalize rewards with the RM's saved statistics."})
    # critic overrides
    critic_learning_rate: Optional[float] = field(default=None, metadata={"help": "Critic learning rate."})
    critic_weight_decay: Optional[float] = field(default=None, metadata={"help": "Critic weight decay."})
    critic_lr_scheduler_type: Optional[str] = field(default=None, metadata={"help": "Critic LR scheduler."})
    critic_warmup_ratio: Optional[float] = field(default=None, metadata={"help": "Critic warmup ratio."})
    critic_recompute: Optional[bool] = field(default=None, metadata={"help": "Critic activation recompute."})
    # rollout
    per_device_prompt_batch_size: int = field(default=16, metadata={"help": "Prompts per device per rollout."})
    per_device_experience_batch_size: Optional[int] = field(
        default=None, metadata={"help": "Rows per forward pass when scoring a rollout (default: the whole rollout)."}
    )
    num_return_sequences: int = field(default=1, metadata={"help": "Samples generated per prompt."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (0 = greedy)."})
    top_p: float = field(default=0.8, metadata={"help": "Nucleus sampling threshold."})
    top_k: int = field(default=0, metadata={"help": "Top-k filtering (0 = off)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Repetition penalty of generation."})
    max_new_tokens: Optional[int] = field(
        default=None, metadata={"help": "Generated tokens per response (default: max_length, as upstream)."}
    )
    use_fusemt: bool = field(default=True, metadata={"help": "Fused inference rollout when paddlenlp_ops is installed."})
    rollout_backend: str = field(
        default="auto",
        metadata={"help": "Rollout generation: auto (fused on GPU with paddlenlp_ops, else fast CPU path), "
                          "fast, plain (paddlenlp generate) or fused.", "choices": ["auto", "fast", "plain", "fused"]},
    )  # fmt: skip
    eval_do_sample: bool = field(default=True, metadata={"help": "Sample at evaluation (False: greedy)."})
    # parallel / memory
    eval_mode: Optional[str] = field(
        default=None,
        metadata={"help": "Separate rollout model: '' / 'single' / 'tensor_parallel'.", "choices": [None, "", "single", "tensor_parallel"]},
    )
    offload_level: str = field(
        default="", metadata={"help": "Space-separated: freeze_model, optimizer, train_model."}
    )
    # reliability
    on_nonfinite: str = field(
        default="stop",
        metadata={"help": "On a NaN/inf loss, reward or KL: stop the run or skip the update.", "choices": ["stop", "skip"]},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_mode == "":
            self.eval_mode = None


def _looks_like_local_path(value: str) -> bool:
    """``/x``, ``./x``, ``../x`` and ``~/x`` are local paths; ``org/name`` may be a hub model id."""
    return value.startswith(("/", "./", "../", "~"))


def validate_arguments(model_args: ModelArgument, data_args: DataArgument, args: TrainingArguments, source: str | None = None) -> None:
    """Check the whole configuration before any model loads; report every problem at once."""
    problems = Problems(source)
    problems.check(data_args.train_datasets is not None, "train_datasets", "is required")
    for name in ("actor_model_name_or_path", "reward_model_name_or_path"):
        problems.check(getattr(model_args, name) is not None, name, "is required")
    for name in ("actor_model_name_or_path", "reward_model_name_or_path", "reward_critic_model_name_or_path"):
        value = getattr(model_args, name)
        if value and _looks_like_local_path(value) and not os.path.exists(os.path.expanduser(value)):
            problems.add(name, f"path {value!r} does not exist")
    problems.check(0 < args.top_p <= 1, "top_p", f"must be in (0, 1], got {args.top_p}")
    problems.check(args.temperature >= 0, "temperature", f"must be >= 0, got {args.temperature}")
    problems.check(args.top_k >= 0, "top_k", f"must be >= 0, got {args.top_k}")
    problems.check(args.repetition_penalty > 0, "repetition_penalty", f"must be > 0, got {args.repetition_penalty}")
    problems.check(args.num_return_sequences >= 1, "num_return_sequences", "must be >= 1")
    for name in ("clip_range_ratio", "clip_range_score", "clip_range_value"):
        problems.check(getattr(args, name) > 0, name, f"must be > 0, got {getattr(args, name)}")
    problems.check(args.kl_coeff >= 0, "kl_coeff", f"must be >= 0, got {args.kl_coeff}")
    problems.check(args.ptx_coeff >= 0, "ptx_coeff", f"must be >= 0, got {args.ptx_coeff}")
    problems.check(0 <= args.gamma <= 1, "gamma", f"must be in [0, 1], got {args.gamma}")
    problems.check(0 <= args.gae_lambda <= 1, "gae_lambda", f"must be in [0, 1], got {args.gae_lambda}")
    problems.check(args.update_iters >= 1, "update_iters", "must be >= 1")
    problems.check(data_args.max_length > 0, "max_length", "must be > 0")
    if args.max_new_tokens is not None:
        problems.check(args.max_new_tokens > 0, "max_new_tokens", "must be > 0")
    for name in ("per_device_prompt_batch_size", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        problems.check(getattr(args, name) >= 1, name, "must be >= 1")
    rows = args.per_device_prompt_batch_size * args.num_return_sequences
    if args.per_device_train_batch_size >= 1 and problems.check(
        rows % args.per_device_train_batch_size == 0,
        "per_device_train_batch_size",
        f"must divide per_device_prompt_batch_size x num_return_sequences = {rows}",
    ):
        micro_batches = args.update_iters * rows // args.per_device_train_batch_size
        problems.check(
            args.gradient_accumulation_steps >= 1 and micro_batches % args.gradient_accumulation_steps == 0,
            "gradient_accumulation_steps",
            f"must divide the {micro_batches} micro-batches of one rollout (update_iters x rows / per_device_train_batch_size) "
            "so that every rollout ends on an optimizer step",
        )
    levels = set(args.offload_level.split())
    unknown = levels - {"freeze_model", "optimizer", "train_model"}
    problems.check(not unknown, "offload_level", f"unknown value(s) {sorted(unknown)}; use freeze_model, optimizer, train_model")
    if args.ptx_coeff > 0 and not data_args.ptx_datasets:
        problems.add("ptx_coeff", "is > 0 but no ptx_datasets are given")
    if data_args.ptx_datasets and args.ptx_coeff == 0:
        logger.warning("ptx_datasets is set but ptx_coeff = 0: the ptx loss is computed with weight 0")
    if args.do_eval and not (data_args.eval_datasets or data_args.eval_split_ratio):
        problems.add("do_eval", "needs eval_datasets or eval_split_ratio")
    if data_args.eval_split_ratio is not None:
        problems.check(0 < data_args.eval_split_ratio < 1, "eval_split_ratio", "must be in (0, 1)")
    world = max(args.world_size, 1)
    model_parallel = args.tensor_parallel_degree * args.pipeline_parallel_degree
    problems.check(
        world % model_parallel == 0,
        "tensor_parallel_degree",
        f"tensor_parallel_degree x pipeline_parallel_degree = {model_parallel} must divide the world size {world}",
    )
    problems.raise_if_any()


def check_model_compatibility(model_args: ModelArgument, data_args: DataArgument, args: TrainingArguments, tokenizer: Any, source: str | None = None) -> None:
    """Config-level checks (no weights loaded): vocab sizes and position budget."""
    from paddlenlp.transformers import AutoConfig

    problems = Problems(source)
    actor_config = AutoConfig.from_pretrained(model_args.actor_model_name_or_path)
    problems.check(
        len(tokenizer) <= actor_config.vocab_size,
        "actor_model_name_or_path",
        f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {actor_config.vocab_size}",
    )
    positions = getattr(actor_config, "max_position_embeddings", None)
    total = data_args.max_length + (args.max_new_tokens or data_args.max_length)
    if positions:
        problems.check(
            total <= positions,
            "max_new_tokens",
            f"max_length ({data_args.max_length}) + max_new_tokens ({args.max_new_tokens or data_args.max_length}) = {total} "
            f"exceeds the actor's max_position_embeddings {positions}",
        )
    problems.raise_if_any()


def load_models(model_args: ModelArgument, args: TrainingArguments) -> dict[str, Any]:
    """Actor, reference, reward and critic models (each with the training TP layout)."""
    from paddlenlp.transformers import AutoModelForCausalLM

    from alignment.models import AutoModelForScore

    if args.fp16_opt_level == "O2" and (args.bf16 or args.fp16):
        dtype = "bfloat16" if args.bf16 else "float16"
    else:
        dtype = "float32"
    common = dict(
        dtype=dtype,
        tensor_parallel_degree=args.tensor_parallel_degree,
        tensor_parallel_rank=args.tensor_parallel_rank,
        use_flash_attention=model_args.use_flash_attention,
    )
    actor = AutoModelForCausalLM.from_pretrained(model_args.actor_model_name_or_path, tensor_parallel_output=False, **common)
    reference = AutoModelForCausalLM.from_pretrained(model_args.actor_model_name_or_path, tensor_parallel_output=False, **common)
    reward = AutoModelForScore.from_pretrained(
        model_args.reward_model_name_or_path, score_type="reward", do_normalize=args.normalize_reward, **common
    )
    critic = AutoModelForScore.from_pretrained(
        model_args.reward_critic_model_name_or_path or model_args.reward_model_name_or_path,
        score_type="critic",
        do_normalize=False,
        **common,
    )
    return {"actor": actor, "reference": reference, "reward": reward, "critic": critic}


def load_datasets(data_args: DataArgument, args: TrainingArguments, tokenizer: Any) -> dict[str, Any]:
    from alignment.data import PromptOnlyDataset, SupervisedDataset, import_custom_dataset_modules

    import_custom_dataset_modules(data_args.custom_dataset_modules)
    train = PromptOnlyDataset(data_args.train_datasets, tokenizer, max_length=data_args.max_length, seed=args.seed)
    evaluation = None
    if data_args.eval_datasets:
        evaluation = PromptOnlyDataset(data_args.eval_datasets, tokenizer, max_length=data_args.max_length, seed=args.seed)
    elif data_args.eval_split_ratio:
        train, evaluation = train.split_train_test(split_ratio=data_args.eval_split_ratio, seed=args.seed)
    ptx = None
    if data_args.ptx_datasets:
        ptx_length = data_args.max_length + (args.max_new_tokens or data_args.max_length)
        ptx = SupervisedDataset(data_args.ptx_datasets, tokenizer, max_length=ptx_length, seed=args.seed)
    return {"train": train, "eval": evaluation, "ptx": ptx}


def build_trainer(model_args: ModelArgument, data_args: DataArgument, args: TrainingArguments, source: str | None = None):
    """Everything ``main`` does before ``train()``: tokenizers, models, datasets, the trainer."""
    from alignment.data import is_same_tokenizer, load_tokenizer
    from alignment.ppo.ppo_trainer import PPOTrainer
    from alignment.ppo.rl_trainer import RolloutSettings
    from alignment.ppo.trainer_utils import StepTrainer, derive_args

    max_new_tokens = args.max_new_tokens or data_args.max_length
    tokenizer = load_tokenizer(model_args.actor_model_name_or_path, padding_side="left", model_max_length=data_args.max_length + max_new_tokens)
    check_model_compatibility(model_args, data_args, args, tokenizer, source)
    reward_tokenizer = load_tokenizer(model_args.reward_model_name_or_path, padding_side="right")
    if is_same_tokenizer(tokenizer, reward_tokenizer):
        reward_tokenizer = tokenizer
    critic_path = model_args.reward_critic_model_name_or_path
    if critic_path and not is_same_tokenizer(tokenizer, load_tokenizer(critic_path)):
        raise ValueError(
            f"reward_critic_model_name_or_path: the critic's tokenizer ({critic_path}) must equal the actor's: "
            "values are computed on the actor's tokens"
        )

    datasets = load_datasets(data_args, args, tokenizer)
    models = load_models(model_args, args)
    actor_trainer = StepTrainer(models["actor"], args, name="actor", tokenizer=tokenizer)
    critic_args = derive_args(
        args,
        learning_rate=args.critic_learning_rate,
        weight_decay=args.critic_weight_decay,
        lr_scheduler_type=args.critic_lr_scheduler_type,
        warmup_ratio=args.critic_warmup_ratio,
        recompute=args.critic_recompute,
    )
    critic_trainer = StepTrainer(models["critic"], critic_args, name="critic", tokenizer=tokenizer)
    backend = args.rollout_backend
    if backend == "auto" and not args.use_fusemt:
        backend = "fast"  # use_fusemt=false keeps its upstream meaning: no fused GPU inference
    rollout = RolloutSettings(
        max_new_tokens=max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        num_return_sequences=args.num_return_sequences,
        do_sample=args.temperature > 0,
        backend=backend,
    )
    return PPOTrainer(
        args,
        actor_trainer,
        critic_trainer,
        reference_model=models["reference"],
        reward_model=models["reward"],
        tokenizer=tokenizer,
        reward_tokenizer=reward_tokenizer,
        train_dataset=datasets["train"],
        rollout=rollout,
        eval_dataset=datasets["eval"],
        ptx_dataset=datasets["ptx"],
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, train, evaluate, save ``output_dir/{policy,value}``; returns final metrics."""
    from alignment.utils.config import parse_arguments
    from alignment.utils.env import configure_cpu_threads, enable_mkl_avx2_on_amd
    from alignment.utils.checkpoint import get_last_checkpoint

    argv = list(sys.argv[1:] if argv is None else argv)
    source = argv[0] if argv and not argv[0].startswith("--") else None
    model_args, data_args, args = parse_arguments((ModelArgument, DataArgument, TrainingArguments), argv)
    validate_arguments(model_args, data_args, args, source)
    enable_mkl_avx2_on_amd()
    configure_cpu_threads()
    _configure_logging()

    trainer = build_trainer(model_args, data_args, args, source)
    resume = args.resume_from_checkpoint
    if resume in (True, "true", "True", "auto"):
        resume = get_last_checkpoint(args.output_dir)
        logger.info("resume_from_checkpoint: %s", resume or "no checkpoint found, starting fresh")
    metrics: dict[str, Any] = {}
    if args.do_train:
        trainer.train(resume_from_checkpoint=resume)
        trainer.save_final_models()
    if args.do_eval and trainer.eval_dataset is not None:
        if trainer.last_evaluation and trainer.last_evaluation[0] == trainer.state.global_step:
            metrics = trainer.last_evaluation[1]  # the loop just evaluated this very policy
        else:
            metrics = trainer.evaluate()
            trainer.log_metrics(metrics)
    trainer.metrics_logger.close()
    return {"state": trainer.state.to_dict(), **metrics}


def _configure_logging() -> None:
    logging.basicConfig(format="[%(asctime)s] [%(levelname)s] %(name)s - %(message)s", level=logging.INFO)
    logging.getLogger("alignment").setLevel(logging.INFO)


if __name__ == "__main__":
    main()

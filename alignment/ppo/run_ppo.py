"""RLHF with PPO: ``python -m paddle.distributed.launch alignment/ppo/run_ppo.py ppo_argument.json``.

Four models: the actor and a frozen reference start from the SFT checkpoint
(``actor_model_name_or_path``); the critic and a frozen reward model start from the reward
checkpoint (``reward_critic_model_name_or_path`` for the critic when given). ``rl_algorithm`` other
than ``ppo`` (GRPO, RLOO, REINFORCE++; docs/critic_free.md) loads no critic, and its reward may come
from ``reward_functions`` / ``reward_server`` instead of (or added to) a reward model. Every field of the
JSON file is one of the dataclass fields below or of PaddleNLP's ``TrainingArguments``; command-line
``--field value`` pairs after the file override it.

Parallel layouts (see docs/distributed.md): data parallel and ``sharding: stage1`` for the actor/critic
optimizers, ``tensor_parallel_degree`` for all four models, ``pipeline_parallel_degree`` for the actor and
critic (loss inside the pipeline; needs ``eval_mode``: the rollout and experience run on non-pipeline copies
that receive the training weights before every rollout).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from paddlenlp.trainer import TrainingArguments as PaddleTrainingArguments

from alignment.data.arguments import DataArgument as BaseDataArgument
from alignment.models.architectures import check_architecture
from alignment.ppo.ppo_lag_trainer import PPOLagArguments, PPOLagModelArgument, ppo_lag_problems
from alignment.utils.config import Problems, looks_like_local_path
from alignment.utils.stage import check_cpu_model_flags

__all__ = [
    "ModelArgument",
    "DataArgument",
    "TrainingArguments",
    "main",
    "validate_arguments",
    "parallel_layout_problems",
    "load_models",
    "critic_training_arguments",
    "report_to_problems",
]

logger = logging.getLogger("alignment.ppo")


#: ``rl_algorithm`` values: ``ppo`` trains a critic; the others are critic-free advantage estimators
#: (``alignment.models.ppo_model_utils.get_advantage_estimator``).
RL_ALGORITHMS = ("ppo", "ppo_lag", "grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")
CRITIC_FREE_ALGORITHMS = ("grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")
#: Algorithms whose baseline is the other samples of the prompt: a group of one has none.
GROUP_ALGORITHMS = ("grpo", "rloo")


def uses_critic(args: Any) -> bool:
    """True when ``rl_algorithm`` trains a reward critic."""
    return getattr(args, "rl_algorithm", "ppo") not in CRITIC_FREE_ALGORITHMS


@dataclass
class ModelArgument(PPOLagModelArgument):
    actor_model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "SFT checkpoint: initializes the actor and the frozen reference model."}
    )
    reward_model_name_or_path: Optional[str] = field(default=None, metadata={"help": "Reward model checkpoint (frozen)."})
    reward_critic_model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Critic initialization; defaults to reward_model_name_or_path."}
    )
    use_flash_attention: bool = field(default=False, metadata={"help": "Use flash attention (GPU)."})
    reward_functions: Optional[str] = field(
        default=None,
        metadata={"help": "Rule-based rewards 'name[:weight],...' of registered reward functions (e.g. 'task_score:1.0,length:0.1'); "
                          "added to the reward model's score when both are given (alignment/rewards/functions.py)."},
    )  # fmt: skip
    reward_server: Optional[str] = field(
        default=None,
        metadata={"help": "URL of a remote reward service the rollouts are POSTed to (e.g. http://127.0.0.1:8000/rewards, "
                          "see docs/rewards.md); its reward is added to the others."},
    )  # fmt: skip
    reward_server_timeout: float = field(
        default=60.0, metadata={"help": "Seconds one reward_server request may take (connect to last byte)."}
    )
    reward_server_max_retries: int = field(
        default=3, metadata={"help": "Retries of a reward_server request after a connection error, timeout or HTTP 5xx (backoff 1, 2, 4.. s)."}
    )
    reward_server_batch_size: int = field(default=128, metadata={"help": "Responses per reward_server request."})
    custom_reward_modules: Optional[str] = field(
        default=None, metadata={"help": "Comma-separated modules or .py files registering reward functions to import."}
    )
    critic_fresh_score_head: bool = field(
        default=False,
        metadata={
            "help": "Allow reward_critic_model_name_or_path to be a plain causal LM: the critic then starts from a "
            "freshly initialised score head (on purpose). Without it a critic checkpoint must hold a trained score head."
        },
    )


@dataclass
class DataArgument(BaseDataArgument):
    ptx_datasets: Optional[str] = field(
        default=None, metadata={"help": "Supervised datasets for the ptx loss (name[:proportion[:path]]); none = no ptx."}
    )


@dataclass
class TrainingArguments(PPOLagArguments, PaddleTrainingArguments):
    # algorithm
    rl_algorithm: str = field(
        default="ppo",
        metadata={"help": "ppo (actor + critic, GAE) or a critic-free estimator: grpo, rloo, reinforce_plus_plus, "
                          "reinforce_plus_plus_baseline.", "choices": list(RL_ALGORITHMS)},
    )  # fmt: skip
    # PPO
    kl_coeff: float = field(default=0.02, metadata={"help": "KL penalty coefficient of the per-token reward."})
    kl_loss_coeff: float = field(default=0.0, metadata={"help": "Coefficient of the KL term added to the actor loss."})
    kl_estimator: Optional[str] = field(
        default=None,
        metadata={"help": "KL estimator of the loss term: k1, k2 or k3 (default k3, GRPO's).", "choices": [None, "k1", "k2", "k3"]},
    )
    entropy_coeff: float = field(default=0.0, metadata={"help": "Entropy bonus: the actor loss subtracts coeff x entropy."})
    clip_range_ratio: float = field(default=0.2, metadata={"help": "PPO ratio clip: (1 - c, 1 + c)."})
    clip_range_ratio_low: Optional[float] = field(
        default=None, metadata={"help": "Lower ratio clip: 1 - low (default clip_range_ratio)."}
    )
    clip_range_ratio_high: Optional[float] = field(
        default=None, metadata={"help": "Upper ratio clip: 1 + high (default clip_range_ratio; DAPO's clip-higher)."}
    )
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
    critic_warmup_ratio: Optional[float] = field(
        default=None, metadata={"help": "Critic warmup ratio; when set it wins over the actor's warmup_steps."}
    )
    critic_warmup_steps: Optional[int] = field(
        default=None, metadata={"help": "Critic warmup steps; wins over every other warmup setting of the critic."}
    )
    critic_recompute: Optional[bool] = field(default=None, metadata={"help": "Critic activation recompute."})
    # rollout
    per_device_prompt_batch_size: int = field(default=16, metadata={"help": "Prompts per device per rollout."})
    per_device_experience_batch_size: Optional[int] = field(
        default=None, metadata={"help": "Rows per forward pass when scoring a rollout (default: the whole rollout)."}
    )
    num_return_sequences: int = field(default=1, metadata={"help": "Samples generated per prompt (a GRPO/RLOO group)."})
    rollout_n: Optional[int] = field(default=None, metadata={"help": "Upstream alias of num_return_sequences."})
    rollout_seed_per_prompt: bool = field(
        default=False,
        metadata={"help": "Seed each prompt's sampling from (seed, step, prompt index) and generate prompt by prompt: "
                          "rollouts independent of the number of data-parallel ranks (slower generation)."},
    )  # fmt: skip
    rollout_log_probs: bool = field(
        default=False,
        metadata={"help": "Use the rollout decoder's own log-probs of the generated tokens as old_log_probs instead of "
                          "an actor forward pass in the experience phase (fast CPU decoder only; equal up to float "
                          "rounding, logged as train/rollout_ratio_deviation)."},
    )  # fmt: skip
    advantage_epsilon: float = field(default=1e-6, metadata={"help": "GRPO: (s - mean) / (std + epsilon)."})
    norm_adv_by_std: bool = field(default=True, metadata={"help": "GRPO: divide by the group std (False: Dr. GRPO)."})
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
        metadata={"help": "Separate non-pipeline rollout models fed with the training weights before every rollout: "
                          "'single' (not tensor parallel) or 'tensor_parallel' (the training TP degree); "
                          "required with pipeline parallel.", "choices": [None, "", "single", "tensor_parallel"]},
    )  # fmt: skip
    offload_level: str = field(
        default="", metadata={"help": "Space-separated: freeze_model, optimizer, train_model."}
    )
    # reliability
    on_nonfinite: str = field(
        default="stop",
        metadata={"help": "On a NaN/inf loss, reward or KL: stop the run or skip the update.", "choices": ["stop", "skip"]},
    )

    def __post_init__(self) -> None:
        # Checked before paddlenlp's __post_init__, which initialises fleet with these degrees.
        import paddle.distributed as dist

        problems = Problems()
        for name, message in parallel_layout_problems(
            self.tensor_parallel_degree, self.pipeline_parallel_degree, self.sharding, self.sharding_parallel_degree,
            dist.get_world_size(),
        ):  # fmt: skip
            problems.add(name, message)
        if self.rollout_n is not None:  # the upstream alias of num_return_sequences
            if self.num_return_sequences not in (1, self.rollout_n):
                problems.add("rollout_n", f"is an alias of num_return_sequences: got both ({self.rollout_n} and {self.num_return_sequences})")
            else:
                self.num_return_sequences = self.rollout_n
        problems.raise_if_any()
        from alignment.parallel.topology import gloo_safe_group_creation

        # On CPU, fleet's groups of 4+ processes need their own rendezvous stores (a no-op elsewhere).
        with gloo_safe_group_creation() if dist.get_world_size() > 1 else contextlib.nullcontext():
            super().__post_init__()
        if self.eval_mode == "":
            self.eval_mode = None


def _degree(value: Optional[int]) -> int:
    """paddlenlp marks an unset parallel degree with -1 (or 0): that is degree 1."""
    return max(int(value or 1), 1)


def parallel_layout_problems(
    tensor_parallel_degree: int, pipeline_parallel_degree: int, sharding: Any, sharding_parallel_degree: int, world_size: int
) -> list[tuple[str, str]]:
    """``(argument, message)`` for every parallel layout the launched world cannot run.

    The degrees multiply to the world size: ``world = data x sharding x tensor x pipeline``, data parallel
    taking what is left (``sharding_parallel_degree`` -1 with ``sharding`` set = all of it, as paddlenlp).
    """
    import paddle

    problems = []
    tp, pp = _degree(tensor_parallel_degree), _degree(pipeline_parallel_degree)
    stages = sharding.split() if isinstance(sharding, str) else [str(getattr(o, "value", o)) for o in sharding or []]
    degree = _degree(sharding_parallel_degree) if stages else 1
    model_parallel = tp * pp * degree
    if world_size % model_parallel:
        problems.append((
            "tensor_parallel_degree",
            f"tensor_parallel_degree ({tp}) x pipeline_parallel_degree ({pp}) x sharding_parallel_degree ({degree}) = "
            f"{model_parallel} must divide the number of processes ({world_size}: --nproc_per_node x --nnodes); "
            "data parallel takes the remaining factor",
        ))  # fmt: skip
    if _degree(sharding_parallel_degree) > 1 and not stages:
        problems.append(("sharding_parallel_degree", "needs sharding (e.g. 'stage1') to be set"))
    if "stage3" in stages:
        problems.append(("sharding", "stage3 is not supported: rollout generation needs the full actor weights on every rank"))
    if "stage2" in stages and paddle.get_device().startswith("cpu"):
        problems.append(("sharding", "stage2 runs on GPU/XPU only (Paddle's group_sharded_parallel); use stage1 on CPU"))
    if pp > 1 and ("stage2" in stages or "stage3" in stages):
        problems.append(("sharding", "pipeline parallel works with sharding stage1 only"))
    return problems


MODEL_PATHS = (
    "actor_model_name_or_path", "reward_model_name_or_path", "reward_critic_model_name_or_path",
    "cost_model_name_or_path", "cost_critic_model_name_or_path",
)  # fmt: skip

# TrainingArguments fields PaddleNLP's Trainer acts on but the PPO loop does not: (field, refused when, why).
UNSUPPORTED_TRAINING_ARGUMENTS = (
    ("load_best_model_at_end", lambda v: bool(v),
     "is not supported by the PPO loop (it tracks no best model); leave it false and pick a checkpoint-<step>"),
    ("metric_for_best_model", lambda v: v is not None,
     "is not supported by the PPO loop: save_total_limit keeps the newest checkpoints, not the best one"),
    ("unified_checkpoint", lambda v: bool(v),
     "is not supported by the PPO loop: it writes its own checkpoints (save_pretrained safetensors in the "
     "TP=1 layout + per-rank optimizer states); set it false"),
    ("pipeline_parallel_config", lambda v: bool(set((v or "").split()) - {"disable_p2p_cache_shape"}),
     "only 'disable_p2p_cache_shape' is accepted (the PPO pipeline engine always sends shapes, so it is "
     "what it does anyway); the other paddlenlp pipeline options do not apply to it"),
)  # fmt: skip

def report_to_problems(report_to: Any) -> list[str]:
    """Messages for ``report_to`` entries the PPO loop cannot honour (unknown, or library not installed)."""
    from alignment.ppo.trainer_utils import REPORT_INTEGRATIONS, integration_available

    problems = []
    for name in report_to or []:
        if name not in REPORT_INTEGRATIONS:
            problems.append(f"{name!r} is not supported by the PPO loop; use any of {sorted(REPORT_INTEGRATIONS)} or 'none'")
        elif not integration_available(name):
            problems.append(f"{name!r} is not installed ({REPORT_INTEGRATIONS[name]}); install it or drop it from report_to")
    return problems


def critic_training_arguments(args: "TrainingArguments") -> Any:
    """The critic's ``TrainingArguments``: the actor's with each ``critic_*`` override that is set.

    Warmup precedence (explicit, unlike a plain copy where the actor's ``warmup_steps > 0`` would
    silently beat ``critic_warmup_ratio``): ``critic_warmup_steps`` if set; else ``critic_warmup_ratio``
    if set (the critic's ``warmup_steps`` becomes 0 so the ratio applies); else the actor's
    ``warmup_steps`` / ``warmup_ratio`` with PaddleNLP's rule (``warmup_steps > 0`` wins).
    """
    from alignment.ppo.trainer_utils import derive_args

    warmup_steps = args.critic_warmup_steps
    if warmup_steps is None and args.critic_warmup_ratio is not None:
        warmup_steps = 0
    return derive_args(
        args,
        learning_rate=args.critic_learning_rate,
        weight_decay=args.critic_weight_decay,
        lr_scheduler_type=args.critic_lr_scheduler_type,
        warmup_ratio=args.critic_warmup_ratio,
        warmup_steps=warmup_steps,
        recompute=args.critic_recompute,
    )


def validate_arguments(model_args: ModelArgument, data_args: DataArgument, args: TrainingArguments, source: str | None = None) -> None:
    """Check the whole configuration before any model loads; report every problem at once."""
    problems = Problems(source)
    problems.check(data_args.train_datasets is not None, "train_datasets", "is required")
    from alignment.data.chat_template import check_chat_template_argument

    check_chat_template_argument(problems, data_args.chat_template, data_args.system_prompt)
    problems.check(model_args.actor_model_name_or_path is not None, "actor_model_name_or_path", "is required")
    for name in ("actor_model_name_or_path", "reward_model_name_or_path", "reward_critic_model_name_or_path"):
        check_architecture(problems, name, getattr(model_args, name))  # config.json only
    has_text_reward = bool(model_args.reward_functions or model_args.reward_server)
    if uses_critic(args):
        problems.check(
            model_args.reward_model_name_or_path is not None or (has_text_reward and model_args.reward_critic_model_name_or_path),
            "reward_model_name_or_path",
            "is required (or reward_functions/reward_server with reward_critic_model_name_or_path to initialise the critic)",
        )
    else:
        problems.check(
            model_args.reward_model_name_or_path is not None or has_text_reward,
            "reward_functions",
            f"rl_algorithm {args.rl_algorithm!r} needs a reward: reward_functions, reward_server and/or reward_model_name_or_path",
        )
        critic_only = {
            "reward_critic_model_name_or_path": model_args.reward_critic_model_name_or_path is not None,
            "critic_fresh_score_head": model_args.critic_fresh_score_head,
            **{name: getattr(args, name) is not None for name in (
                "critic_learning_rate", "critic_weight_decay", "critic_lr_scheduler_type", "critic_warmup_ratio",
                "critic_warmup_steps", "critic_recompute")},
            "clip_range_value": args.clip_range_value != 5.0,
            "gae_lambda": args.gae_lambda != 0.95,
        }  # fmt: skip
        for name, given in critic_only.items():
            if given:
                problems.add(name, f"is a critic argument, but rl_algorithm {args.rl_algorithm!r} trains no critic; remove it")
        if args.rl_algorithm in GROUP_ALGORITHMS:
            problems.check(
                args.num_return_sequences >= 2,
                "num_return_sequences",
                f"rl_algorithm {args.rl_algorithm!r} compares the samples of one prompt: needs num_return_sequences "
                f"(rollout_n) >= 2, got {args.num_return_sequences} (a group of one has no baseline)",
            )
    if model_args.reward_functions:
        try:
            from alignment.rewards.functions import get_reward_function, import_custom_reward_modules, parse_reward_functions

            import_custom_reward_modules(model_args.custom_reward_modules)
            for name, _ in parse_reward_functions(model_args.reward_functions):
                get_reward_function(name)
        except (KeyError, ValueError) as error:
            problems.add("reward_functions", str(error).strip('"'))
    from alignment.rewards.remote import remote_reward_problems

    for name, message in remote_reward_problems(
        model_args.reward_server, model_args.reward_server_timeout, model_args.reward_server_max_retries,
        model_args.reward_server_batch_size,
    ):  # fmt: skip
        problems.add(name, message)
    for name in ("kl_loss_coeff", "entropy_coeff"):
        problems.check(getattr(args, name) >= 0, name, f"must be >= 0, got {getattr(args, name)}")
    for name in ("clip_range_ratio_low", "clip_range_ratio_high"):
        value = getattr(args, name)
        if value is not None:
            problems.check(value > 0, name, f"must be > 0, got {value}")
    if args.clip_range_ratio_low is not None:
        problems.check(args.clip_range_ratio_low < 1, "clip_range_ratio_low", f"must be < 1 (the ratio floor is 1 - low), got {args.clip_range_ratio_low}")
    problems.check(args.advantage_epsilon > 0, "advantage_epsilon", f"must be > 0, got {args.advantage_epsilon}")
    for name, message in ppo_lag_problems(model_args, args):
        problems.add(name, message)
    for name in MODEL_PATHS:
        value = getattr(model_args, name)
        if value and looks_like_local_path(value) and not os.path.exists(os.path.expanduser(value)):
            problems.add(name, f"path {value!r} does not exist")
    check_cpu_model_flags(problems, **{name: getattr(model_args, name) for name in MODEL_PATHS})
    if model_args.use_flash_attention:
        import paddle

        problems.check(paddle.is_compiled_with_cuda(), "use_flash_attention", "needs a GPU build of Paddle; set it to false on CPU")
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
    for name in ("critic_learning_rate", "critic_weight_decay", "critic_warmup_steps"):
        value = getattr(args, name)
        problems.check(value is None or value >= 0, name, f"must be >= 0, got {value}")
    if args.critic_warmup_ratio is not None:
        ratio = args.critic_warmup_ratio
        problems.check(0 <= ratio <= 1, "critic_warmup_ratio", f"must be in [0, 1], got {ratio}")
    if args.critic_lr_scheduler_type is not None:
        from paddlenlp.trainer.trainer_utils import SchedulerType

        names = [s.value for s in SchedulerType]
        problems.check(
            args.critic_lr_scheduler_type in names, "critic_lr_scheduler_type",
            f"{args.critic_lr_scheduler_type!r} is not one of {names}",
        )  # fmt: skip
    for message in report_to_problems(args.report_to):
        problems.add("report_to", message)
    for name, refused, why in UNSUPPORTED_TRAINING_ARGUMENTS:
        if refused(getattr(args, name, None)):
            problems.add(name, f"{getattr(args, name)!r} {why}")
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
    if _degree(args.pipeline_parallel_degree) > 1:
        problems.check(
            args.eval_mode in ("single", "tensor_parallel"),
            "eval_mode",
            "must be 'single' or 'tensor_parallel' with pipeline_parallel_degree > 1: rollout generation and "
            "experience run on a non-pipeline copy of the actor and critic",
        )
        problems.check(not args.fp16, "fp16", "fp16 loss scaling is not supported with pipeline parallel; use bf16")
        problems.check(
            not getattr(args, "sequence_parallel", False), "sequence_parallel", "is not supported with pipeline parallel"
        )
        if args.recompute:
            logger.warning("recompute is not applied inside pipeline stages (alignment.parallel.PipelineStage)")
    problems.raise_if_any()


def score_head_problems(model_args: ModelArgument) -> list[str]:
    """A reward checkpoint must hold a trained score head (a causal LM would give random rewards); so must
    the critic's, unless ``critic_fresh_score_head`` asks for a fresh one. Reads only file headers."""
    problems = []
    critic = model_args.reward_critic_model_name_or_path
    for name, path in (("reward_model_name_or_path", model_args.reward_model_name_or_path),
                       ("reward_critic_model_name_or_path", critic)):  # fmt: skip
        if not path or (name == "reward_critic_model_name_or_path" and model_args.critic_fresh_score_head):
            continue
        if _has_score_head(path) is False:
            fix = (
                "train one with alignment/rm/run_reward.py"
                if name == "reward_model_name_or_path"
                else "train one with alignment/rm/run_reward.py, or set critic_fresh_score_head: true to start the "
                "critic from a fresh score head on purpose"
            )
            problems.append(
                f"{name}: {path!r} is a plain causal LM without a trained score head (no score_head.* weights); "
                f"a {'reward model' if name.startswith('reward_model') else 'critic'} needs one: {fix}"
            )
    return problems


def _has_score_head(path: str) -> Optional[bool]:
    """True/False when the checkpoint can tell (local safetensors, else its config), None otherwise."""
    from alignment.utils.checkpoint import saved_weight_names

    from alignment.models.hf_convert import is_hf_checkpoint

    directory = os.path.expanduser(path)
    if os.path.isdir(directory):
        names = saved_weight_names(directory)
        if names is not None:
            if is_hf_checkpoint(directory):  # transformers' <Arch>ForSequenceClassification: ``score.weight``
                return any(name.split(".")[0] == "score" for name in names)
            return any(".score_head." in f".{name}" for name in names)
    try:
        from paddlenlp.transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
    except Exception:  # unreachable hub name: loading reports it
        return None
    architectures = getattr(config, "architectures", None) or []
    return any("Score" in architecture for architecture in architectures) if architectures else None


def check_before_loading(model_args: ModelArgument, data_args: DataArgument, args: TrainingArguments) -> None:
    """Checks that complement :func:`validate_arguments` before any weights load: trained score heads in
    the reward/critic checkpoints, learning rates, and an ``output_dir`` that holds another run."""
    from alignment.utils.stage import check_output_dir, check_training_arguments

    problems = Problems()
    problems.items += score_head_problems(model_args)
    # (validate_arguments checks the batch sizes)
    check_training_arguments(problems, args, batch_sizes=False)  # critic_* rates: validate_arguments
    check_output_dir(problems, args)
    problems.raise_if_any()


def check_prompt_count(num_prompts: int, args: TrainingArguments) -> None:
    """At least one global prompt batch (``per_device_prompt_batch_size`` x data-parallel ranks) of prompts;
    checked right after the prompts load, before any model."""
    from alignment.utils.config import ConfigError

    dp_world = max(getattr(args, "dataset_world_size", 1) or 1, 1)
    needed = args.per_device_prompt_batch_size * dp_world
    if num_prompts < needed:
        raise ConfigError(
            [
                f"train_datasets: {num_prompts} prompt(s) after filtering, fewer than one global prompt batch of {needed} "
                f"(per_device_prompt_batch_size {args.per_device_prompt_batch_size} x {dp_world} data-parallel rank(s)); "
                "give more prompts or a smaller per_device_prompt_batch_size"
            ]
        )


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
    tp, pp = _degree(args.tensor_parallel_degree), _degree(args.pipeline_parallel_degree)
    if tp > 1:
        for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size"):
            value = getattr(actor_config, name, None)
            if value:
                problems.check(
                    value % tp == 0, "tensor_parallel_degree", f"the actor's {name} ({value}) is not divisible by {tp}"
                )
    if pp > 1:
        layers = actor_config.num_hidden_layers
        problems.check(layers >= pp, "pipeline_parallel_degree", f"{pp} stages need >= {pp} layers, the actor has {layers}")
        problems.check(
            not getattr(actor_config, "tie_word_embeddings", False),
            "pipeline_parallel_degree",
            "the actor ties its input and output embeddings, which pipeline stages cannot share",
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


def _causal_lm_class(path: str):
    from paddlenlp import transformers
    from paddlenlp.transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    for architecture in getattr(config, "architectures", None) or []:
        if hasattr(transformers, architecture):
            return getattr(transformers, architecture)
    raise ValueError(f"actor_model_name_or_path: cannot tell the causal-LM class of {path} (config.architectures)")


def _score_model_class(path: str):
    from paddlenlp.transformers import AutoConfig

    from alignment.models import AutoModelForScore

    return AutoModelForScore.model_class(AutoConfig.from_pretrained(path))


def _rollout_copy(model: Any, tensor_parallel_degree: int, tensor_parallel_rank: int, dtype: str) -> Any:
    """An ``eval_mode`` rollout model: ``model``'s architecture with the given TP layout and no pipeline.

    Its weights are placeholders until ``export_evaluate_model`` copies the training weights in.
    """
    import copy

    from paddlenlp.transformers.model_utils import dtype_guard

    config = copy.deepcopy(model.config)
    config.tensor_parallel_degree = tensor_parallel_degree
    config.tensor_parallel_rank = tensor_parallel_rank if tensor_parallel_degree > 1 else 0
    with dtype_guard(dtype):
        return type(model)(config)


def load_models(model_args: ModelArgument, args: TrainingArguments) -> dict[str, Any]:
    """The PPO models, plus the actor/critic rollout models with ``eval_mode``.

    Critic-free ``rl_algorithm`` values load no critic; without ``reward_model_name_or_path`` no reward model.

    Actor and critic get the training tensor-parallel layout; reference and reward the rollout layout
    (``eval_mode: single``: not split; otherwise the training one), as the rollout models. Under pipeline
    parallel, actor and critic become this rank's ``PipelineStage`` with its ``PipelineEngine``
    (``actor_pipeline``/``critic_pipeline``). Returns ``actor, reference, reward, critic`` and, with
    ``eval_mode``, ``actor_eval, critic_eval``.
    """
    from alignment.parallel.checkpoint import load_pretrained_model
    from alignment.parallel.tensor_parallel import enable_cpu_model_parallel

    if args.fp16_opt_level == "O2" and (args.bf16 or args.fp16):
        dtype = "bfloat16" if args.bf16 else "float16"
    else:
        dtype = "float32"
    train_tp, tp_rank = _degree(args.tensor_parallel_degree), max(args.tensor_parallel_rank, 0)
    eval_tp = 1 if args.eval_mode == "single" else train_tp
    if max(train_tp, eval_tp) > 1:
        enable_cpu_model_parallel()  # gloo-capable model-parallel ops on CPU; a no-op on GPU

    def load(model_class, path: str, degree: int, **options):
        return load_pretrained_model(
            model_class, path, degree, tp_rank if degree > 1 else 0, dtype=dtype,
            use_flash_attention=model_args.use_flash_attention, **options,
        )  # fmt: skip

    actor_path = model_args.actor_model_name_or_path
    reward_path = model_args.reward_model_name_or_path
    critic_path = model_args.reward_critic_model_name_or_path or reward_path
    lm_class = _causal_lm_class(actor_path)
    models = {
        "actor": load(lm_class, actor_path, train_tp, tensor_parallel_output=False),
        "reference": load(lm_class, actor_path, eval_tp, tensor_parallel_output=False),
    }
    if reward_path:  # critic-free algorithms may score with reward functions / a reward server only
        models["reward"] = load(
            _score_model_class(reward_path), reward_path, eval_tp, score_type="reward", do_normalize=args.normalize_reward
        )
    if uses_critic(args):
        models["critic"] = load(_score_model_class(critic_path), critic_path, train_tp, score_type="critic", do_normalize=False)
    if args.rl_algorithm == "ppo_lag":  # Safe RLHF: a frozen cost model and a cost critic
        cost_path = model_args.cost_model_name_or_path
        cost_critic_path = model_args.cost_critic_model_name_or_path or cost_path
        models["cost"] = load(_score_model_class(cost_path), cost_path, eval_tp, score_type="cost", do_normalize=args.normalize_cost)
        models["cost_critic"] = load(_score_model_class(cost_critic_path), cost_critic_path, train_tp, score_type="critic", do_normalize=False)
    trained = [name for name in ("actor", "critic", "cost_critic") if name in models]
    if args.eval_mode:
        for name in trained:
            models[f"{name}_eval"] = _rollout_copy(models[name], eval_tp, tp_rank, dtype)
    if _degree(args.pipeline_parallel_degree) > 1:
        from paddle.distributed import fleet

        from alignment.models.model_pp import PIPE_MODEL_FOR_ROLE
        from alignment.parallel.pipeline import PipelineEngine

        stage_id, stages = fleet.get_hybrid_communicate_group().get_stage_id(), _degree(args.pipeline_parallel_degree)
        for name in trained:
            models[name] = PIPE_MODEL_FOR_ROLE[name](models[name], stage_id, stages)  # keeps only this stage's layers
            models[f"{name}_pipeline"] = PipelineEngine(models[name])
    return models


def load_datasets(data_args: DataArgument, args: TrainingArguments, tokenizer: Any) -> dict[str, Any]:
    from alignment.data import PromptOnlyDataset, SupervisedDataset, import_custom_dataset_modules

    import_custom_dataset_modules(data_args.custom_dataset_modules)
    template = {"chat_template": data_args.chat_template, "system_prompt": data_args.system_prompt}
    train = PromptOnlyDataset(data_args.train_datasets, tokenizer, max_length=data_args.max_length, seed=args.seed, **template)
    evaluation = None
    if data_args.eval_datasets:
        evaluation = PromptOnlyDataset(data_args.eval_datasets, tokenizer, max_length=data_args.max_length, seed=args.seed, **template)
    elif data_args.eval_split_ratio:
        train, evaluation = train.split_train_test(split_ratio=data_args.eval_split_ratio, seed=args.seed)
    ptx = None
    if data_args.ptx_datasets:
        ptx_length = data_args.max_length + (args.max_new_tokens or data_args.max_length)
        ptx = SupervisedDataset(data_args.ptx_datasets, tokenizer, max_length=ptx_length, seed=args.seed, **template)
    return {"train": train, "eval": evaluation, "ptx": ptx}


def build_trainer(model_args: ModelArgument, data_args: DataArgument, args: TrainingArguments, source: str | None = None):
    """Everything ``main`` does before ``train()``: tokenizers, models, datasets, the trainer."""
    from alignment.data import is_same_tokenizer, load_tokenizer
    from alignment.models.hf_convert import resolve_model_arguments
    from alignment.ppo.ppo_trainer import PPOTrainer
    from alignment.ppo.rl_trainer import RolloutSettings
    from alignment.ppo.trainer_utils import StepTrainer

    resolve_model_arguments(model_args)  # Hugging Face checkpoints -> converted copies (never written in place)
    max_new_tokens = args.max_new_tokens or data_args.max_length
    tokenizer = load_tokenizer(model_args.actor_model_name_or_path, padding_side="left", model_max_length=data_args.max_length + max_new_tokens)
    check_model_compatibility(model_args, data_args, args, tokenizer, source)
    reward_tokenizer = tokenizer
    if model_args.reward_model_name_or_path:
        reward_tokenizer = load_tokenizer(model_args.reward_model_name_or_path, padding_side="right")
        if is_same_tokenizer(tokenizer, reward_tokenizer):
            reward_tokenizer = tokenizer
    from alignment.rewards import build_reward_source

    reward_source = build_reward_source(
        model_args.reward_functions, model_args.reward_server, model_args.custom_reward_modules,
        timeout=model_args.reward_server_timeout, max_retries=model_args.reward_server_max_retries,
        batch_size=model_args.reward_server_batch_size,
    )  # fmt: skip
    if model_args.reward_server:  # a service that is down or speaks another protocol fails now, before the models load
        from alignment.rewards.remote import probe_reward_servers

        probe_reward_servers(reward_source)
    critic_path = model_args.reward_critic_model_name_or_path
    if critic_path and not is_same_tokenizer(tokenizer, load_tokenizer(critic_path)):
        from alignment.utils.config import ConfigError

        raise ConfigError(
            [
                f"reward_critic_model_name_or_path: the critic's tokenizer ({critic_path}) must equal the actor's: "
                "values are computed on the actor's tokens"
            ],
            source,
        )

    datasets = load_datasets(data_args, args, tokenizer)
    check_prompt_count(len(datasets["train"]), args)
    models = load_models(model_args, args)
    actor_trainer = StepTrainer(
        models["actor"], args, name="actor", tokenizer=tokenizer,
        pipeline=models.get("actor_pipeline"), eval_model=models.get("actor_eval"),
    )  # fmt: skip
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
    common = dict(
        reference_model=models["reference"],
        reward_model=models.get("reward"),
        tokenizer=tokenizer,
        reward_tokenizer=reward_tokenizer,
        train_dataset=datasets["train"],
        rollout=rollout,
        eval_dataset=datasets["eval"],
        ptx_dataset=datasets["ptx"],
        reward_source=reward_source,
    )
    if not uses_critic(args):
        from alignment.ppo.critic_free_trainer import CriticFreeTrainer

        return CriticFreeTrainer(args, actor_trainer, **common)
    critic_args = critic_training_arguments(args)
    critic_trainer = StepTrainer(
        models["critic"], critic_args, name="critic", tokenizer=tokenizer,
        pipeline=models.get("critic_pipeline"), eval_model=models.get("critic_eval"),
    )  # fmt: skip
    if args.rl_algorithm == "ppo_lag":
        from alignment.ppo.ppo_lag_trainer import PPOLagTrainer

        cost_tokenizer = load_tokenizer(model_args.cost_model_name_or_path, padding_side="right")
        cost_tokenizer = tokenizer if is_same_tokenizer(tokenizer, cost_tokenizer) else cost_tokenizer
        cost_critic_path = model_args.cost_critic_model_name_or_path or model_args.cost_model_name_or_path
        if not is_same_tokenizer(tokenizer, load_tokenizer(cost_critic_path)):
            raise ValueError(
                f"cost_critic_model_name_or_path: the cost critic's tokenizer ({cost_critic_path}) must equal the actor's: "
                "values are computed on the actor's tokens"
            )
        cost_critic_trainer = StepTrainer(
            models["cost_critic"], critic_args, name="cost_critic", tokenizer=tokenizer,
            pipeline=models.get("cost_critic_pipeline"), eval_model=models.get("cost_critic_eval"),
        )  # fmt: skip
        return PPOLagTrainer(
            args, actor_trainer, critic_trainer, cost_critic_trainer, cost_model=models["cost"],
            cost_tokenizer=cost_tokenizer, **common,
        )  # fmt: skip
    return PPOTrainer(args, actor_trainer, critic_trainer, **common)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, train, evaluate, save ``output_dir/{policy,value}``; returns final metrics."""
    from alignment.utils.config import parse_arguments
    from alignment.utils.env import setup_cpu_runtime
    from alignment.utils.signals import exit_clearly_on_sigterm
    from alignment.utils.stage import prepare_output_dir

    argv = list(sys.argv[1:] if argv is None else argv)
    source = argv[0] if argv and not argv[0].startswith("--") else None
    model_args, data_args, args = parse_arguments(
        (ModelArgument, DataArgument, TrainingArguments),
        argv,
        checks=[lambda m, d, a: validate_arguments(m, d, a, source), check_before_loading],
    )  # every problem of the configuration at once
    exit_clearly_on_sigterm("ppo", args.output_dir)
    setup_cpu_runtime()
    _configure_logging()

    resume = prepare_output_dir(args)  # opt-in resume: a path or "auto"; refuses to mix two runs
    trainer = build_trainer(model_args, data_args, args, source)
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
    from alignment.utils.config import run_entry_point
    from alignment.utils.signals import exit_after_distributed_run

    run_entry_point(main)
    exit_after_distributed_run()

"""paddle-rlhf: RLHF (SFT, reward model, PPO) on PaddlePaddle + PaddleNLP.

Packages: :mod:`alignment.data` (datasets), :mod:`alignment.models` (score models, PPO math),
:mod:`alignment.sft`, :mod:`alignment.rm`, :mod:`alignment.ppo` (the three stages, each with a
``run_*.py`` entry point), :mod:`alignment.parallel` (CPU-capable tensor/pipeline parallelism),
:mod:`alignment.utils` and :mod:`alignment.chat` (chat CLI, ``python -m alignment.chat``).
"""

__version__ = "0.1.0"

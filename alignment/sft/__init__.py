"""Supervised fine-tuning: :class:`SFTTrainer`, its loss, and the LoRA merge (entry point: ``alignment/sft/run_sft.py``)."""

from alignment.sft.merge_lora import LORA_ADAPTER_DIR, merge_lora_model, merge_lora_state_dict
from alignment.sft.sft_trainer import SFTTrainer, causal_lm_loss, lm_logits, perplexity, token_nll

__all__ = [
    "SFTTrainer",
    "causal_lm_loss",
    "token_nll",
    "perplexity",
    "lm_logits",
    "LORA_ADAPTER_DIR",
    "merge_lora_state_dict",
    "merge_lora_model",
]

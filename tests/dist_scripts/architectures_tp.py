"""Worker for tests/test_architectures.py: causal LM and score model of each architecture at TP=2 (gloo, CPU).

Usage: python -m paddle.distributed.launch --nproc_per_node 2 architectures_tp.py ROOT DATA.npz OUT_DIR ARCH...

``ROOT/<arch>/causal`` and ``ROOT/<arch>/score`` are TP=1 ``save_pretrained`` checkpoints. Each rank loads
its shards of both (split on load), runs the batch forward (gathered logits, end scores) and the causal LM's
loss backward; rank 0 writes ``OUT_DIR/<arch>.npz`` (logits, loss, end_scores, the embedding gradient).
"""

import os
import sys

import numpy as np
import paddle

from alignment.models import AutoModelForScore
from alignment.models.architectures import get_architecture
from alignment.parallel.checkpoint import gather_tensor_parallel_state_dict, load_pretrained_model
from alignment.parallel.topology import init_hybrid_parallel
from alignment.utils.signals import exit_after_distributed_run
from parallel_common import to_paddle, write_rank_result


def main(root: str, data: str, out_dir: str, architectures: list[str]) -> None:
    hcg = init_hybrid_parallel(mp_degree=2)
    rank = hcg.get_model_parallel_rank()
    batch = to_paddle(dict(np.load(data)))
    batch["attention_mask"] = batch["attention_mask"].astype("bool")
    record = {}
    for name in architectures:
        architecture = get_architecture(name)
        causal = load_pretrained_model(
            architecture.causal_lm_class, os.path.join(root, name, "causal"), 2, rank, tensor_parallel_output=False
        )
        loss, logits = causal(**batch, return_dict=False)[:2]
        loss.backward()
        grads = {n: p.grad for n, p in causal.named_parameters() if p.grad is not None}
        full_grads = gather_tensor_parallel_state_dict(architecture.causal_lm_class, causal.config, grads)
        score_dir = os.path.join(root, name, "score")
        score_class = AutoModelForScore.model_class(architecture.config_class.from_pretrained(score_dir))
        score = load_pretrained_model(score_class, score_dir, 2, rank)
        with paddle.no_grad():
            end_scores = score(batch["input_ids"], attention_mask=batch["attention_mask"], return_dict=True).end_scores
        record[name] = {"q_proj_class": type(getattr(causal, architecture.backbone_name).layers[0].self_attn.q_proj).__name__}
        if rank == 0:
            np.savez(
                os.path.join(out_dir, f"{name}.npz"),
                logits=logits.numpy(), loss=loss.numpy(), end_scores=end_scores.numpy(),
                **{f"grad/{key}": value.numpy() for key, value in full_grads.items()},
            )  # fmt: skip
    write_rank_result(out_dir, record)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
    exit_after_distributed_run()

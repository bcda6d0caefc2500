"""Worker for tests/test_parallel_hybrid.py: tensor parallel 2 x pipeline parallel 2 (4 CPU processes).

Usage: python -m paddle.distributed.launch --nproc_per_node 4 parallel_hybrid.py CKPT DATA.npz OUT_DIR STEPS MICRO

Each rank loads its TP shard of the TP=1 checkpoint, keeps its pipeline stage, trains STEPS AdamW steps over
MICRO micro-batches (LM loss inside the pipeline), then gathers the full TP=1 model (pipeline gather, then
tensor-parallel gather). Writes rank<r>.json (losses, topology), rank<r>_logits.npy (eval logits) and, on
rank 0, gathered.npz.
"""

import os
import sys

import numpy as np
import paddle
from paddlenlp.transformers import LlamaForCausalLM
from paddlenlp.transformers.llama.modeling import LlamaPretrainingCriterion

from alignment.parallel.checkpoint import gather_tensor_parallel_state_dict, load_tensor_parallel_pretrained
from alignment.parallel.pipeline import PipelineEngine, PipelineStage, gather_pipeline_state_dict
from alignment.parallel.topology import init_hybrid_parallel
from parallel_common import to_paddle, write_rank_result
from alignment.utils.signals import exit_after_distributed_run

LR, ADAM_EPS = 1e-2, 1e-4


def main(ckpt: str, data: str, out_dir: str, steps: str, micro: str) -> None:
    hcg = init_hybrid_parallel(mp_degree=2, pp_degree=2)
    mp_rank, stage_id = hcg.get_model_parallel_rank(), hcg.get_stage_id()
    model = load_tensor_parallel_pretrained(LlamaForCausalLM, ckpt, 2, mp_rank, tensor_parallel_output=False)
    config = model.config
    stage = PipelineStage(model, stage_id=stage_id, num_stages=2)
    del model

    criterion = LlamaPretrainingCriterion(config)
    engine = PipelineEngine(stage, loss_fn=lambda logits, micro_batch: criterion(logits, micro_batch["labels"]))
    optimizer = paddle.optimizer.AdamW(learning_rate=LR, epsilon=ADAM_EPS, parameters=stage.parameters())
    batch = to_paddle(dict(np.load(data)))
    batch["attention_mask"] = batch["attention_mask"].astype("bool")
    losses = []
    for _ in range(int(steps)):
        losses.append(float(engine.forward_backward(batch, num_micro_batches=int(micro))))
        optimizer.step()
        optimizer.clear_grad()
    logits = engine.eval_batch({k: batch[k] for k in ("input_ids", "attention_mask")}, int(micro))

    tp_shard_all_layers = gather_pipeline_state_dict(stage)  # over the pp group
    full = gather_tensor_parallel_state_dict(LlamaForCausalLM, config, tp_shard_all_layers)  # over the mp group
    if paddle.distributed.get_rank() == 0:
        np.savez(os.path.join(out_dir, "gathered.npz"), **{k: v.numpy() for k, v in full.items()})
    np.save(os.path.join(out_dir, f"rank{paddle.distributed.get_rank()}_logits.npy"), logits.numpy())
    write_rank_result(
        out_dir,
        dict(
            mp_rank=mp_rank,
            stage_id=stage_id,
            pp_group=hcg.get_pipe_parallel_group().ranks,
            mp_group=hcg.get_model_parallel_group().ranks,
            losses=losses,
        ),
    )


if __name__ == "__main__":
    main(*sys.argv[1:6])
    exit_after_distributed_run()  # skip gloo teardown, which can abort after success

"""Worker for tests/test_parallel_pipeline.py: Llama split into 2 pipeline stages on CPU (gloo).

Usage: python -m paddle.distributed.launch --nproc_per_node 2 parallel_pipeline.py CKPT DATA.npz OUT_DIR STEPS MICRO

Each rank builds its stage from the full TP=1 checkpoint, trains STEPS steps (forward+backward over MICRO
micro-batches with the LM loss inside the pipeline, AdamW step), then writes:
  rank<r>.json        stage layer range, parameter names, per-step losses (broadcast from the last stage)
  rank<r>_arrays.npz  logits from eval_batch after training (broadcast to every stage)
  gathered_all.npz    (rank 0) full state dict gathered on every rank (dst=None), rank 0's copy
  gathered/           (rank 0) full LlamaForCausalLM from the dst=0 gather, via save_pretrained
"""

import os
import sys

import numpy as np
import paddle
from paddlenlp.transformers import LlamaForCausalLM
from paddlenlp.transformers.llama.modeling import LlamaPretrainingCriterion

from alignment.parallel.pipeline import PipelineEngine, PipelineStage, gather_pipeline_state_dict
from alignment.parallel.topology import init_hybrid_parallel
from parallel_common import to_paddle, write_rank_result
from alignment.utils.signals import exit_after_distributed_run

LR, ADAM_EPS = 1e-2, 1e-4  # eps >> grad round-off, so Adam's g/sqrt(v) is stable across PP and PP=1


def main(ckpt: str, data: str, out_dir: str, steps: str, micro: str) -> None:
    hcg = init_hybrid_parallel(pp_degree=2)
    stage_id = hcg.get_stage_id()
    model = LlamaForCausalLM.from_pretrained(ckpt, tensor_parallel_output=False)
    config = model.config
    stage = PipelineStage(model, stage_id=stage_id, num_stages=2)
    del model  # the stage keeps only its own sub-layers

    criterion = LlamaPretrainingCriterion(config)
    engine = PipelineEngine(stage, loss_fn=lambda logits, micro_batch: criterion(logits, micro_batch["labels"]))
    optimizer = paddle.optimizer.AdamW(learning_rate=LR, epsilon=ADAM_EPS, parameters=stage.parameters())
    batch = to_paddle(dict(np.load(data)))
    batch["attention_mask"] = batch["attention_mask"].astype("bool")

    losses, micro_losses = [], []
    for _ in range(int(steps)):
        loss = engine.forward_backward(batch, num_micro_batches=int(micro))
        optimizer.step()
        optimizer.clear_grad()
        losses.append(float(loss))
        micro_losses.append(engine.micro_batch_losses.tolist())

    logits = engine.eval_batch({k: batch[k] for k in ("input_ids", "attention_mask")}, num_micro_batches=int(micro))
    eval_loss = engine.eval_batch(batch, num_micro_batches=int(micro), compute_loss=True)

    everywhere = gather_pipeline_state_dict(stage)  # dst=None: every rank gets the full model
    on_rank0 = gather_pipeline_state_dict(stage, dst=0)
    if stage_id == 0:
        np.savez(os.path.join(out_dir, "gathered_all.npz"), **{k: v.numpy() for k, v in everywhere.items()})
        full = LlamaForCausalLM(config)
        missing, unexpected = full.set_state_dict(on_rank0)
        assert not missing and not unexpected, (missing, unexpected)
        full.save_pretrained(os.path.join(out_dir, "gathered"), safe_serialization=True)

    np.savez(os.path.join(out_dir, f"rank{stage_id}_arrays.npz"), logits=logits.numpy())
    write_rank_result(
        out_dir,
        dict(
            stage_id=stage_id,
            layer_range=list(stage.layer_range),
            param_names=sorted(stage.state_dict().keys()),
            losses=losses,
            micro_losses=micro_losses,
            eval_loss=float(eval_loss),
            gathered_names=sorted(everywhere.keys()),
            gathered_on_rank_names=len(on_rank0),
        ),
    )


if __name__ == "__main__":
    main(*sys.argv[1:6])
    exit_after_distributed_run()  # skip gloo teardown, which can abort after success

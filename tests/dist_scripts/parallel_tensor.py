"""Worker for tests/test_parallel_tensor.py: Llama with tensor_parallel_degree=2 on CPU (gloo).

Usage: python -m paddle.distributed.launch --nproc_per_node 2 parallel_tensor.py CKPT DATA.npz OUT_DIR

CKPT is a TP=1 ``save_pretrained`` checkpoint. Each rank loads its TP shard (split on load), runs forward +
backward on the batch, one AdamW step, and writes:
  rank<r>.json            loss, loss with tensor_parallel_output=True, vocab-parallel CE checks
  rank<r>_arrays.npz      logits (gathered, before the step), logits after the step, local grads (``grad/<name>``),
                          grads of the tensor_parallel_output=True model (``grad_tpout/<name>``)
  gathered.npz (rank 0)   full TP=1 weights after the step, gathered in memory
  merged/                 stock save_pretrained(merge_tensor_parallel=True) after the step
  sharded/                per-rank files (model.tp00/01.safetensors) after the step
"""

import os
import sys

import numpy as np
import paddle
import paddle.distributed as dist
from paddlenlp.transformers import LlamaForCausalLM

from alignment.parallel.checkpoint import gather_tensor_parallel_state_dict, load_tensor_parallel_pretrained
from alignment.parallel.collectives import vocab_parallel_cross_entropy
from alignment.parallel.topology import init_hybrid_parallel
from parallel_common import to_paddle, write_rank_result
from alignment.utils.signals import exit_after_distributed_run

LR, ADAM_EPS = 1e-2, 1e-4  # eps >> grad round-off, so Adam's g/sqrt(v) is stable across TP and TP=1


def main(ckpt: str, data: str, out_dir: str) -> None:
    hcg = init_hybrid_parallel(mp_degree=2)
    rank = hcg.get_model_parallel_rank()
    batch = to_paddle(dict(np.load(data)))
    batch["attention_mask"] = batch["attention_mask"].astype("bool")
    arrays, record = {}, {"mp_rank": rank, "mp_group": hcg.get_model_parallel_group().ranks}

    # --- forward/backward/step with gathered logits (tensor_parallel_output=False, as PPO uses)
    model = load_tensor_parallel_pretrained(LlamaForCausalLM, ckpt, 2, rank, tensor_parallel_output=False)
    record["model_class_check"] = type(model.llama.layers[0].self_attn.q_proj).__name__
    loss, logits = model(**batch, return_dict=False)[:2]
    loss.backward()
    record["loss"] = float(loss)
    arrays["logits"] = logits.numpy()
    arrays.update({f"grad/{n}": p.grad.numpy() for n, p in model.named_parameters()})
    optimizer = paddle.optimizer.AdamW(learning_rate=LR, epsilon=ADAM_EPS, parameters=model.parameters())
    optimizer.step()
    optimizer.clear_grad()
    with paddle.no_grad():
        logits_after = model(batch["input_ids"], attention_mask=batch["attention_mask"], return_dict=False)[0]
    arrays["logits_after"] = logits_after.numpy()

    gathered = gather_tensor_parallel_state_dict(LlamaForCausalLM, model.config, model.state_dict())
    if rank == 0:
        np.savez(os.path.join(out_dir, "gathered.npz"), **{k: v.numpy() for k, v in gathered.items()})
    model.save_pretrained(os.path.join(out_dir, "merged"), merge_tensor_parallel=True, safe_serialization=True)
    model.save_pretrained(os.path.join(out_dir, "sharded"), safe_serialization=True)
    dist.barrier()

    # --- loss over vocab-sharded logits (tensor_parallel_output=True -> ParallelCrossEntropy)
    model_tp_out = load_tensor_parallel_pretrained(LlamaForCausalLM, ckpt, 2, rank, tensor_parallel_output=True)
    loss_tp_out = model_tp_out(**batch, return_dict=False)[0]
    loss_tp_out.backward()
    record["loss_tp_output"] = float(loss_tp_out)
    arrays.update({f"grad_tpout/{n}": p.grad.numpy() for n, p in model_tp_out.named_parameters()})

    # --- vocab_parallel_cross_entropy directly: [2, 3, 8] logits, vocab split in halves, one ignored label
    full_logits = np.random.default_rng(7).normal(size=(2, 3, 8)).astype("float32")
    labels = np.array([[0, 5, 7], [3, -100, 4]], dtype=np.int64)
    shard = paddle.to_tensor(np.split(full_logits, 2, axis=-1)[rank], stop_gradient=False)
    ce, softmax = vocab_parallel_cross_entropy(shard, paddle.to_tensor(labels), return_softmax=True)
    ce.sum().backward()
    arrays["ce_loss"], arrays["ce_softmax"], arrays["ce_grad"] = ce.numpy(), softmax.numpy(), shard.grad.numpy()

    np.savez(os.path.join(out_dir, f"rank{rank}_arrays.npz"), **arrays)
    write_rank_result(out_dir, record)


if __name__ == "__main__":
    main(*sys.argv[1:4])
    exit_after_distributed_run()  # skip gloo teardown, which can abort after success

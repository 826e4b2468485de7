r"""Stage 2 with a Qwen3-Embedding text embedder (see stage2.py and stage1_qwen3.py).

``qwen`` arg: 8b (D = 4096, default), 4b (2560), 0.6b (1024). The LLM cache must hold the
short and long captions::

    python tools/precompute.py --data ROOT/datasets/cc3m --model ROOT/weights/qwen3-embedding-8b \
        --fields short,long --out ROOT/caches/cc3m-qwen3-embedding-8b

Single host::

    python experiments/run.py --config stage2_qwen3.py:size=B/16,qwen=8b,root=/data/proclip \
        --workdir /runs/stage2-b16-qwen3

TPU pod slice (the same command on every worker)::

    gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all --command "cd proclip-jax \
      && python experiments/run.py --config stage2_qwen3.py:size=L/14,impl=sharded,root=gs://BUCKET/proclip \
         --workdir gs://BUCKET/runs/stage2-l14-qwen3"
"""
from experiments.configs import common
from experiments.configs import stage2


def get_config(arg=None):
  a = common.parse_arg(arg, size="B/16", qwen="8b", root=".", dataset="cc3m", stage1="",
                       steps=10_000, batch=4096, bf16=True, impl="dense", scan=False)
  return stage2.build(a.size, f"qwen3_embedding_{a.qwen}", a.root, a.dataset, a.stage1,
                      a.steps, a.batch, a.bf16, a.impl, a.scan, preset="qwen3-embedding")

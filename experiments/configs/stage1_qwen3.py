r"""Stage 1 with a Qwen3-Embedding text embedder (multilingual; causal, last-token pooling).

The same recipe as stage1.py; the LLM cache holds Qwen3-Embedding features (``qwen`` arg:
8b -> D = 4096, 4b -> 2560, 0.6b -> 1024), written with the ``qwen3-embedding`` preset::

    python tools/convert.py Qwen3-Embedding-8B ROOT/weights/qwen3-embedding-8b
    python tools/precompute.py --data ROOT/datasets/cc3m --model ROOT/weights/qwen3-embedding-8b \
        --fields short,raw --out ROOT/caches/cc3m-qwen3-embedding-8b
    (and the CLIP text cache of stage1.py)

Single host::

    python experiments/run.py --config stage1_qwen3.py:size=B/16,qwen=8b,root=/data/proclip \
        --workdir /runs/stage1-b16-qwen3

TPU pod slice (the same command on every worker)::

    gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all --command "cd proclip-jax \
      && python experiments/run.py --config stage1_qwen3.py:size=L/14,root=gs://BUCKET/proclip \
         --workdir gs://BUCKET/runs/stage1-l14-qwen3"
"""
from experiments.configs import common
from experiments.configs import stage1


def get_config(arg=None):
  a = common.parse_arg(arg, size="B/16", qwen="8b", root=".", dataset="cc3m", steps=2000,
                       batch=4096)
  return stage1.build(a.size, f"qwen3_embedding_{a.qwen}", a.root, a.dataset, a.steps,
                      a.batch, preset="qwen3-embedding")

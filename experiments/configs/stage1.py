r"""Stage 1: distil CLIP's text tower into the adapter (cached LLM features -> CLIP space).

Trains only the TextProj adapter (D -> 8D -> D residual block, then D -> E) on two caches:
the LLM embedder's features of each caption field (the student's input) and the CLIP text
tower's features of the same captions (the teacher). Loss: instance + structure
distillation per chunk of ``distill_chunk`` = 512 rows (proclip_method.md, stage 1).
Defaults: AdamW lr 1e-4, wd 0.05, warmup 500 then cosine, global batch 4096.

Args (``stage1.py:k=v,...``): ``size`` B/32 | B/16 | L/14 | L/14-336 and ``embedder``
(llm2clip_llama3_8b; see common.EMBEDDERS) name the folders under ``root`` (datasets/,
caches/, weights/), ``dataset``, ``steps``, ``batch``. The adapter's D and E are read from
the two caches when the run starts (train/run_config.py), so another CLIP or embedder
needs only ``--config.cache.llm=... --config.cache.clip=...``. One caption field
(``--config.stage1.fields=caption``, img2dataset data) is used for both instance terms.
``shapes=True`` states the named ``size`` and ``embedder``'s D and E instead, for
``tools/aot_compile.py``, which compiles the step without the caches.

What it needs under ROOT (a missing one is reported with the command that makes it)::

    DATA=ROOT/datasets/cc3m
      python tools/build_dataset.py cc3m_manifest.jsonl $DATA      # fields short, raw, ...
    python tools/convert.py LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned ROOT/weights/llm2clip-llama3-8b-cc
    python tools/convert.py ViT-B-16.pt ROOT/weights/clip-vit-b16
    python tools/precompute.py --data $DATA --model ROOT/weights/llm2clip-llama3-8b-cc \
        --fields short,raw --out ROOT/caches/cc3m-llm2clip-llama3-8b-cc
    python tools/precompute.py --data $DATA --model ROOT/weights/clip-vit-b16 \
        --fields short,raw --out ROOT/caches/cc3m-clip-b16

Single host (CPU, one GPU, or one TPU VM)::

    python experiments/run.py --config stage1.py:size=B/16,root=/data/proclip \
        --workdir /runs/stage1-b16

TPU pod slice: the same command on every worker (jax.distributed starts by itself)::

    gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all --command "cd proclip-jax \
      && python experiments/run.py --config stage1.py:size=L/14,root=gs://BUCKET/proclip \
         --workdir gs://BUCKET/runs/stage1-l14"
"""
from experiments.configs import common


def build(size: str, embedder: str, root: str, dataset: str, steps: int, batch: int,
          preset: str = "", shapes: bool = False):
  """The stage-1 ConfigDict (shared with the Qwen3 variant).

  The adapter's D and E are read from the two caches when the run starts
  (proclip_jax/train/run_config.py): the config names paths, not shapes. ``preset``: the
  embedder preset the LLM cache must have been written with ("" = the cache's, recorded).
  """
  tag = common.size_tag(common.check_backbone(size))
  stem, _ = common.embedder(embedder)
  c = common.base_config(stage=1)
  c.total_steps = steps
  if shapes:   # the named backbone's and embedder's D and E, stated (tools/aot_compile.py)
    d, e = common.named_shapes(size, embedder)
    common.set_model(c, d=d, e=e, size=None, dtype="float32")
  else:
    common.set_model(c, d=None, e=None, size=None, dtype="float32")
  c.data.path = common.under(root, "datasets", dataset)
  c.data.batch_size = batch
  c.cache.llm = common.under(root, "caches", f"{dataset}-{stem}")
  c.cache.clip = common.under(root, "caches", f"{dataset}-clip-{tag}")
  c.cache.preset = preset
  c.stage1.fields = ("short", "raw")
  c.distill_chunk = 512
  c.optim.lr = 1e-4
  c.optim.weight_decay = 0.05
  c.optim.warmup_steps = min(500, steps)
  c.optim.end_lr_ratio = 0.0
  c.optim.grad_clip_norm = 0.0
  c.log_every = 50
  c.ckpt_every = 500
  return c


def get_config(arg=None):
  a = common.parse_arg(arg, size="B/16", embedder="llm2clip_llama3_8b", root=".",
                       dataset="cc3m", steps=2000, batch=4096, shapes=False)
  return build(a.size, a.embedder, a.root, a.dataset, a.steps, a.batch, shapes=a.shapes)

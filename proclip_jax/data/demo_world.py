"""The demo world: procedurally drawn shape scenes with short, long and raw captions.

Each image (64x64 by default) shows 1-3 objects on a background. An object has a shape
(``SHAPES``), a colour (``COLOURS``), a size (small/large) and a cell of a 3x3 grid
(``POSITIONS``, "top left" ... "bottom right"); objects never share a cell. The first object
is the *main* object: always large, named by the short caption and the classification label.

Captions (all deterministic in the seed):

* ``short``: the main object only, e.g. "a red circle".
* ``long``: every object (main first, then the others in grid order) with size, colour,
  shape and position, then the background: "a large red circle in the top left, a small
  blue square in the center and a large green triangle in the bottom right, on a white
  background". 20-40 CLIP tokens, so a 16-token text tower sees only the first object or so.
* ``raw``: a noisier alt-text-like variant (varied templates, sometimes missing words or
  with tag noise) for stage 1.

``generate_demo_world(out_dir, ...)`` writes::

  out_dir/source/manifest.jsonl        one row per image: image, short, long, raw, label, split
  out_dir/source/images/SPLIT/NNNNNN.png
  out_dir/classes.json                 {"classes": ["red circle", ...], "templates": [...],
                                        "colours": [...], "shapes": [...], ...}
  out_dir/data/                        the tfds dataset (``builder.build_dataset``): splits
                                        train, retrieval_test, classification_test; fields
                                        id, image, short, long, raw, lang, label

``label`` is the index of "COLOUR SHAPE" of the main object in ``classes`` (on every split;
the classification split exists for zero-shot evaluation with ``templates``). Drawing is
PIL without anti-aliasing, so each object's pixels are exactly its colour.

Options (off by default, which draws what the world always drew): ``main_largest`` (the
other objects are always small, so the main object is the one large object) and
``train_exclude`` (classes no object of the train split has, e.g. ``held_out_classes()``:
a narrower train set, the held-out splits keeping every class). ``sample_examples`` draws
examples in memory, without files (the demo pre-trains its CLIP on such a set).
"""
import dataclasses
import json
import os
import shutil

import numpy as np
from PIL import Image, ImageDraw

from proclip_jax.data import builder
from proclip_jax.errors import ProclipError

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
    "yellow": (240, 210, 30), "purple": (140, 50, 180), "orange": (245, 135, 20),
    "pink": (245, 115, 185), "cyan": (30, 200, 210),
}
BACKGROUNDS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (15, 15, 15),
               "striped": ((245, 245, 245), (200, 200, 200))}
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left",
             "bottom", "bottom right")
_POSITION_PHRASE = {"top": "at the top", "left": "on the left", "right": "on the right",
                    "bottom": "at the bottom", "center": "in the center"}
SIZES = ("small", "large")
CLASSES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
# Zero-shot prompts, ``template.format(class_name)``; no "a"/"an" (class names start with
# vowels and consonants alike).
TEMPLATES = ("{}", "the {}", "a picture of the {}", "a drawing of the {}", "the {} shape")
SPLITS = ("train", "retrieval_test", "classification_test")


@dataclasses.dataclass(frozen=True)
class Obj:
  shape: str
  colour: str
  size: str
  cell: int  # index into POSITIONS (row-major 3x3)


@dataclasses.dataclass(frozen=True)
class Scene:
  objects: tuple  # of Obj; objects[0] is the main object
  background: str
  jitter: tuple = ()  # per object (dx, dy) in pixels


def position_phrase(cell: int) -> str:
  name = POSITIONS[cell]
  return _POSITION_PHRASE.get(name, f"in the {name}")


def cell_center(cell: int, image_size: int) -> tuple[float, float]:
  """(x, y) pixel centre of a grid cell."""
  step = image_size / 3
  row, col = divmod(cell, 3)
  return (col + 0.5) * step, (row + 0.5) * step


def held_out_classes() -> tuple:
  """The 12 classes ``(colour index + shape index) % 4 == 0``: every colour and every shape
  keeps at least four classes outside this set, so a world without them still shows each
  word (the demo's stage-2 data leaves them out; zero-shot reports them apart)."""
  return tuple(f"{c} {s}" for i, c in enumerate(COLOURS) for j, s in enumerate(SHAPES)
               if (i + j) % 4 == 0)


def sample_scene(rng: np.random.Generator, *, main_largest: bool = False,
                 exclude=()) -> Scene:
  """A random scene. ``main_largest``: the other objects are always small, so the main
  object is the one large object. ``exclude``: class names ("COLOUR SHAPE") no object may
  have (redrawn until it has another). The defaults draw exactly what they always drew."""
  n = int(rng.integers(1, 4))
  cells = rng.choice(9, size=n, replace=False)
  colours = list(COLOURS)
  objs = []
  for k in range(n):
    while True:
      shape = SHAPES[int(rng.integers(len(SHAPES)))]
      colour = colours[int(rng.integers(len(colours)))]
      if f"{colour} {shape}" not in exclude:
        break
    size = "large" if k == 0 else ("small" if main_largest else SIZES[int(rng.integers(2))])
    objs.append(Obj(shape=shape, colour=colour, size=size, cell=int(cells[k])))
  jitter = tuple((int(rng.integers(-1, 2)), int(rng.integers(-1, 2))) for _ in range(n))
  background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
  return Scene(tuple(objs), background, jitter)


def article(word: str) -> str:
  """``a`` or ``an`` before ``word``."""
  return "an" if word[:1] in "aeiou" else "a"


def short_caption(scene: Scene) -> str:
  o = scene.objects[0]
  return f"{article(o.colour)} {o.colour} {o.shape}"


def _object_phrase(o: Obj) -> str:
  return f"a {o.size} {o.colour} {o.shape} {position_phrase(o.cell)}"


def long_caption(scene: Scene) -> str:
  main, others = scene.objects[0], sorted(scene.objects[1:], key=lambda o: o.cell)
  parts = [_object_phrase(o) for o in (main, *others)]
  text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
  return f"{text}, on a {scene.background} background"


def raw_caption(scene: Scene, rng: np.random.Generator) -> str:
  """An alt-text-like caption: varied templates, some words missing, some tag noise."""
  o = scene.objects[0]
  colour = o.colour if rng.random() > 0.1 else ""
  name = " ".join(w for w in (colour, o.shape) if w)
  others = [f"{x.colour} {x.shape}" for x in scene.objects[1:]]
  templates = [
      lambda: f"{name}",
      lambda: f"a {o.shape} that is {o.colour}",
      lambda: f"image of {article(name)} {name} and {len(others)} other "
              f"shape{'' if len(others) == 1 else 's'}",
      lambda: f"{name} on {scene.background} background, clipart",
      lambda: "shapes: " + ", ".join([name, *others]),
      lambda: f"stock illustration {name} {position_phrase(o.cell)} vector",
      lambda: f"{name.upper()} #shapes #{o.colour}",
  ]
  return templates[int(rng.integers(len(templates)))]()


def label_of(scene: Scene) -> int:
  o = scene.objects[0]
  return CLASSES.index(f"{o.colour} {o.shape}")


def _shape_points(shape: str, cx: float, cy: float, r: float):
  if shape == "triangle":
    return [(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)]
  if shape == "diamond":
    return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
  if shape == "star":
    pts = []
    for k in range(10):
      rad = r if k % 2 == 0 else 0.45 * r
      a = -np.pi / 2 + k * np.pi / 5
      pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
    return pts
  raise ValueError(shape)


def draw(scene: Scene, image_size: int = 64) -> np.ndarray:
  """Renders a scene to uint8 RGB ``[image_size, image_size, 3]`` (no anti-aliasing)."""
  bg = BACKGROUNDS[scene.background]
  if scene.background == "striped":
    im = Image.new("RGB", (image_size, image_size), bg[0])
    d = ImageDraw.Draw(im)
    band = max(image_size // 16, 1)
    for y in range(0, image_size, 2 * band):
      d.rectangle([0, y + band, image_size - 1, y + 2 * band - 1], fill=bg[1])
  else:
    im = Image.new("RGB", (image_size, image_size), bg)
    d = ImageDraw.Draw(im)
  step = image_size / 3
  jitter = scene.jitter or ((0, 0),) * len(scene.objects)
  # The main object last, so it is never covered.
  for o, (dx, dy) in reversed(list(zip(scene.objects, jitter))):
    cx, cy = cell_center(o.cell, image_size)
    cx, cy = cx + dx, cy + dy
    r = step * (0.42 if o.size == "large" else 0.27)
    fill = COLOURS[o.colour]
    if o.shape == "circle":
      d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif o.shape == "square":
      s = 0.85 * r
      d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif o.shape == "cross":
      w = 0.35 * r
      d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
      d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
    else:
      d.polygon(_shape_points(o.shape, cx, cy, r), fill=fill)
  return np.asarray(im, np.uint8)


@dataclasses.dataclass
class DemoWorld:
  """Where ``generate_demo_world`` wrote things."""
  path: str          # out_dir
  data_dir: str      # the tfds dataset (open_source(data_dir, split))
  manifest: str      # source/manifest.jsonl
  classes_file: str  # classes.json
  classes: tuple
  templates: tuple
  splits: dict       # split -> number of examples
  seconds: float


def sample_examples(n: int, *, seed: int, image_size: int = 64, main_largest: bool = False,
                    exclude=()) -> dict:
  """``n`` examples drawn in memory (no files): ``image`` uint8 [n, S, S, 3], ``short``,
  ``long``, ``raw`` (lists of str) and ``label`` int64 [n]; deterministic in ``seed``.
  The demo pre-trains its CLIP on such a set, apart from the stored splits."""
  rng = np.random.default_rng([seed, 0xC11B])
  scenes = [sample_scene(rng, main_largest=main_largest, exclude=exclude) for _ in range(n)]
  image = np.empty((n, image_size, image_size, 3), np.uint8)
  for i, scene in enumerate(scenes):
    image[i] = draw(scene, image_size)
  return {"image": image, "short": [short_caption(s) for s in scenes],
          "long": [long_caption(s) for s in scenes],
          "raw": [raw_caption(s, rng) for s in scenes],
          "label": np.asarray([label_of(s) for s in scenes], np.int64)}


def generate_demo_world(out_dir, *, n_train: int = 4000, n_test: int = 500,
                        n_retrieval: int | None = None, n_classification: int | None = None,
                        image_size: int = 64, seed: int = 0, main_largest: bool = False,
                        train_exclude=(), overwrite: bool = False,
                        progress: bool = False) -> DemoWorld:
  """Draws the demo world and builds its tfds dataset (see the module docstring for layout).

  Args:
    out_dir: folder to create.
    n_train: train images.
    n_test: images in each held-out split (``retrieval_test``, ``classification_test``)
      unless ``n_retrieval`` / ``n_classification`` say otherwise.
    image_size: side of the square images (>= 24).
    seed: everything (scenes, captions) follows from it.
    main_largest: the other objects are always small (``sample_scene``), on every split.
    train_exclude: class names no object of the train split has (the held-out splits keep
      every class); e.g. ``held_out_classes()``.
    overwrite: replace an existing ``out_dir``.
    progress: show the builder's progress bars.
  """
  import time  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  out_dir = os.path.abspath(os.fspath(out_dir))
  if image_size < 24:
    raise ProclipError(f"image_size={image_size} is too small to draw a 3x3 grid; use >= 24.")
  sizes = {"train": n_train,
           "retrieval_test": n_test if n_retrieval is None else n_retrieval,
           "classification_test": n_test if n_classification is None else n_classification}
  unknown = sorted(set(train_exclude) - set(CLASSES))
  if unknown:
    raise ProclipError(f"train_exclude names {unknown}, which are not demo classes "
                       "('COLOUR SHAPE', see CLASSES).")
  if len(set(train_exclude)) >= len(CLASSES):
    raise ProclipError("train_exclude leaves no class to draw; exclude fewer classes.")
  if any(v < 1 for v in sizes.values()):
    raise ProclipError(f"Demo world split sizes {sizes} must all be >= 1.")
  if os.path.exists(out_dir):
    if not overwrite:
      raise ProclipError(f"{out_dir} already exists; pass overwrite=True or another folder.")
    shutil.rmtree(out_dir)
  source = os.path.join(out_dir, "source")
  rows = []
  for k, split in enumerate(SPLITS):
    folder = os.path.join(source, "images", split)
    os.makedirs(folder)
    rng = np.random.default_rng([seed, k])
    exclude = tuple(train_exclude) if split == "train" else ()
    for i in range(sizes[split]):
      scene = sample_scene(rng, main_largest=main_largest, exclude=exclude)
      rel = f"images/{split}/{i:06d}.png"
      Image.fromarray(draw(scene, image_size)).save(os.path.join(source, rel), compress_level=1)
      rows.append({"image": rel, "short": short_caption(scene), "long": long_caption(scene),
                   "raw": raw_caption(scene, rng), "label": label_of(scene), "split": split,
                   "lang": "en"})
  manifest = os.path.join(source, "manifest.jsonl")
  with open(manifest, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  classes = {"classes": list(CLASSES), "templates": list(TEMPLATES), "colours": COLOURS,
             "shapes": list(SHAPES), "backgrounds": list(BACKGROUNDS),
             "positions": list(POSITIONS), "image_size": image_size, "seed": seed,
             "main_largest": bool(main_largest), "train_exclude": list(train_exclude),
             "label": "index of 'COLOUR SHAPE' of the main object in classes"}
  classes_file = os.path.join(out_dir, "classes.json")
  with open(classes_file, "w") as f:
    json.dump(classes, f, indent=1)
  data_dir = os.path.join(out_dir, "data")
  result = builder.build_dataset(manifest, data_dir, fields=("short", "long", "raw"),
                                 metadata={"demo_world": classes}, progress=progress)
  return DemoWorld(out_dir, data_dir, manifest, classes_file, CLASSES, TEMPLATES,
                   result.num_examples, time.time() - t0)

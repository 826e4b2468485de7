"""The demo world: captions and labels agree with the drawn pixels; generation is seeded."""
import json
import re

import numpy as np
import pytest

from proclip_jax.data import demo_world as dw
from proclip_jax.data import pipeline, transforms
from proclip_jax.errors import ProclipError

_OBJ = re.compile(r"a (small|large) (\w+) (\w+) (in the top left|in the top right|"
                  r"in the bottom left|in the bottom right|at the top|at the bottom|"
                  r"on the left|on the right|in the center)")
_CELL = {"in the top left": 0, "at the top": 1, "in the top right": 2, "on the left": 3,
         "in the center": 4, "on the right": 5, "in the bottom left": 6, "at the bottom": 7,
         "in the bottom right": 8}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return dw.generate_demo_world(tmp_path_factory.mktemp("demo") / "w", n_train=40, n_test=12,
                                n_classification=9, seed=1)


def test_layout_splits_and_fields(world):
  assert world.splits == {"train": 40, "retrieval_test": 12, "classification_test": 9}
  classes = json.load(open(world.classes_file))
  assert classes["classes"] == list(dw.CLASSES) and len(dw.CLASSES) == 48
  assert all("{}" in t for t in classes["templates"])
  src = pipeline.open_source(world.data_dir, "classification_test")
  assert len(src) == 9
  ex = src[0]
  assert set(ex) >= {"id", "image", "short", "long", "raw", "lang", "label"}


def test_captions_labels_and_pixels_agree(world):
  classes = json.load(open(world.classes_file))["classes"]
  checked = 0
  for split, n in world.splits.items():
    src = pipeline.open_source(world.data_dir, split)
    for i in range(n):
      ex = src[i]
      short, long_ = ex["short"].decode(), ex["long"].decode()
      pixels = transforms.decode_image(ex["image"])
      assert pixels.shape == (64, 64, 3)
      objs = _OBJ.findall(long_)
      assert 1 <= len(objs) <= 3, long_
      size, colour, shape, where = objs[0]
      assert size == "large" and short == f"{dw.article(colour)} {colour} {shape}"
      assert classes[int(ex["label"])] == f"{colour} {shape}"
      background = re.search(r"on a (\w+) background$", long_).group(1)
      assert background in dw.BACKGROUNDS
      cells = [_CELL[o[3]] for o in objs]
      assert len(set(cells)) == len(cells)
      assert cells[1:] == sorted(cells[1:])  # others in grid order
      for _, colour_k, _, where_k in objs:
        x, y = dw.cell_center(_CELL[where_k], 64)
        np.testing.assert_array_equal(pixels[int(y), int(x)], dw.COLOURS[colour_k])
      if background != "striped":  # an empty cell's centre shows the background
        empty = [c for c in range(9) if c not in cells]
        x, y = dw.cell_center(empty[0], 64)
        np.testing.assert_array_equal(pixels[int(y), int(x)], dw.BACKGROUNDS[background])
      assert ex["raw"].decode().strip()
      checked += 1
  assert checked == 61


def test_long_captions_outgrow_a_short_context():
  rng = np.random.default_rng(0)
  scenes = [dw.sample_scene(rng) for _ in range(200)]
  multi = [dw.long_caption(s) for s in scenes if len(s.objects) == 3]
  assert multi and min(len(c.split()) for c in multi) > 16
  # Two scenes with the same first object differ only after it.
  a = dw.Scene((dw.Obj("circle", "red", "large", 0), dw.Obj("star", "blue", "small", 8)),
               "white")
  b = dw.Scene((dw.Obj("circle", "red", "large", 0), dw.Obj("cross", "green", "small", 8)),
               "white")
  la, lb = dw.long_caption(a).split(), dw.long_caption(b).split()
  assert la[:8] == lb[:8] and la != lb and dw.short_caption(a) == dw.short_caption(b)


def test_seeded_and_errors(world, tmp_path):
  again = dw.generate_demo_world(tmp_path / "w", n_train=40, n_test=12, n_classification=9,
                                 seed=1)
  assert open(again.manifest).read() == open(world.manifest).read()
  other = dw.generate_demo_world(tmp_path / "w", n_train=40, n_test=12, n_classification=9,
                                 seed=2, overwrite=True)
  assert open(other.manifest).read() != open(world.manifest).read()
  with pytest.raises(ProclipError, match="already exists"):
    dw.generate_demo_world(tmp_path / "w", n_train=4, n_test=2)
  with pytest.raises(ProclipError, match="too small"):
    dw.generate_demo_world(tmp_path / "v", image_size=8)


def test_held_out_classes_leave_every_word_seen():
  held = dw.held_out_classes()
  assert len(held) == 12 and set(held) <= set(dw.CLASSES)
  kept = [c for c in dw.CLASSES if c not in held]
  for colour in dw.COLOURS:
    assert sum(c.split()[0] == colour for c in kept) >= 4, colour
  for shape in dw.SHAPES:
    assert sum(c.split()[1] == shape for c in kept) >= 4, shape


def test_narrow_train_split_and_main_largest(tmp_path):
  held = dw.held_out_classes()
  w = dw.generate_demo_world(tmp_path / "n", n_train=60, n_test=150, image_size=32, seed=3,
                             main_largest=True, train_exclude=held)
  info = json.load(open(w.classes_file))
  assert info["main_largest"] and info["train_exclude"] == list(held)
  seen_in = {}
  for split, n in w.splits.items():
    src = pipeline.open_source(w.data_dir, split)
    classes = set()
    for i in range(n):
      objs = _OBJ.findall(src[i]["long"].decode())
      assert [o[0] for o in objs] == ["large"] + ["small"] * (len(objs) - 1)
      classes |= {f"{o[1]} {o[2]}" for o in objs}
    seen_in[split] = classes
  assert not seen_in["train"] & set(held)
  assert seen_in["retrieval_test"] & set(held)  # the held-out splits keep every class
  with pytest.raises(ProclipError, match="not demo classes"):
    dw.generate_demo_world(tmp_path / "x", train_exclude=("red blob",))


def test_sample_scene_defaults_unchanged_and_sample_examples():
  # The options off draw the same numbers in the same order as the original sampler
  # (transcribed here): existing worlds and benchmarks keep their scenes.
  def original(rng):
    n = int(rng.integers(1, 4))
    cells = rng.choice(9, size=n, replace=False)
    objs = [dw.Obj(shape=dw.SHAPES[int(rng.integers(6))],
                   colour=list(dw.COLOURS)[int(rng.integers(8))],
                   size="large" if k == 0 else dw.SIZES[int(rng.integers(2))],
                   cell=int(cells[k])) for k in range(n)]
    jitter = tuple((int(rng.integers(-1, 2)), int(rng.integers(-1, 2))) for _ in range(n))
    return dw.Scene(tuple(objs), list(dw.BACKGROUNDS)[int(rng.integers(4))], jitter)
  a, b = np.random.default_rng(4), np.random.default_rng(4)
  assert [dw.sample_scene(a) for _ in range(50)] == [original(b) for _ in range(50)]
  ex = dw.sample_examples(20, seed=5, image_size=32, main_largest=True)
  again = dw.sample_examples(20, seed=5, image_size=32, main_largest=True)
  np.testing.assert_array_equal(ex["image"], again["image"])
  assert ex["short"] == again["short"] and ex["image"].shape == (20, 32, 32, 3)
  for short, label in zip(ex["short"], ex["label"]):
    assert short.split(" ", 1)[1] == dw.CLASSES[int(label)]

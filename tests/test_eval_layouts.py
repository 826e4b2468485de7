"""Zero-shot label mapping and the official layouts of Food-101, SUN397, Pets, FGVC-Aircraft.

Each test writes a tiny fake copy of a layout (a few generated images) and checks every
image's class name against a mapping written here independently of the loader: from the
folder spelling, a hand-written table, or a package's own list (tensorflow-datasets'
ImageNet WordNet ids).
"""
import json
import os

import numpy as np
import pytest
from PIL import Image

from proclip_jax.errors import ProclipError
from proclip_jax.eval import datasets as ds

SHIPPED = json.load(open(os.path.join(os.path.dirname(ds.__file__), "data", "classnames.json"),
                         encoding="utf-8"))


def _img(path, seed=0):
  os.makedirs(os.path.dirname(str(path)), exist_ok=True)
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(str(path))


def _tree(root, folders, per=2):
  for k, f in enumerate(folders):
    for j in range(per):
      _img(os.path.join(str(root), f, f"{j}.jpg"), k * per + j)


def _names_by_image(d):
  return {p: d.class_names[k] for p, k in zip(d.images, d.labels)}


def _folder_of(p):
  return os.path.basename(os.path.dirname(p))


# ------------------------------------------------------------------------ class folders

def test_numbered_folders_use_the_value_not_the_text_order(tmp_path):
  # Flowers: 1-based ids (imagelabels.mat); "10" sorts before "2" as text.
  folders = [str(i) for i in (1, 2, 3, 9, 10, 11, 102)]
  _tree(tmp_path / "flowers", folders)
  d = ds.load_image_folder(str(tmp_path / "flowers"), dataset="flowers")
  assert len(d.class_names) == 102
  for p, got in _names_by_image(d).items():
    assert got == SHIPPED["flowers"][int(_folder_of(p)) - 1], p
  # CIFAR-100: 0-based.
  folders = [str(i) for i in (0, 1, 2, 10, 11, 99)]
  _tree(tmp_path / "c100", folders)
  d = ds.load_image_folder(str(tmp_path / "c100"), dataset="cifar100")
  for p, got in _names_by_image(d).items():
    assert got == SHIPPED["cifar100"][int(_folder_of(p))], p
  # A 0 folder does not fit Flowers' 1-based ids unless first_index says so.
  _tree(tmp_path / "f0", ["0", "1", "101"])
  with pytest.raises(ProclipError, match=r"'0'.* outside 1\.\.102.*first_index"):
    ds.load_image_folder(str(tmp_path / "f0"), dataset="flowers")
  d = ds.load_image_folder(str(tmp_path / "f0"), dataset="flowers", first_index=0)
  for p, got in _names_by_image(d).items():
    assert got == SHIPPED["flowers"][int(_folder_of(p))], p


def test_folders_named_after_classes_in_any_order(tmp_path):
  # Stanford Cars folders spelt by users: case, underscores, '/' written as '-'.
  chosen = {"AM_General_Hummer_SUV_2000": "AM General Hummer SUV 2000",
            "bmw m3 coupe 2012": "BMW M3 Coupe 2012",
            "Ram C-V Cargo Van Minivan 2012": "Ram C/V Cargo Van Minivan 2012",
            "smart_fortwo_Convertible_2012": "smart fortwo Convertible 2012",
            "Acura TL Sedan 2012": "Acura TL Sedan 2012"}
  _tree(tmp_path / "cars", list(chosen))
  d = ds.load_image_folder(str(tmp_path / "cars"), dataset="cars")
  assert d.class_names == SHIPPED["cars"]
  for p, got in _names_by_image(d).items():
    assert got == chosen[_folder_of(p)], p
  # Flowers folders named by their classes: official label order differs from sorted order.
  picks = ["pink primrose", "sunflower", "bougainvillea", "hard-leaved pocket orchid"]
  _tree(tmp_path / "fl", [n.replace(" ", "_") for n in picks])
  d = ds.load_image_folder(str(tmp_path / "fl"), dataset="flowers")
  for p, got in _names_by_image(d).items():
    assert got == _folder_of(p).replace("_", " ")
    assert d.labels[d.images.index(p)] == SHIPPED["flowers"].index(got)


def test_imagenet_wordnet_ids(tmp_path):
  import tensorflow_datasets as tfds  # the package's own wnid list, read independently
  labels = os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012", "labels.txt")
  wnids = [l.strip() for l in open(labels, encoding="utf-8") if l.strip()]
  picks = [wnids[i] for i in (0, 1, 151, 207, 999, 500)]
  _tree(tmp_path / "imagenet" / "val", picks, per=1)
  d = ds.load("imagenet", str(tmp_path))
  for p, got in _names_by_image(d).items():
    assert got == SHIPPED["imagenet"][wnids.index(_folder_of(p))], p
  assert {_folder_of(p): n for p, n in _names_by_image(d).items()}["n01440764"] == "tench"


def test_caltech101_official_folders(tmp_path):
  want = {"BACKGROUND_Google": "background", "Faces": "off-center face",
          "Faces_easy": "centered face", "Leopards": "leopard", "airplanes": "airplane",
          "yin_yang": "yin and yang symbol", "car_side": "side of a car"}
  _tree(tmp_path / "cal", list(want), per=1)
  d = ds.load_image_folder(str(tmp_path / "cal"), dataset="caltech101")
  assert len(d.class_names) == 102
  for p, got in _names_by_image(d).items():
    assert got == want[_folder_of(p)], p
  # Without BACKGROUND_Google the shipped 'background' class is dropped.
  _tree(tmp_path / "cal101", [f for f in want if f != "BACKGROUND_Google"], per=1)
  d = ds.load_image_folder(str(tmp_path / "cal101"), dataset="caltech101")
  assert len(d.class_names) == 101 and d.class_names[0] == "off-center face"
  for p, got in _names_by_image(d).items():
    assert got == want[_folder_of(p)], p


def test_unmappable_folders_are_refused_with_the_fix(tmp_path):
  _tree(tmp_path / "pets", ["Abyssinian", "corgi", "dachshund"], per=1)
  with pytest.raises(ProclipError) as e:
    ds.load_image_folder(str(tmp_path / "pets"), dataset="pets")
  msg = str(e.value)
  assert "'corgi', 'dachshund'" in msg and "classes.txt" in msg and "2 of 3" in msg
  # Given class names that are not the folder names: refused, not matched by position.
  with pytest.raises(ProclipError, match="match no class name"):
    ds.load_image_folder(str(tmp_path / "pets"), class_names=["a", "b", "c"])
  # Integer folders without class names have nothing to prompt with.
  _tree(tmp_path / "nums", ["0", "1"], per=1)
  with pytest.raises(ProclipError, match="are numbers"):
    ds.load_image_folder(str(tmp_path / "nums"))


def test_index_file(tmp_path):
  root = tmp_path / "mine"
  _tree(root, ["b", "a", "c"], per=1)
  (root / "classes.txt").write_text("c\nb\na\n")
  d = ds.load_image_folder(str(root), class_names=["cat", "bird", "ant"])
  assert {_folder_of(p): n for p, n in _names_by_image(d).items()} == {
      "c": "cat", "b": "bird", "a": "ant"}
  (root / "classes.txt").write_text('a,"ant, red"\nb,bee\nc,cow\n')
  d = ds.load_image_folder(str(root))
  assert {_folder_of(p): n for p, n in _names_by_image(d).items()} == {
      "a": "ant, red", "b": "bee", "c": "cow"}
  (root / "classes.txt").write_text("a\nb\n")
  with pytest.raises(ProclipError, match="'c'.* not listed"):
    ds.load_image_folder(str(root))
  # A classes.txt beside test/ serves the test/ folder (load_classification).
  top = tmp_path / "set"
  _tree(top / "test", ["x", "y"], per=1)
  (top / "classes.txt").write_text("y,yak\nx,xerus\n")
  d = ds.load_classification(str(top))
  assert {_folder_of(p): n for p, n in _names_by_image(d).items()} == {"x": "xerus",
                                                                        "y": "yak"}


# ------------------------------------------------------------------------ official layouts

def test_food101_layout(tmp_path):
  base = tmp_path / "food-101"
  folders = ["apple_pie", "waffles", "beef_tartare", "bibimbap"]
  lines = []
  for k, f in enumerate(folders):
    for j in range(2):
      image_id = str(1000 + 10 * k + j)
      _img(base / "images" / f / f"{image_id}.jpg", k + j)
      lines.append(f"{f}/{image_id}")
  os.makedirs(base / "meta")
  (base / "meta" / "test.txt").write_text("\n".join(lines) + "\n")
  (base / "meta" / "classes.txt").write_text("\n".join(sorted(folders)) + "\n")
  for d in (ds.load("food101", str(tmp_path)), ds.load_food101(str(base))):
    assert d.class_names == SHIPPED["food101"] and len(d.images) == 8
    for p, got in _names_by_image(d).items():
      assert got == _folder_of(p).replace("_", " "), p
  os.remove(base / "images" / "waffles" / "1010.jpg")
  with pytest.raises(ProclipError, match="1 of 8 images are missing"):
    ds.load_food101(str(tmp_path))


SUN = {"/a/abbey": "abbey", "/a/apartment_building/outdoor": "apartment building outdoor",
       "/b/bakery/shop": "bakery shop", "/y/youth_hostel": "youth hostel"}


def _sun(tmp_path, partitions):
  base = tmp_path / "SUN397"
  classes = list(SUN)
  (tmp_path / "SUN397").mkdir()
  (base / "ClassName.txt").write_text("\n".join(classes) + "\n")
  test = []
  for k, c in enumerate(classes):
    for j in range(3):
      rel = f"{c}/sun_{k}{j}.jpg"
      _img(str(base) + rel, k * 3 + j)
      if j < 2:
        test.append(rel)
  if partitions:
    (tmp_path / "Partitions").mkdir()
    (tmp_path / "Partitions" / "Testing_01.txt").write_text("\n".join(test) + "\n")
  return base


def test_sun397_partitions_layout(tmp_path):
  _sun(tmp_path, partitions=True)
  d = ds.load("sun397", str(tmp_path))
  assert len(d.images) == 8 and d.class_names == SHIPPED["sun397"]
  for p, got in _names_by_image(d).items():
    cls = os.path.dirname(p).split("SUN397", 1)[1]
    assert got == SUN[cls], p


def test_sun397_classname_layout(tmp_path):
  base = _sun(tmp_path, partitions=False)
  d = ds.load_sun397(str(base))
  assert len(d.images) == 12
  for p, got in _names_by_image(d).items():
    assert got == SUN[os.path.dirname(p).split("SUN397", 1)[1]], p


# Official Oxford-IIIT Pets CLASS-IDs (1-based, case-insensitive alphabetical breeds).
PET_IDS = {"Abyssinian": 1, "american_bulldog": 2, "Bengal": 6, "german_shorthaired": 15,
           "saint_bernard": 29, "Sphynx": 34, "yorkshire_terrier": 37}


def _pets(tmp_path, rows_extra=()):
  base = tmp_path / "oxford-iiit-pet"
  rows = []
  for breed, cid in PET_IDS.items():
    species = 1 if breed[0].isupper() else 2
    for j in (1, 2):
      stem = f"{breed}_{100 + j}"
      _img(base / "images" / f"{stem}.jpg", cid + j)
      rows.append(f"{stem} {cid} {species} {cid}")
  os.makedirs(base / "annotations", exist_ok=True)
  (base / "annotations" / "test.txt").write_text("\n".join(rows + list(rows_extra)) + "\n")
  return base


def test_pets_layout(tmp_path):
  _pets(tmp_path)
  for d in (ds.load("pets", str(tmp_path)), ds.load("vtab/pets", str(tmp_path))):
    assert d.class_names == SHIPPED["pets"] and len(d.images) == 14
    for p, k in zip(d.images, d.labels):
      breed = os.path.basename(p).rsplit("_", 1)[0]
      assert d.class_names[k].lower() == breed.replace("_", " ").lower(), p
      assert k == PET_IDS[breed] - 1                 # the 1-based CLASS-ID


def test_pets_conflicting_class_id_is_refused(tmp_path):
  base = _pets(tmp_path, rows_extra=["Bengal_999 1 1 1"])
  _img(base / "images" / "Bengal_999.jpg")
  with pytest.raises(ProclipError, match="CLASS-ID 1 is given to breeds"):
    ds.load_pets(str(tmp_path))


def test_aircraft_layout(tmp_path):
  data = tmp_path / "fgvc-aircraft-2013b" / "data"
  variants = ["F-16A/B", "707-320", "Cessna 172", "BAE 146-200", "Yak-42"]
  os.makedirs(data)
  (data / "variants.txt").write_text("\n".join(variants) + "\n")
  rows, want = [], {}
  for k, v in enumerate(variants):
    for j in range(2):
      image_id = f"{k:04d}{j:03d}"
      _img(data / "images" / f"{image_id}.jpg", k + j)
      rows.append(f"{image_id} {v}")
      want[image_id] = v
  (data / "images_variant_test.txt").write_text("\n".join(rows) + "\n")
  for d in (ds.load("aircraft", str(tmp_path)), ds.load("fgvc_aircraft", str(tmp_path))):
    assert d.class_names == SHIPPED["aircraft"] and len(d.images) == 10
    for p, got in _names_by_image(d).items():
      assert got == want[os.path.splitext(os.path.basename(p))[0]], p
  (data / "images_variant_test.txt").write_text("0000000 Concorde\n")
  with pytest.raises(ProclipError, match="'Concorde' is not in"):
    ds.load_aircraft(str(tmp_path))


def test_prepare_with_trainer_defaults_and_user_files(tmp_path):
  """The trainer passes config.evals.NAME (TRAINER_SETTINGS defaults: empty strings, 0)."""
  from proclip_jax.eval import evaluators as ev  # pylint: disable=import-outside-toplevel
  _pets(tmp_path)
  settings = dict(ev.TRAINER_SETTINGS, path=str(tmp_path), limit=3)
  d = ev.prepare(ev.parse_spec("pets"), settings)
  assert len(d.images) == 3 and d.class_names == SHIPPED["pets"]
  (tmp_path / "t.json").write_text(json.dumps({"vtab/pets": ["a photo of a {c}, a pet."]}))
  (tmp_path / "n.txt").write_text("\n".join(n.upper() for n in SHIPPED["pets"]) + "\n")
  d = ev.prepare(ev.parse_spec("pets"), dict(settings, templates=str(tmp_path / "t.json"),
                                              classnames=str(tmp_path / "n.txt")))
  assert d.templates == ["a photo of a {}, a pet."] and d.class_names[0] == "ABYSSINIAN"
  for p, k in zip(d.images, d.labels):
    assert k == PET_IDS[os.path.basename(p).rsplit("_", 1)[0]] - 1
  with pytest.raises(ProclipError, match="no entry for 'flowers'"):
    ev.prepare(ev.parse_spec("flowers"), {"templates": str(tmp_path / "t.json"),
                                          "data_root": str(tmp_path)})

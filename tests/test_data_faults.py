"""Data and tool faults that used to pass silently or end in a traceback (issue #24 items 4, 7,
8, 10): each ends in a correct result, a counted skip in the ingest report, or one
ProclipError (exit 2 and one line from a tool) with nothing lost.
"""
import errno
import importlib.util
import io
import json
import os
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from proclip_jax.data import builder, paths, pipeline
from proclip_jax.errors import ProclipError

from tests.test_data import _write_tar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png(seed):
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), np.uint8)).save(
      buf, "PNG")
  return buf.getvalue()


def _members(keys):
  return [m for k in keys for m in ((f"{k}.png", _png(int(k))), (f"{k}.txt", f"cap {k}".encode()))]


def _tool(name):
  spec = importlib.util.spec_from_file_location(f"{name}_cli",
                                                os.path.join(ROOT, "tools", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.main


def _cli_error(capsys, main, argv, *needles):
  rc = main(argv)
  err = capsys.readouterr().err
  assert rc == 2, err
  assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
  for n in needles:
    assert n in err, (n, err)
  return err


def _build(src, out, **kw):
  return builder.build_dataset(src, out, progress=False, **kw)


def _nothing_written(folder, out):
  assert not os.path.exists(out)
  assert not [p for p in os.listdir(folder) if p.startswith(".")], os.listdir(folder)


# ------------------------------------------------------------------------ tar shards (4, 8)

def test_truncated_or_damaged_shard_is_refused(tmp_path, capsys):
  whole = tmp_path / "whole.tar"
  _write_tar(whole, _members(["000", "001", "002", "003"]))
  data = whole.read_bytes()
  with tarfile.open(whole) as tf:
    offsets = {m.name: m.offset for m in tf.getmembers()}
  cases = {
      # Cut where member 003.png starts: tarfile reads 3 examples and reports a clean end.
      "boundary": (data[:offsets["003.png"]], "truncated: it ends without the tar "
                   "end-of-archive marker: 3 examples were read up to key 002"),
      "member": (data[:offsets["003.png"] + 700], "cut inside a member"),
      "header": (data[:offsets["003.png"]] + b"garbage!" * 64 + bytes(1024),
                 f"damaged: the tar header at byte {offsets['003.png']} cannot be read"),
  }
  for name, (cut, needle) in cases.items():
    shards = tmp_path / name
    shards.mkdir()
    (shards / "00000.tar").write_bytes(data)
    (shards / "00001.tar").write_bytes(cut)
    with pytest.raises(ProclipError, match="00001.tar") as e:
      _build(shards, tmp_path / f"ds_{name}")
    assert needle in str(e.value), str(e.value)
    _nothing_written(tmp_path, tmp_path / f"ds_{name}")
  _cli_error(capsys, _tool("build_dataset"), [str(tmp_path / "boundary"),
                                              str(tmp_path / "o"), "--no-progress"],
             "truncated", "00001.tar")
  # The whole shard still builds (the end-of-archive check accepts tarfile's own output).
  (tmp_path / "good").mkdir()
  (tmp_path / "good" / "0.tar").write_bytes(data)
  assert _build(tmp_path / "good", tmp_path / "ds").num_examples == {"train": 4}


def test_duplicate_shard_keys_are_skipped_and_counted(tmp_path):
  shards = tmp_path / "shards"
  shards.mkdir()
  _write_tar(shards / "0.tar", _members(["000", "001"]) + _members(["000"]))  # 000 again
  _write_tar(shards / "1.tar", _members(["001", "002"]))  # 001 again, in another shard
  r = _build(shards, tmp_path / "ds")
  assert r.num_examples == {"train": 3} and r.num_skipped == 2
  assert r.report["by_reason"] == {"duplicate key": 2}
  dups = [(s["id"], s["detail"]) for s in r.report["skipped_examples"]]
  assert [d[0] for d in dups] == [2, 3]
  assert "key 000 appears again" in dups[0][1] and "0.tar:000" in dups[0][1]
  assert "key 001 appears again" in dups[1][1] and "0.tar:001" in dups[1][1]
  src = pipeline.open_source(tmp_path / "ds", "train")
  assert [(int(src[i]["id"]), src[i]["key"].decode()) for i in range(3)] == [
      (0, "000"), (1, "001"), (4, "002")]


# ------------------------------------------------------------------------ CSV manifests (4, 8)

def test_csv_unclosed_quote_is_refused_with_its_lines(tmp_path, capsys):
  (tmp_path / "a.png").write_bytes(_png(0))
  for name, text in {
      "eof": 'image,caption\na.png,one\na.png,"two unclosed\na.png,three\na.png,four\n',
      "later": 'image,caption\na.png,one\na.png,"two unclosed\na.png,three\na.png,"four, x"\n'
               'a.png,five\n'}.items():
    (tmp_path / f"{name}.csv").write_text(text)
    with pytest.raises(ProclipError, match=r"row starting on line 3 does not end before "
                                           r"line 5.*swallow 2 lines") as e:
      _build(tmp_path / f"{name}.csv", tmp_path / "ds")
    assert f"{name}.csv" in str(e.value)
    _nothing_written(tmp_path, tmp_path / "ds")
  _cli_error(capsys, _tool("build_dataset"), [str(tmp_path / "eof.csv"), str(tmp_path / "o")],
             "line 3", "eof.csv")


def test_csv_rows_the_parser_rejects_are_counted_with_their_line(tmp_path):
  (tmp_path / "a.png").write_bytes(_png(0))
  long = "x" * (200 * 1024)  # over the csv module's field size limit (128 KiB)
  (tmp_path / "m.csv").write_text(
      "image,caption\n"
      "a.png,one\n"
      f"a.png,{long}\n"
      'a.png,"quoted" then text\n'
      'a.png,"multi\nline, with a comma"\n'  # a properly quoted field may hold newlines
      'a.png,He said "hi"\n'  # a quote inside an unquoted field is text
      "a.png,last\n")
  r = _build(tmp_path / "m.csv", tmp_path / "ds")
  assert r.num_examples == {"train": 4} and r.num_skipped == 2
  skipped = {s["id"]: (s["reason"], s["detail"]) for s in r.report["skipped_examples"]}
  assert skipped[1][0] == skipped[2][0] == "bad manifest row"
  assert skipped[1][1].startswith("line 3: field larger than field limit"), skipped
  assert skipped[2][1].startswith("line 4: "), skipped
  src = pipeline.open_source(tmp_path / "ds", "train")
  assert [src[i]["caption"].decode() for i in range(4)] == [
      "one", "multi\nline, with a comma", 'He said "hi"', "last"]
  assert [int(src[i]["id"]) for i in range(4)] == [0, 3, 4, 5]


# ------------------------------------------------------------------------ ids (8)

def test_id_beyond_int64_is_skipped_and_counted(tmp_path):
  (tmp_path / "a.png").write_bytes(_png(0))
  rows = [{"image": "a.png", "caption": "big", "id": 2 ** 63},
          {"image": "a.png", "caption": "max", "id": 2 ** 63 - 1},
          {"image": "a.png", "caption": "min", "id": str(-2 ** 63)},
          {"image": "a.png", "caption": "small", "id": str(-2 ** 63 - 1)},
          {"image": "a.png", "caption": "label", "id": 7, "label": 10 ** 30}]
  (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  r = _build(tmp_path / "m.jsonl", tmp_path / "ds")
  assert r.num_examples == {"train": 2} and r.report["by_reason"] == {"bad int field": 3}
  details = sorted(s["detail"] for s in r.report["skipped_examples"])
  assert all("does not fit int64" in d for d in details), details
  src = pipeline.open_source(tmp_path / "ds", "train")
  assert sorted(int(src[i]["id"]) for i in range(2)) == [-2 ** 63, 2 ** 63 - 1]


# ------------------------------------------------------------------------ outputs over inputs (7)

def test_check_output_apart_rules(tmp_path):
  (tmp_path / "in" / "sub").mkdir(parents=True)
  (tmp_path / "in" / "m.jsonl").write_text("")
  os.symlink(tmp_path / "in", tmp_path / "link")
  inputs = [("source", str(tmp_path / "in"))]
  for out, how in ((tmp_path / "in", "is"), (tmp_path, "contains"),
                   (tmp_path / "in" / "sub" / "o", "lies inside"), (tmp_path / "link", "is"),
                   (tmp_path / "link" / "o", "lies inside")):
    with pytest.raises(ProclipError, match=f"The output {out} {how} the source"):
      paths.check_output_apart(out, inputs)
  paths.check_output_apart(tmp_path / "other", inputs)
  paths.check_output_apart(tmp_path / "in2", inputs)  # a shared prefix is not a folder
  roots = [("manifest's folder", str(tmp_path / "in"))]
  paths.check_output_apart(tmp_path / "in" / "ds", [], roots)  # beside the manifest: fine
  for out in (tmp_path / "in", tmp_path, tmp_path / "link"):
    with pytest.raises(ProclipError, match="manifest's folder"):
      paths.check_output_apart(out, [], roots)
  with pytest.raises(ProclipError, match="lies inside the source gs://b/data"):
    paths.check_output_apart("gs://b/data/out", [("source", "gs://b/data/")])
  paths.check_output_apart("gs://b/data2", [("source", "gs://b/data")])


def test_overwrite_never_deletes_an_input(tmp_path, capsys):
  data = tmp_path / "data"
  (data / "img").mkdir(parents=True)
  (data / "img" / "a.png").write_bytes(_png(0))
  (data / "m.jsonl").write_text(json.dumps({"image": "img/a.png", "caption": "c"}) + "\n")
  elsewhere = tmp_path / "lists"
  elsewhere.mkdir()
  (elsewhere / "abs.jsonl").write_text(json.dumps(
      {"image": str(data / "img" / "a.png"), "caption": "c"}) + "\n")
  os.symlink(data, tmp_path / "data_link")
  shards = tmp_path / "shards"
  shards.mkdir()
  _write_tar(shards / "0.tar", _members(["000"]))
  before = sorted(str(p) for p in tmp_path.rglob("*"))
  cases = [(data / "m.jsonl", data, "contains the source"),
           (data / "m.jsonl", tmp_path, "contains the source"),
           (data / "m.jsonl", tmp_path / "data_link", "contains the source"),
           (data / "m.jsonl", data / "img", "is the image folder"),
           (elsewhere / "abs.jsonl", data, "contains the image folder"),
           (shards, shards, "is the source"),
           (shards, shards / "ds", "lies inside the source")]
  for src, out, needle in cases:
    with pytest.raises(ProclipError, match=needle):
      _build(src, out, overwrite=True)
  build = _tool("build_dataset")
  _cli_error(capsys, build, [str(data / "m.jsonl"), str(data), "--overwrite"],
             "contains the source")
  assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing deleted or written
  assert _build(data / "m.jsonl", data / "ds").num_examples == {"train": 1}  # beside: fine

  from proclip_jax.data import precompute as P  # pylint: disable=import-outside-toplevel
  model = tmp_path / "model"
  model.mkdir()
  (model / "model.json").write_text("{}")
  for out, needle in ((model, "is the model"), (model / "cache", "lies inside the model"),
                      (data / "ds", "is the dataset"), (data, "contains the dataset")):
    with pytest.raises(ProclipError, match=needle):
      P.precompute(str(data / "ds"), str(model), str(out), fields="caption", overwrite=True,
                   progress=False)
  _cli_error(capsys, _tool("precompute"), ["--data", str(data / "ds"), "--model", str(model),
                                           "--fields", "caption", "--out", str(model),
                                           "--overwrite", "--no-progress"], "is the model")
  assert (model / "model.json").read_text() == "{}"

  from proclip_jax.convert.api import convert  # pylint: disable=import-outside-toplevel
  lora = tmp_path / "lora"
  lora.mkdir()
  for out, kw, needle in ((model, {}, "is the source"), (tmp_path, {}, "contains the source"),
                          (lora / "o", {"lora": str(lora)}, "lies inside the LoRA folder")):
    with pytest.raises(ProclipError, match=needle):
      convert(str(model), str(out), overwrite=True, **kw)
  _cli_error(capsys, _tool("convert"), [str(model), str(model), "--overwrite"], "is the source")
  assert (model / "model.json").read_text() == "{}" and lora.is_dir()


# ------------------------------------------------------------------------ features.json (10)

@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("small")
  (root / "a.png").write_bytes(_png(0))
  (root / "m.jsonl").write_text(json.dumps({"image": "a.png", "caption": "c"}) + "\n")
  return _build(root / "m.jsonl", root / "ds").path


def test_features_json_naming_another_module_is_refused(small_dataset, tmp_path, monkeypatch):
  import shutil  # pylint: disable=import-outside-toplevel
  marker = tmp_path / "imported"
  mods = tmp_path / "mods"
  mods.mkdir()
  name = "proclip_test_evil_feature"
  (mods / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
  monkeypatch.syspath_prepend(str(mods))
  monkeypatch.delitem(sys.modules, name, raising=False)
  evil = f"{name}.Evil"

  ds = tmp_path / "ds"
  shutil.copytree(small_dataset, ds)
  feats = json.loads((ds / "features.json").read_text())
  feats["featuresDict"]["features"]["caption"]["pythonClassName"] = evil
  (ds / "features.json").write_text(json.dumps(feats))
  with pytest.raises(ProclipError, match=rf"features.json names feature classes \['{evil}'\]"):
    pipeline.open_source(ds, "train")
  ds2 = tmp_path / "ds2"  # the same feature tree inside dataset_info.json
  shutil.copytree(small_dataset, ds2)
  info = json.loads((ds2 / "dataset_info.json").read_text())
  info["features"] = {"pythonClassName": evil, "json": "{}"}
  (ds2 / "dataset_info.json").write_text(json.dumps(info))
  with pytest.raises(ProclipError, match=r"dataset_info.json names feature classes"):
    pipeline.open_builder(ds2)
  (tmp_path / "ds3").mkdir()
  (tmp_path / "ds3" / "dataset_info.json").write_text('{"name": "x", "spl')
  with pytest.raises(ProclipError, match="dataset_info.json is not valid JSON"):
    pipeline.open_source(tmp_path / "ds3", "train")
  (tmp_path / "ds3" / "dataset_info.json").write_text("[]")
  with pytest.raises(ProclipError, match=r"dataset_info.json is not valid JSON \(a JSON list"):
    pipeline.open_source(tmp_path / "ds3", "train")
  ds4 = tmp_path / "ds4"
  shutil.copytree(small_dataset, ds4)
  (ds4 / "features.json").unlink()
  with pytest.raises(ProclipError, match="has no features.json"):
    pipeline.open_source(ds4, "train")
  from proclip_jax.data.cache import dataset_fingerprint  # pylint: disable=import-outside-toplevel
  with pytest.raises(ProclipError, match="names feature classes"):
    dataset_fingerprint(str(ds), "train")  # what a cache check reads
  ds5 = tmp_path / "ds5"
  shutil.copytree(small_dataset, ds5)
  (ds5 / "ingest_report.json").write_text('{"splits": ')
  with pytest.raises(ProclipError, match="ingest_report.json is damaged"):
    dataset_fingerprint(str(ds5), "train")
  assert not marker.exists() and name not in sys.modules
  assert len(pipeline.open_source(small_dataset, "train")) == 1  # our own features pass

  # The threat is real: tfds itself imports the module while it opens the folder.
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  with pytest.raises(Exception):  # noqa: B017  (Evil is no feature class)
    tfds.builder_from_directory(str(ds))
  assert marker.exists()


# ------------------------------------------------------------------------ one line, not a traceback (8)

@pytest.fixture(scope="module")
def text_clip():
  """A tiny random CLIP text tower as precompute runs it (built in memory: one compile)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from proclip_jax.data import precompute as P  # pylint: disable=import-outside-toplevel
  from proclip_jax.models.clip import CLIPConfig, abstract_params  # pylint: disable=import-outside-toplevel
  from proclip_jax.models.clip_text import TextConfig  # pylint: disable=import-outside-toplevel
  cfg = CLIPConfig(vision=None, text=TextConfig(context_length=16, width=16, layers=1, heads=2,
                                                embed_dim=8))
  rng = np.random.default_rng(1)  # random weights drawn on the host: no init to compile
  params = jax.tree.map(lambda a: rng.normal(0, 0.2, a.shape).astype(np.float32),
                        nn.unbox(abstract_params(cfg)))
  return P._clip_model("clip", {"config": cfg.to_dict()}, params, None, "float32")  # pylint: disable=protected-access


def _files(folder):
  return {p: open(os.path.join(folder, p), "rb").read() for p in sorted(os.listdir(folder))}


def test_disk_full_while_writing_a_cache_then_rerun(text_clip, tmp_path, monkeypatch):
  from proclip_jax.data import cache as C  # pylint: disable=import-outside-toplevel
  from proclip_jax.data import precompute as P  # pylint: disable=import-outside-toplevel
  ids = np.arange(20, 32)
  caps = {"short": [f"caption {i}" for i in range(12)]}
  kw = dict(dataset={"fingerprint": "t", "split": "train", "path": None}, dtype="float32",
            batch_size=4, unit_size=8, progress=False)
  ref = P.precompute_captions(ids, caps, text_clip, str(tmp_path / "ref"), **kw)

  def full(f, *args, **kwargs):  # writes a little, then the disk is full
    del args, kwargs
    f.write(b"\x93NUMPY partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  real_save = np.save
  calls = []

  def save(f, *args, **kwargs):
    calls.append(1)
    return (full if len(calls) == 2 else real_save)(f, *args, **kwargs)

  out = str(tmp_path / "cache")
  # First the second unit's part file, then (that unit redone) the merged array.
  for where, patch in (("unit", (np, "save", save)),
                       ("merge", (np.lib.format, "write_array_header_1_0", full))):
    monkeypatch.setattr(*patch)
    with pytest.raises(ProclipError, match=r"Cannot write .*No space left on device.*run the "
                                           r"same command again"):
      P.precompute_captions(ids, caps, text_clip, out, **kw)
    monkeypatch.undo()
    left = [p for p in os.listdir(out) + os.listdir(os.path.join(out, C.PARTS_DIR))
            if ".tmp-" in p]
    assert left == [] and not os.path.exists(os.path.join(out, C.MANIFEST)), where
    with pytest.raises(ProclipError, match="not a complete embedding cache"):
      C.CacheReader(out)
  P.precompute_captions(ids, caps, text_clip, out, **kw)  # the same command again
  assert _files(out) == _files(ref)


def test_disk_full_while_building_a_dataset_then_rerun(tmp_path, monkeypatch):
  (tmp_path / "a.png").write_bytes(_png(0))
  (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.png", "caption": "c"}) + "\n")
  real = builder._prepare_quietly  # pylint: disable=protected-access
  # What the ArrayRecord writer raises when the disk fills as it closes a shard, and a plain
  # OSError (a JSON file of tfds).
  for err in (RuntimeError('Failed to finalize writing of split "train": write() failed: No '
                           'space left on device; writing x; at byte 32768'),
              OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))):

    def full(b, err=err):
      real(b)
      raise err

    monkeypatch.setattr(builder, "_prepare_quietly", full)
    with pytest.raises(ProclipError, match=r"Writing .*ds failed \(.*No space left on device.*"
                                           r"nothing was kept"):
      _build(tmp_path / "m.jsonl", tmp_path / "ds")
    _nothing_written(tmp_path, tmp_path / "ds")
  monkeypatch.undo()
  assert _build(tmp_path / "m.jsonl", tmp_path / "ds").num_examples == {"train": 1}


def test_damaged_model_json_is_one_line(tmp_path):
  from proclip_jax.data import precompute as P  # pylint: disable=import-outside-toplevel
  bad = tmp_path / "model"
  bad.mkdir()
  text = json.dumps({"kind": "clip", "config": {"text": {"width": 16}}, "params_sha256": "0"})
  (bad / "model.json").write_text(text[:len(text) // 2])
  with pytest.raises(ProclipError, match=r"model.json is damaged \(not valid JSON.*convert.py"):
    P.load_precompute_model(str(bad))
  (bad / "model.json").write_text("[1, 2]")
  with pytest.raises(ProclipError, match=r"model.json is damaged \(a JSON list"):
    P.load_precompute_model(str(bad))


def test_malformed_converter_json_is_one_line(tmp_path, capsys):
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  cases = {"cut_config": ("config.json", '{"model_type": "clip", "text_conf', "not valid JSON"),
           "list_config": ("config.json", "[1, 2]", "holds a JSON list"),
           "cut_index": ("model.safetensors.index.json", '{"weight_map": {"a": ',
                         "not valid JSON"),
           "list_index": ("model.safetensors.index.json", "[3]", "holds a JSON list")}
  convert = _tool("convert")
  for name, (fname, text, needle) in cases.items():
    src = tmp_path / name
    src.mkdir()
    if fname == "config.json":
      save_file({"x": np.zeros(2, np.float32)}, str(src / "model.safetensors"))
    (src / fname).write_text(text)
    _cli_error(capsys, convert, [str(src), str(tmp_path / f"out_{name}")], needle, fname)
    assert not os.path.exists(tmp_path / f"out_{name}")


def test_evaluate_out_into_a_missing_folder_is_one_line(tmp_path, capsys):
  _cli_error(capsys, _tool("evaluate"), ["--checkpoint", str(tmp_path), "--eval", "demo",
                                         "--out", str(tmp_path / "no" / "r.json")],
             f"the folder {tmp_path / 'no'} does not exist")

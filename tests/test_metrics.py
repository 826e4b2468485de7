"""Metrics against brute-force NumPy loops (stable descending argsort, any-caption hits).

Embeddings with small integer entries make dot products exact in float32 and float64, so
exact ties are common and both sides see the same ties.
"""
import jax
import numpy as np
import pytest

from proclip_jax.errors import ProclipError
from proclip_jax.eval import metrics


def order_desc(scores):
  return np.argsort(-scores, kind="stable")


def brute_retrieval(img, txt, t2i, ks, img_valid, txt_valid):
  vi, vt = np.flatnonzero(img_valid), np.flatnonzero(txt_valid)
  out = {}
  for k in ks:
    hits = []
    for i in vi:
      scores = np.array([float(np.dot(img[i].astype(np.float64), txt[t])) for t in vt])
      top = vt[order_desc(scores)[:k]]
      hits.append(any(t2i[t] == i for t in top))
    out[f"i2t_R@{k}"] = 100.0 * np.mean(hits)
    hits = []
    for t in vt:
      scores = np.array([float(np.dot(txt[t].astype(np.float64), img[i])) for i in vi])
      top = vi[order_desc(scores)[:k]]
      hits.append(t2i[t] in top)
    out[f"t2i_R@{k}"] = 100.0 * np.mean(hits)
  return out


def make_world(rng, n_img=23, dim=5, integer=True):
  """Images with 1..4 captions each (shuffled), duplicates, and padding rows."""
  draw = (lambda *s: rng.integers(-2, 3, size=s).astype(np.float32)) if integer else (
      lambda *s: rng.normal(size=s).astype(np.float32))
  img = draw(n_img, dim)
  img[7] = img[3]                                    # duplicated images: exact ties
  counts = rng.integers(1, 5, size=n_img)
  t2i = np.repeat(np.arange(n_img), counts)
  txt = draw(len(t2i), dim)
  txt[5] = txt[0]                                    # duplicated captions
  perm = rng.permutation(len(t2i))
  t2i, txt = t2i[perm], txt[perm]
  img_valid = np.ones(n_img, bool)
  img_valid[[4, 11]] = False                         # padded images ...
  txt_valid = ~np.isin(t2i, [4, 11])                 # ... and their captions
  t2i = np.where(txt_valid, t2i, -7)                 # garbage labels on padding rows
  return img, txt, t2i, img_valid, txt_valid


@pytest.mark.parametrize("integer", [True, False])
def test_retrieval_vs_brute_force(integer):
  rng = np.random.default_rng(3 if integer else 4)
  img, txt, t2i, iv, tv = make_world(rng, integer=integer)
  ks = (1, 2, 5, 10)
  got = metrics.retrieval_metrics(img, txt, t2i, ks, chunk=8, img_valid=iv, txt_valid=tv)
  want = brute_retrieval(img, txt, t2i, ks, iv, tv)
  assert set(got) == set(want)
  for key in want:
    assert got[key] == pytest.approx(want[key], abs=1e-9), key
  # Without masks (no padding rows): one caption per image, the long-text case.
  one = metrics.retrieval_metrics(img[:9], txt[:9], np.arange(9), (1, 3), chunk=4)
  want_one = brute_retrieval(img[:9], txt[:9], np.arange(9), (1, 3), np.ones(9, bool),
                             np.ones(9, bool))
  assert one == pytest.approx(want_one, abs=1e-9)


def test_tie_rule_lower_index_first():
  img = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)         # identical images
  txt = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)         # identical captions
  res = metrics.retrieval_metrics(img, txt, np.array([1, 0]), (1, 2))
  # i2t: every caption ties; image 0's caption is index 1 (rank 1), image 1's is index 0.
  assert res["i2t_R@1"] == 50.0 and res["i2t_R@2"] == 100.0
  assert res["t2i_R@1"] == 50.0 and res["t2i_R@2"] == 100.0
  scores, idx = metrics.top_k(txt, img, k=2)
  np.testing.assert_array_equal(np.asarray(idx), [[0, 1], [0, 1]])
  np.testing.assert_allclose(np.asarray(scores), 1.0)


def test_retrieval_on_mesh_equals_single_device():
  rng = np.random.default_rng(5)
  img, txt, t2i, iv, tv = make_world(rng, n_img=30)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  single = metrics.retrieval_metrics(img, txt, t2i, chunk=16, img_valid=iv, txt_valid=tv)
  sharded = metrics.retrieval_metrics(img, txt, t2i, chunk=5, img_valid=iv, txt_valid=tv,
                                      mesh=mesh)
  assert single == sharded
  labels = rng.integers(0, 10, size=30)
  cls = rng.normal(size=(10, 5)).astype(np.float32)
  assert (metrics.classification_metrics(img, cls, labels, chunk=7) ==
          metrics.classification_metrics(img, cls, labels, chunk=7, mesh=mesh))


def test_retrieval_errors():
  img = np.eye(3, dtype=np.float32)
  with pytest.raises(ProclipError, match="caption 1 points to image 3"):
    metrics.retrieval_metrics(img, img, np.array([0, 3, 2]))
  with pytest.raises(ProclipError, match="1 valid images have no caption"):
    metrics.retrieval_metrics(img, img[:2], np.array([0, 1]))
  with pytest.raises(ProclipError, match="marked False"):
    metrics.retrieval_metrics(img, img, np.array([0, 1, 2]), img_valid=[True, False, True])


def test_top_k_vs_argsort():
  rng = np.random.default_rng(6)
  q = rng.integers(-2, 3, size=(11, 4)).astype(np.float32)
  g = rng.integers(-2, 3, size=(17, 4)).astype(np.float32)
  valid = np.ones(17, bool)
  valid[[2, 9]] = False
  scores, idx = metrics.top_k(q, g, valid, k=5, chunk=4)
  for r in range(11):
    s = np.where(valid, g @ q[r], -np.inf)
    want = order_desc(s)[:5]
    np.testing.assert_array_equal(np.asarray(idx[r]), want)
    np.testing.assert_allclose(np.asarray(scores[r]), s[want])


def test_zero_shot_classifier_by_hand():
  emb = np.array([[[3.0, 4.0], [2.0, 0.0]],      # -> [0.6, 0.8], [1, 0] -> mean [0.8, 0.4]
                  [[0.0, 5.0], [-0.5, 0.0]]])    # -> [0, 1], [-1, 0]    -> mean [-0.5, 0.5]
  w = metrics.zero_shot_classifier(emb)
  assert w.dtype == np.float32 and w.shape == (2, 2)
  np.testing.assert_allclose(w[0], np.array([2.0, 1.0]) / np.sqrt(5.0), rtol=1e-6)
  np.testing.assert_allclose(w[1], np.array([-1.0, 1.0]) / np.sqrt(2.0), rtol=1e-6)


def test_classification_vs_brute_force():
  rng = np.random.default_rng(7)
  n, c, dim = 40, 12, 4
  img = rng.integers(-2, 3, size=(n, dim)).astype(np.float32)
  cls = rng.integers(-2, 3, size=(c, dim)).astype(np.float32)
  cls[5] = cls[2]                                           # tied classes
  labels = rng.integers(0, c, size=n)
  valid = np.ones(n, bool)
  valid[-3:] = False
  labels[-1] = 99                                           # ignored: padding
  got = metrics.classification_metrics(img, cls, labels, ks=(1, 3, 5, 12), chunk=16,
                                       valid=valid)
  for k in (1, 3, 5, 12):
    hits = [labels[i] in order_desc(100.0 * cls @ img[i])[:k] for i in range(n) if valid[i]]
    assert got[f"top{k}"] == pytest.approx(100.0 * np.mean(hits), abs=1e-9)
  assert got["top12"] == 100.0
  with pytest.raises(ProclipError, match="label 99"):
    metrics.classification_metrics(img, cls, labels)


def test_per_language():
  res = metrics.per_language({"en": {"i2t_R@1": 50.0, "t2i_R@1": 40.0},
                              "de": {"i2t_R@1": 30.0, "t2i_R@1": 10.0}})
  assert res["mean"] == {"i2t_R@1": 40.0, "t2i_R@1": 25.0}
  assert res["de"] == {"i2t_R@1": 30.0, "t2i_R@1": 10.0}
  with pytest.raises(ProclipError, match="'de'"):
    metrics.per_language({"en": {"i2t_R@1": 1.0}, "de": {"t2i_R@1": 1.0}})

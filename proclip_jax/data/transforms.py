"""CLIP image transforms in NumPy/PIL: decoding to RGB, train crops, eval crops, normalisation.

Everything here runs in grain workers on single examples and returns NumPy arrays:

* ``decode_image(bytes) -> uint8 [H, W, 3]``: any image PIL reads, converted to RGB by
  ``to_rgb`` (the same conversion the dataset builder applies on ingestion).
* ``train_transform(image, size, rng)``: torchvision's ``RandomResizedCrop`` algorithm
  (scale 0.9-1.0, aspect ratio 3/4-4/3, ten tries then a centre-crop fallback) drawn from a
  ``numpy.random.Generator``; the crop is cut out and resized to ``size x size`` with PIL
  bicubic, as torchvision does on PIL images.
* ``eval_transform(image, size)``: CLIP's preprocessing: resize the shorter side to ``size``
  (bicubic), centre crop ``size x size``.
* Both normalise with the CLIP mean/std and return float32 ``[size, size, 3]`` (HWC; a batch
  of them is NHWC). ``train_crop`` / ``resize_center_crop`` are the same geometry without
  the normalisation (uint8 out): the training pipeline sends uint8 to the devices (a
  quarter of the bytes of float32) and the jitted step normalises there with
  ``normalize_on_device``, which computes what ``normalize`` computes, in float32.
"""
import io
import math

import numpy as np
from PIL import Image

CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)

TRAIN_SCALE = (0.9, 1.0)
TRAIN_RATIO = (3 / 4, 4 / 3)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(im: Image.Image) -> Image.Image:
  """Converts a loaded PIL image of any mode to 8-bit RGB.

  Transparent images (RGBA, LA, PA, P with a transparency entry) are composited over white,
  16/32-bit integer greyscale (``I;16*``, ``I``) is scaled from the 16-bit range (divided by
  257), float greyscale (``F``) is clipped to [0, 255], CMYK/YCbCr/LAB/HSV/L/1 go through
  PIL's ``convert("RGB")``.
  """
  if im.mode == "RGB":
    return im
  if im.mode == "P" and "transparency" in im.info:
    im = im.convert("RGBA")
  if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  if im.mode in _SIXTEEN_BIT_MODES or im.mode.startswith("I;16"):
    a = np.asarray(im).astype(np.float64) / 257.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
  if im.mode == "F":
    a = np.asarray(im, np.float64)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
  return im.convert("RGB")


def open_rgb(data: bytes) -> Image.Image:
  """Decodes encoded image bytes into a loaded RGB PIL image (see ``to_rgb``)."""
  im = Image.open(io.BytesIO(data))
  im.load()
  return to_rgb(im)


def decode_image(data: bytes) -> np.ndarray:
  """Decodes encoded image bytes into an RGB uint8 array ``[H, W, 3]``."""
  return np.asarray(open_rgb(data), dtype=np.uint8)


def normalize(image: np.ndarray) -> np.ndarray:
  """uint8 RGB ``[..., 3]`` -> float32 CLIP-normalised: ``(x / 255 - mean) / std``."""
  x = np.asarray(image, np.float32) / np.float32(255.0)
  return (x - CLIP_MEAN) / CLIP_STD


def normalize_on_device(images):
  """``normalize`` inside a jitted function: uint8 ``[..., 3]`` -> float32 CLIP-normalised.

  Input that is already floating point (normalised on the host) passes through unchanged,
  so callers may hand either.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if jnp.issubdtype(images.dtype, jnp.floating):
    return images
  x = images.astype(jnp.float32) / jnp.float32(255.0)
  return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def normalize_batch(batch):
  """``batch`` with its ``image`` entry (if any) normalised by ``normalize_on_device``."""
  if "image" not in batch:
    return batch
  return {**batch, "image": normalize_on_device(batch["image"])}


def _as_pil(image) -> Image.Image:
  if isinstance(image, Image.Image):
    return to_rgb(image)
  return Image.fromarray(np.asarray(image, np.uint8), "RGB")


def random_resized_crop_params(height: int, width: int, rng: np.random.Generator,
                               scale=TRAIN_SCALE, ratio=TRAIN_RATIO) -> tuple[int, int, int, int]:
  """torchvision's ``RandomResizedCrop.get_params`` with a NumPy generator.

  Returns ``(top, left, crop_height, crop_width)``: up to ten tries of a random area fraction
  in ``scale`` and a log-uniform aspect ratio (width / height) in ``ratio``; if none fits,
  the largest centred crop whose ratio is clamped into ``ratio``.
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def crop_resize(image, top: int, left: int, height: int, width: int, size: int) -> np.ndarray:
  """Cuts ``[top:top+height, left:left+width]`` and resizes it to ``size x size`` (bicubic).

  Returns uint8 ``[size, size, 3]``.
  """
  im = _as_pil(image).crop((left, top, left + width, top + height))
  return np.asarray(im.resize((size, size), Image.BICUBIC), np.uint8)


def train_transform(image, size: int, rng: np.random.Generator, *, scale=TRAIN_SCALE,
                    ratio=TRAIN_RATIO) -> np.ndarray:
  """Random resized crop (torchvision algorithm), bicubic resize, CLIP normalisation.

  Args:
    image: RGB uint8 ``[H, W, 3]`` array or a PIL image.
    size: output side in pixels.
    rng: the generator the crop is drawn from (seed it per example for determinism).
    scale: range of the crop's area as a fraction of the image's.
    ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.

  Returns:
    float32 ``[size, size, 3]``.
  """
  return normalize(train_crop(image, size, rng, scale=scale, ratio=ratio))


def train_crop(image, size: int, rng: np.random.Generator, *, scale=TRAIN_SCALE,
               ratio=TRAIN_RATIO) -> np.ndarray:
  """``train_transform`` without the normalisation: uint8 ``[size, size, 3]``."""
  im = _as_pil(image)
  top, left, h, w = random_resized_crop_params(im.height, im.width, rng, scale, ratio)
  return crop_resize(im, top, left, h, w, size)


def resize_center_crop(image, size: int) -> np.ndarray:
  """CLIP eval geometry: shorter side to ``size`` (bicubic), centre crop; uint8 out."""
  im = _as_pil(image)
  w, h = im.size
  if w <= h:
    new_w, new_h = size, int(size * h / w)
  else:
    new_w, new_h = int(size * w / h), size
  if (new_w, new_h) != (w, h):
    im = im.resize((new_w, new_h), Image.BICUBIC)
  top = int(round((new_h - size) / 2.0))
  left = int(round((new_w - size) / 2.0))
  return np.asarray(im.crop((left, top, left + size, top + size)), np.uint8)


def eval_transform(image, size: int) -> np.ndarray:
  """Resize shorter side + centre crop + CLIP normalisation; float32 ``[size, size, 3]``."""
  return normalize(resize_center_crop(image, size))

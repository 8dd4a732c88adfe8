"""A person's own picture, made ready for a scene: upright, in sRGB, cover-fitted.

The picture is decoded once to a full-resolution RGB array that is upright (EXIF
orientation applied) and in sRGB (its ICC profile converted with LittleCMS). The fit
to the `[image]` size is then a rectangle on that array, never a second picture:

- `FittedPicture.image()` is the scene's PNG, resampled once (Lanczos) from the array.
- `FittedPicture.clip_source(w, h)` is the part of the array that a w x h clip frames,
  for the Ken Burns renderer, so the clip too samples the original pixels (a zoom-in
  stays sharp instead of magnifying the PNG).

Scaled to cover, centre-cropped, never stretched, and no finishing: it is the user's
picture. Only formats Pillow decodes natively and safely are opened (no Ghostscript
behind EPS, no plugins by content sniffing); over `PIL.Image.MAX_IMAGE_PIXELS` is refused.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import (  # the decoders FORMATS names, registered with Image.open by importing them
    BmpImagePlugin,  # noqa: F401
    GifImagePlugin,  # noqa: F401
    Image,
    ImageCms,
    ImageOps,
    JpegImagePlugin,  # noqa: F401
    PngImagePlugin,  # noqa: F401
    TiffImagePlugin,  # noqa: F401
    UnidentifiedImageError,
    WebPImagePlugin,  # noqa: F401
)

# What a bundle's picture may be: Pillow's own decoders for everyday formats (JPEG includes
# MPO, the JPEG flavour many phones and cameras write).
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
FORMATS_SHOWN = "PNG, JPEG, WebP, GIF, BMP or TIFF"

Box = tuple[float, float, float, float]  # left, top, right, bottom in source pixels (edges)


class PictureError(ValueError):
    """A picture that cannot be used; the message says why, without any path (the caller names it)."""


@dataclass(frozen=True)
class PictureInfo:
    """What a check learned: the upright size, the format, whether a colour profile came with it."""

    width: int
    height: int
    format: str
    mode: str
    icc_profile: bool


def pixel_limit() -> int:
    """Pillow's decompression-bomb limit as configured in this process (read, never changed)."""
    return int(Image.MAX_IMAGE_PIXELS or 0)


def _open(path: Path) -> Image.Image:
    """Opened, size checked against Pillow's limit, and every pixel decoded (truncation shows)."""
    try:
        im = Image.open(path, formats=FORMATS)
    except Image.DecompressionBombError as err:  # past twice the limit: Pillow will not even open it
        raise PictureError(
            f"is over Pillow's limit of {pixel_limit()} pixels (PIL.Image.MAX_IMAGE_PIXELS): {err}"
        ) from None
    except UnidentifiedImageError:
        raise PictureError(f"is not a picture storyreel reads ({FORMATS_SHOWN})") from None
    except Exception as err:  # a decoder tripping over a stranger's bytes: the picture's fault
        raise PictureError(f"cannot be read ({_said(err)})") from None
    limit = pixel_limit()
    w, h = im.size
    if limit and w * h > limit:
        im.close()
        raise PictureError(
            f"is {w}x{h} = {w * h} pixels, over Pillow's limit of {limit} pixels (PIL.Image.MAX_IMAGE_PIXELS)"
        )
    try:
        im.load()
    except Exception as err:  # OSError("image file is truncated"), SyntaxError, ValueError, ...
        im.close()
        raise PictureError(f"is damaged or truncated ({_said(err)})") from None
    return im


def _said(err: Exception) -> str:
    return str(err) or type(err).__name__


def _eight_bit(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float greyscale (PNG, TIFF) to 8-bit, scaled rather than clipped."""
    arr = np.asarray(im, dtype=np.float64)
    peak = float(arr.max(initial=0.0))
    if im.mode == "F":
        top = 1.0 if peak <= 1.0 else 255.0
    else:
        top = 65535.0 if im.mode.startswith("I;16") or peak > 255.0 else 255.0
    return Image.fromarray(np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8))


def _split_alpha(im: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """The colour bands in a mode LittleCMS converts (L, RGB, CMYK), and the alpha band if any."""
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        im = _eight_bit(im)
    if im.mode == "1":
        im = im.convert("L")
    if im.mode in ("LA", "La", "RGBA", "RGBa"):
        alpha = im.getchannel("A")
        return im.convert("L" if im.mode.startswith("L") else "RGB"), alpha
    if im.mode not in ("L", "RGB", "CMYK"):
        im = im.convert("RGB")
    return im, None


def _to_srgb(im: Image.Image, icc: bytes | None) -> Image.Image:
    if not icc:
        return im.convert("RGB")
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        out = ImageCms.profileToProfile(im, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as err:
        raise PictureError(f"has a colour profile that cannot be converted to sRGB ({err})") from None
    assert out is not None  # not in place
    return out


def upright_srgb(im: Image.Image) -> np.ndarray:
    """An opened picture as an upright sRGB HxWx3 uint8 array; transparency composited over black."""
    icc = im.info.get("icc_profile") or None
    upright = ImageOps.exif_transpose(im)
    colour, alpha = _split_alpha(upright)
    rgb = _to_srgb(colour, icc)
    if alpha is not None:
        black = Image.new("RGB", rgb.size, (0, 0, 0))
        rgb = Image.composite(rgb, black, alpha)
    return np.asarray(rgb)


def _upright(im: Image.Image) -> np.ndarray:
    try:
        return upright_srgb(im)
    except PictureError:
        raise
    except Exception as err:  # EXIF or a mode a stranger's file got wrong
        raise PictureError(f"cannot be turned upright and into sRGB ({_said(err)})") from None


def load_picture(path: Path) -> np.ndarray:
    """The picture at `path`, upright and in sRGB, at full resolution; PictureError if it cannot be."""
    with _open(Path(path)) as im:
        return _upright(im)


def check_picture(path: Path) -> PictureInfo:
    """Everything `load_picture` would do, kept: a picture that passes here fits later."""
    with _open(Path(path)) as im:
        fmt, mode, icc = im.format or "?", im.mode, bool(im.info.get("icc_profile"))
        h, w = _upright(im).shape[:2]
    return PictureInfo(width=w, height=h, format=fmt, mode=mode, icc_profile=icc)


def cover_box(src_w: float, src_h: float, out_w: int, out_h: int) -> Box:
    """The centred region of a src_w x src_h picture that fills out_w x out_h when scaled to
    cover it: the whole width or the whole height, never stretched. Edges in source pixels."""
    if min(src_w, src_h, out_w, out_h) <= 0:
        raise ValueError(f"sizes must be positive: {src_w}x{src_h} -> {out_w}x{out_h}")
    scale = max(out_w / src_w, out_h / src_h)
    w, h = out_w / scale, out_h / scale
    left, top = (src_w - w) / 2.0, (src_h - h) / 2.0
    return (left, top, left + w, top + h)


@dataclass(frozen=True)
class FittedPicture:
    """A picture and the rectangle of it that a width x height scene shows."""

    rgb: np.ndarray  # HxWx3 uint8: upright, sRGB, full resolution
    width: int  # the scene's size ([image] width x height)
    height: int
    box: Box  # cover_box of rgb for width x height

    def image(self) -> Image.Image:
        """The scene's picture, width x height, resampled once (Lanczos) from the original pixels."""
        source = Image.fromarray(self.rgb)
        return source.resize((self.width, self.height), Image.Resampling.LANCZOS, box=self.box)

    def clip_box(self, width: int, height: int) -> Box:
        """The region a width x height clip frames at rest: the cover fit of the scene's own
        region, as a generated scene's clip is the cover fit of its PNG."""
        left, top, right, bottom = self.box
        x0, y0, x1, y1 = cover_box(right - left, bottom - top, width, height)
        return (left + x0, top + y0, left + x1, top + y1)

    def clip_source(self, width: int, height: int) -> np.ndarray:
        """`clip_box` rounded to whole pixels: a view of `rgb` (no copy, no resampling) that the
        Ken Burns renderer cover-fits to width x height itself. Rounding moves an edge by at
        most half a source pixel; a renderer that takes a float box can use `clip_box` exactly."""
        left, top, right, bottom = self.clip_box(width, height)
        h, w = self.rgb.shape[:2]
        x0, y0 = min(w - 1, max(0, round(left))), min(h - 1, max(0, round(top)))
        x1, y1 = max(x0 + 1, min(w, round(right))), max(y0 + 1, min(h, round(bottom)))
        return self.rgb[y0:y1, x0:x1]


def fit(rgb: np.ndarray, width: int, height: int) -> FittedPicture:
    h, w = rgb.shape[:2]
    return FittedPicture(rgb=rgb, width=width, height=height, box=cover_box(w, h, width, height))


def fit_picture(path: Path, width: int, height: int) -> FittedPicture:
    """The picture at `path` fitted to width x height (the `[image]` size); PictureError if unusable."""
    return fit(load_picture(path), width, height)

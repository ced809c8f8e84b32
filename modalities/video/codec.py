"""Real video files through PyAV (FFmpeg bundled in its wheel): encode clips, decode them back,
sample frames uniformly in time and resize.

Clips are ``uint8`` arrays ``[T, H, W, C]`` with ``C`` 1 (grey) or 3 (RGB). Two codecs:

* ``h264`` (``.mp4``, libx264, ``crf`` 10, yuv420p, one thread, no macroblock tree): lossy, what real
  datasets look like; an encode repeats byte for byte. A grey
  clip keeps its values in the luma plane (chroma is constant), so the loss is the codec's
  quantisation only.
* ``ffv1`` (``.avi``): lossless; used where the exact pixels matter (``smoothpurify poison`` writes
  a trigger that an h264 round trip would blur).

The sampling and resizing are written here in a few lines instead of using pytorchvideo: its
``UniformTemporalSubsample`` is the same ``linspace``-and-round rule as :func:`uniform_indices`, and
importing it needs torchvision, whose PyPI wheel is a CUDA build that needs the project's
compatibility module (which a modality may not import from the image package).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from smoothpurify import SmoothPurifyError

# x264's macroblock-tree rate control gave a different stream for about 1 clip in 60 from one encode
# of the same frames to the next (tiny frames, more often under load), so the composed data and every
# model trained on it changed from run to run; without it, and on one thread, an encode repeats byte
# for byte (tests/test_video.py).
CODECS = {"h264": (".mp4", "libx264", {"crf": "10", "preset": "medium", "x264-params": "threads=1:mbtree=0"}),
          "ffv1": (".avi", "ffv1", {})}
VIDEO_SUFFIXES = {".avi", ".mp4", ".mkv", ".webm", ".mov", ".mpg", ".mpeg"}


def _av():
    try:
        import av  # noqa: PLC0415 - optional dependency (extra `video`), only where video files are touched
    except ImportError:
        raise SmoothPurifyError("the video modality needs PyAV: `pip install av==18.1.0` "
                                "(or the project's `video` extra)") from None
    return av


def suffix_of(codec: str) -> str:
    if codec not in CODECS:
        raise SmoothPurifyError(f"unknown video codec {codec!r}; choose {' or '.join(CODECS)}")
    return CODECS[codec][0]


def encode(path: Path, frames: np.ndarray, fps: int = 25, codec: str = "h264") -> Path:
    """Write ``frames [T, H, W, C]`` (uint8) as a video file, atomically (temp file, then rename)."""
    av = _av()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] not in (1, 3) or not len(frames):
        raise SmoothPurifyError(f"{path}: clips must be uint8 [T, H, W, 1|3], got {frames.dtype} {list(frames.shape)}")
    suffix, name, options = CODECS[codec] if codec in CODECS else (suffix_of(codec), None, None)
    path = Path(path)
    if path.suffix != suffix:
        raise SmoothPurifyError(f"{path}: codec {codec} writes {suffix} files")
    grey = frames.shape[-1] == 1
    h, w = frames.shape[1:3]
    if codec == "h264" and (h % 2 or w % 2):
        raise SmoothPurifyError(f"{path}: h264 (yuv420p) needs even frame sizes, got {h}x{w}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=suffix)
    os.close(fd)
    try:
        with av.open(tmp, mode="w") as box:
            stream = box.add_stream(name, rate=fps, options=dict(options))
            stream.width, stream.height = w, h
            stream.pix_fmt = ("gray" if grey else "bgr0") if codec == "ffv1" else "yuv420p"
            for arr in frames:
                frame = av.VideoFrame.from_ndarray(arr[..., 0] if grey else arr, format="gray" if grey else "rgb24")
                for packet in stream.encode(frame):
                    box.mux(packet)
            for packet in stream.encode():  # flush the encoder's delayed frames
                box.mux(packet)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def decode(path: Path, channels: int = 3) -> np.ndarray:
    """Every frame of a video file as ``uint8 [T, H, W, channels]``."""
    av = _av()
    if channels not in (1, 3):
        raise SmoothPurifyError(f"channels must be 1 or 3, got {channels}")
    try:
        with av.open(str(path)) as box:
            if not box.streams.video:
                raise SmoothPurifyError(f"{path}: no video stream")
            fmt = "gray" if channels == 1 else "rgb24"
            frames = [f.to_ndarray(format=fmt) for f in box.decode(video=0)]
    except SmoothPurifyError:
        raise
    except Exception as err:  # FFmpeg's errors (av.error.*): one line naming the file
        raise SmoothPurifyError(f"{path}: cannot decode video ({type(err).__name__}: {err})") from None
    if not frames:
        raise SmoothPurifyError(f"{path}: the video has no frames")
    out = np.stack(frames)
    return out[..., None] if channels == 1 else out


def uniform_indices(n: int, t: int) -> np.ndarray:
    """``t`` frame indices spread evenly over ``n`` frames (pytorchvideo's UniformTemporalSubsample:
    ``linspace(0, n - 1, t)`` rounded; frames repeat when the video is shorter than ``t``)."""
    return np.clip(np.round(np.linspace(0, n - 1, t)).astype(np.int64), 0, n - 1)


def to_clip(frames: np.ndarray, t: int, size: int) -> np.ndarray:
    """``[T0, H0, W0, C]`` -> ``uint8 [C, t, size, size]``: uniform temporal subsampling, the short side
    scaled to ``size`` (area interpolation) and a centre crop (pytorchvideo's ShortSideScale +
    CenterCrop), channels first as Conv3d takes them."""
    x = torch.from_numpy(frames[uniform_indices(len(frames), t)]).permute(0, 3, 1, 2).float()  # [t, C, H, W]
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="area" if scale < 1 else "bilinear",
                          **({} if scale < 1 else {"align_corners": False}))
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top:top + size, left:left + size]
    return x.round().clamp(0, 255).to(torch.uint8).permute(1, 0, 2, 3).numpy()

"""Video data: the composed default (moving Fashion-MNIST items), written as real video files in
UCF-101's layout, and the loaders for UCF-101 and HMDB-51 (official split lists) from a local path.

The default is COMPOSED, not a real action dataset (none ships in a package): each clip shows one
Fashion-MNIST item whose class is its motion (``MOTIONS``: move left / right / up / down, rotate
clockwise / anticlockwise, zoom in / out), with a random start pose, speed and drift, a dimmer
distractor item moving in a random direction, and pixel noise, so that neither the item nor a single
frame tells the class. The clips are encoded with PyAV into ``<root>/UCF-101/<Class>/
v_<Class>_gXX_cYY.mp4`` with ``<root>/ucfTrainTestlist/{classInd,trainlist01,testlist01}.txt``
(groups 1-7 are the test split, as in UCF-101's split 1) and decoded back through :func:`load_ucf101`,
the loader a real UCF-101 goes through.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from smoothpurify import SmoothPurifyError
from modalities.kit import FASHION_FILES, fashion_folder, read_idx
from modalities.video.codec import VIDEO_SUFFIXES, decode, encode, suffix_of, to_clip

MOTIONS = ["MoveLeft", "MoveRight", "MoveUp", "MoveDown", "RotateClockwise", "RotateAnticlockwise",
           "ZoomIn", "ZoomOut"]
TEST_GROUPS, GROUPS = range(1, 8), range(1, 26)   # UCF-101: 25 groups per class; split 1 tests groups 1-7


# --------------------------------------------------------------------------- Fashion-MNIST items
def fashion_items(cache_dir: Path, split: str) -> np.ndarray:
    """Fashion-MNIST ``split`` images, ``uint8 [N, 28, 28]`` (labels are not used: motion is the class)."""
    return read_idx(fashion_folder(cache_dir) / FASHION_FILES[split][0])


def blob_items(n: int, seed: int) -> np.ndarray:
    """Offline stand-ins for the items (tests, conformance): an asymmetric bright "L" with noise, so
    rotations are visible; never a benchmark."""
    rng = np.random.default_rng(seed)
    items = (rng.random((n, 28, 28)) * 40).astype(np.uint8)
    items[:, 4:24, 6:12] = 230
    items[:, 18:24, 6:22] = 230
    return items


# --------------------------------------------------------------------------- rendering
def _poses(motion: int, t: int, rng: np.random.Generator) -> np.ndarray:
    """``[t, 4]`` per-frame (cx, cy, angle, scale) of the main item for one clip of class ``motion``.
    Coordinates are the canvas's normalised [-1, 1] (y down); every class drifts a little."""
    u = np.linspace(-0.5, 0.5, t)
    centre = rng.uniform(-0.15, 0.15, 2)
    drift = rng.uniform(-0.12, 0.12, 2)
    angle0, scale0 = rng.uniform(-0.4, 0.4), rng.uniform(0.85, 1.15)
    cx, cy = centre[0] + drift[0] * u, centre[1] + drift[1] * u
    angle, scale = np.full(t, angle0), np.full(t, scale0)
    name = MOTIONS[motion]
    dist, turn, zoom = rng.uniform(0.55, 0.85), rng.uniform(0.5, 0.9) * math.pi, rng.uniform(0.6, 0.9)
    if name.startswith("Move"):
        d = {"Left": (-1, 0), "Right": (1, 0), "Up": (0, -1), "Down": (0, 1)}[name[4:]]
        cx, cy = cx + d[0] * dist * u, cy + d[1] * dist * u
    elif name.startswith("Rotate"):
        angle = angle0 + (1 if name == "RotateClockwise" else -1) * turn * u  # y points down: +angle turns clockwise
    else:
        scale = scale0 * np.exp((1 if name == "ZoomIn" else -1) * zoom * u)
    return np.stack([cx, cy, angle, scale], 1)


def _render(items: torch.Tensor, poses: torch.Tensor, size: int, half: float) -> torch.Tensor:
    """``items [K, 28, 28]`` (float 0..1) at ``poses [K, t, 4]`` -> ``[K, t, size, size]``.

    An output pixel ``p`` samples the item at ``q = R(-angle) (p - c) / (half * scale)`` (the item
    spans ``[-1, 1]`` in its own coordinates): ``affine_grid`` with ``M = R(-angle) / (half * scale)``,
    ``b = -M c``."""
    k, t = poses.shape[:2]
    cx, cy, a, s = poses.reshape(-1, 4).unbind(1)
    cos, sin, z = torch.cos(a) / (half * s), torch.sin(a) / (half * s), torch.zeros_like(a)
    m = torch.stack([torch.stack([cos, sin, z], 1), torch.stack([-sin, cos, z], 1)], 1)   # [K t, 2, 3]
    m[:, :, 2] = -(m[:, :, :2] @ torch.stack([cx, cy], 1).unsqueeze(-1)).squeeze(-1)
    grid = F.affine_grid(m, [k * t, 1, size, size], align_corners=False)
    src = items.unsqueeze(1).expand(k, t, 28, 28).reshape(k * t, 1, 28, 28)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False).reshape(k, t, size, size)


def compose_clips(items: np.ndarray, n_per_class: int, frames: int, size: int, seed: int,
                  noise: float = 0.04, distractor: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """``n_per_class`` clips of every motion: ``uint8 [N, frames, size, size, 1]`` and labels ``[N]``."""
    rng = np.random.default_rng(seed)
    n = n_per_class * len(MOTIONS)
    y = np.repeat(np.arange(len(MOTIONS)), n_per_class)
    main = torch.from_numpy(items[rng.integers(0, len(items), n)].astype(np.float32) / 255)
    other = torch.from_numpy(items[rng.integers(0, len(items), n)].astype(np.float32) / 255)
    poses = torch.from_numpy(np.stack([_poses(int(c), frames, rng) for c in y])).float()
    # The distractor: smaller, dimmer, a straight line in a random direction at a move class's speed.
    u = np.linspace(-0.5, 0.5, frames)
    heading = rng.uniform(0, 2 * math.pi, n)
    speed = rng.uniform(0.0, 0.8, n)
    start = rng.uniform(-0.5, 0.5, (n, 2))
    d_pose = np.stack([start[:, :1] + (speed * np.cos(heading))[:, None] * u,
                       start[:, 1:] + (speed * np.sin(heading))[:, None] * u,
                       np.repeat(rng.uniform(-math.pi, math.pi, (n, 1)), frames, 1),
                       np.full((n, frames), 0.6)], -1)
    half = 15 / size   # the item's 28 px drawn ~15 px wide: room to move on a small canvas
    clip = _render(main, poses, size, half)
    clip = torch.maximum(clip, distractor * _render(other, torch.from_numpy(d_pose).float(), size, half))
    gen = torch.Generator().manual_seed(seed)
    clip = clip + noise * torch.randn(clip.shape, generator=gen)
    out = (clip.clamp(0, 1) * 255).round().to(torch.uint8).numpy()[..., None]
    order = rng.permutation(n)  # interleave classes so that groups and clip numbers mix them
    return out[order], y[order]


# --------------------------------------------------------------------------- UCF-101 layout
def write_ucf101(root: Path, clips: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str],
                 codec: str = "h264", fps: int = 25) -> dict[str, int]:
    """Encode ``{"train"|"test": (clips [N, T, H, W, C], labels)}`` into UCF-101's layout: train clips
    in groups 8-25, test clips in groups 1-7, ``cYY`` numbering the clips of a (class, group)."""
    root = Path(root)
    videos, lists = root / "UCF-101", root / "ucfTrainTestlist"
    lists.mkdir(parents=True, exist_ok=True)
    suffix = suffix_of(codec)
    lines: dict[str, list[str]] = {"train": [], "test": []}
    for split, (x, y) in clips.items():
        groups = list(TEST_GROUPS) if split == "test" else [g for g in GROUPS if g not in TEST_GROUPS]
        counter: dict[tuple[int, int], int] = {}
        for i, (clip, label) in enumerate(zip(x, y)):
            name = classes[int(label)]
            group = groups[(i // len(classes)) % len(groups)]
            counter[(label, group)] = c = counter.get((label, group), 0) + 1
            rel = f"{name}/v_{name}_g{group:02d}_c{c:02d}{suffix}"
            encode(videos / rel, clip, fps=fps, codec=codec)
            lines[split].append(f"{rel} {int(label) + 1}" if split == "train" else rel)
    (lists / "classInd.txt").write_text("".join(f"{k + 1} {c}\n" for k, c in enumerate(classes)))
    (lists / "trainlist01.txt").write_text("".join(f"{line}\n" for line in lines["train"]))
    (lists / "testlist01.txt").write_text("".join(f"{line}\n" for line in lines["test"]))
    return {s: len(v) for s, v in lines.items()}


def _ucf_dirs(root: Path) -> tuple[Path, Path]:
    root = Path(root).expanduser()
    lists = root / "ucfTrainTestlist" if (root / "ucfTrainTestlist").is_dir() else root
    videos = root / "UCF-101" if (root / "UCF-101").is_dir() else root
    if not (lists / "classInd.txt").is_file():
        raise SmoothPurifyError(f"{root}: not a UCF-101 folder (no ucfTrainTestlist/classInd.txt)")
    return videos, lists


def ucf101_index(root: Path, split: str = "test", fold: int = 1) -> tuple[list[Path], np.ndarray, list[str]]:
    """``(video paths, labels, class names)`` of ``{train,test}list0<fold>.txt``. Train lines carry a
    1-based label; test lines do not, so their class is the folder's name (as in the official lists)."""
    videos, lists = _ucf_dirs(root)
    classes: list[str] = []
    for k, line in enumerate((lists / "classInd.txt").read_text().split("\n")):
        if line.strip():
            parts = line.split()
            if len(parts) != 2 or int(parts[0]) != len(classes) + 1:
                raise SmoothPurifyError(f"{lists / 'classInd.txt'} line {k + 1}: expected '<index> <Class>' in order")
            classes.append(parts[1])
    listing = lists / f"{split}list{fold:02d}.txt"
    if split not in ("train", "test") or not listing.is_file():
        raise SmoothPurifyError(f"{lists}: no {split}list{fold:02d}.txt")
    index = {c: k for k, c in enumerate(classes)}
    paths, labels = [], []
    for line in listing.read_text().split("\n"):
        if not line.strip():
            continue
        rel = line.split()[0]
        folder = rel.split("/")[0]
        if folder not in index:
            raise SmoothPurifyError(f"{listing}: {rel} is in no class of classInd.txt")
        paths.append(videos / rel)
        labels.append(index[folder])
    if not paths:
        raise SmoothPurifyError(f"{listing} lists no videos")
    return paths, np.asarray(labels, dtype=np.int64), classes


def hmdb51_index(root: Path, split: str = "test", fold: int = 1) -> tuple[list[Path], np.ndarray, list[str]]:
    """HMDB-51: ``<root>/<class>/<video>.avi`` and ``testTrainMulti_7030_splits/<class>_test_split<fold>.txt``
    whose lines are ``<video>.avi <id>`` (1: train, 2: test, 0: unused); classes sorted by name."""
    root = Path(root).expanduser()
    splits = root / "testTrainMulti_7030_splits"
    if not splits.is_dir():
        raise SmoothPurifyError(f"{root}: not an HMDB-51 folder (no testTrainMulti_7030_splits/)")
    files = sorted(splits.glob(f"*_test_split{fold}.txt"))
    if not files:
        raise SmoothPurifyError(f"{splits}: no *_test_split{fold}.txt files")
    classes = [f.name[:-len(f"_test_split{fold}.txt")] for f in files]
    want = {"train": "1", "test": "2"}.get(split)
    if want is None:
        raise SmoothPurifyError(f"HMDB-51 splits are train or test, not {split!r}")
    videos = root / "hmdb51_org" if (root / "hmdb51_org").is_dir() else root
    paths, labels = [], []
    for k, f in enumerate(files):
        for line in f.read_text().split("\n"):
            parts = line.split()
            if len(parts) == 2 and parts[1] == want:
                paths.append(videos / classes[k] / parts[0])
                labels.append(k)
    if not paths:
        raise SmoothPurifyError(f"{splits}: split {fold} lists no {split} videos")
    return paths, np.asarray(labels, dtype=np.int64), classes


def detect_layout(root: Path) -> str:
    root = Path(root).expanduser()
    if (root / "testTrainMulti_7030_splits").is_dir():
        return "hmdb51"
    if (root / "ucfTrainTestlist" / "classInd.txt").is_file() or (root / "classInd.txt").is_file():
        return "ucf101"
    raise SmoothPurifyError(f"{root}: expected UCF-101 (ucfTrainTestlist/classInd.txt) or HMDB-51 "
                            "(testTrainMulti_7030_splits/) layout")


def load_videos(root: Path, split: str, frames: int, size: int, channels: int, fold: int = 1,
                layout: str | None = None, limit: int | None = None,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode a split of a UCF-101 / HMDB-51 folder: ``uint8 [N, C, frames, size, size]``, labels, classes.
    ``limit`` keeps a random subset (fixed by ``seed``) before decoding."""
    layout = layout or detect_layout(root)
    paths, labels, classes = (ucf101_index if layout == "ucf101" else hmdb51_index)(root, split, fold)
    if limit and len(paths) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(paths), limit, replace=False))
        paths, labels = [paths[i] for i in keep], labels[keep]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise SmoothPurifyError(f"{root}: {len(missing)} listed videos are missing, e.g. {missing[0]}")
    odd = [p for p in paths if p.suffix.lower() not in VIDEO_SUFFIXES]
    if odd:
        raise SmoothPurifyError(f"{odd[0]}: not a video file suffix ({', '.join(sorted(VIDEO_SUFFIXES))})")
    x = np.stack([to_clip(decode(p, channels), frames, size) for p in paths])
    return x, labels, classes

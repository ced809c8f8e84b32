"""Sweet Home 3D's furniture catalogues (Debian ``sweethome3d-furniture``) as a ModelNet-like class set.

Each catalogue (``*.sh3f``) is a zip of OBJ models and a Java properties file naming every model, its
category, its size in cm and, where the OBJ is not modelled upright, the rotation that stands it up.
Models are grouped into classes by their English name (:data:`FURNITURE_CLASSES`), put in Sweet Home
3D's frame (rotation, then scaled to width x height x depth, y up) and turned z-up, and written once as
``.off`` meshes into a cache folder that :func:`modalities.pointcloud.data.compose_meshes` composes views
from. Nothing is unpickled or executed; only the properties and the selected OBJ files are read.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from smoothpurify import SmoothPurifyError
from modalities.kit import unpack_deb
from modalities.pointcloud.geometry import write_off

FURNITURE_PACKAGE = "sweethome3d-furniture"
FURNITURE_FOLDER = "usr/share/sweethome3d/furniture"
# (class, name pattern, name exclusions, required category): the first rule that matches wins.
FURNITURE_CLASSES: tuple[tuple[str, str, str | None, str | None], ...] = (
    ("bed", r"\bbed\b", None, None),
    ("chair", r"\b(arm)?chair\b", r"ottoman", None),
    ("lamp", r"\blamp(post)?\b|chandelier", None, None),
    ("person", r"\b(male|female|boy|girl)\b|mannequin", None, "Characters"),
    ("plant", r"\b(plant|tree)\b", r"\bbox\b", None),
    ("sofa", r"\b(sofa|couch)\b", None, None),
    ("storage", r"\b(cabinet|bookcase|wardrobe|shelves)\b", None, None),
    ("table", r"\btable\b", r"bedside|tennis|fan|pool|football|changing|dressing", None),
)
_MANIFEST = "manifest.json"


def class_of(name: str, category: str) -> str | None:
    """The class a catalogue entry belongs to by its English name (None: not used)."""
    low = name.lower()
    for cls, pattern, exclude, needs in FURNITURE_CLASSES:
        if needs and category != needs:
            continue
        if re.search(pattern, low) and not (exclude and re.search(exclude, low)):
            return cls
    return None


def parse_properties(text: str) -> dict[str, str]:
    """Java ``.properties`` (key=value or key: value, ``\\`` line continuations, ``\\uXXXX`` escapes)."""
    out: dict[str, str] = {}
    lines, buf = [], ""
    for raw in text.splitlines():
        line = raw.lstrip()
        if not buf and (not line or line[0] in "#!"):
            continue
        trailing = len(line) - len(line.rstrip("\\"))
        if trailing % 2:
            buf += line[:-1]
            continue
        lines.append(buf + line)
        buf = ""
    if buf:
        lines.append(buf)
    unescape = re.compile(r"\\u([0-9a-fA-F]{4})|\\(.)")

    def decode(s: str) -> str:
        return unescape.sub(lambda m: chr(int(m.group(1), 16)) if m.group(1) else
                            {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}.get(m.group(2), m.group(2)), s)
    for line in lines:
        m = re.match(r"((?:\\.|[^=:\s\\])+)\s*[=:\s]\s*(.*)$", line)
        if m:
            out[decode(m.group(1))] = decode(m.group(2))
    return out


def catalogue_entries(path: Path) -> list[dict]:
    """The entries of one ``.sh3f`` catalogue: name, category, model (zip member), size, rotation."""
    with zipfile.ZipFile(path) as z:
        props = parse_properties(z.read("PluginFurnitureCatalog.properties").decode("latin-1"))
    entries = []
    for key, model in props.items():
        if not key.startswith("model#"):
            continue
        n = key.split("#", 1)[1]
        rotation = props.get(f"modelRotation#{n}")
        try:
            size = [float(props[f"{k}#{n}"]) for k in ("width", "height", "depth")]
            rot = (np.array([float(v) for v in rotation.split()]).reshape(3, 3) if rotation
                   else np.eye(3))
        except (KeyError, ValueError):
            continue
        entries.append({"id": props.get(f"id#{n}", f"{path.stem}#{n}"), "name": props.get(f"name#{n}", ""),
                        "category": props.get(f"category#{n}", ""), "model": model.lstrip("/"),
                        "size": size, "rotation": rot, "catalogue": path.stem})
    return entries


def parse_obj(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Vertices and triangles of a Wavefront OBJ (every group merged; polygons fanned into triangles;
    1-based and negative indices; texture / normal indices ignored)."""
    verts: list[list[float]] = []
    tris: list[tuple[int, int, int]] = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            if line.startswith("v "):
                verts.append([float(v) for v in line.split()[1:4]])
            elif line.startswith("f "):
                idx = []
                for tok in line.split()[1:]:
                    i = int(tok.split("/", 1)[0])
                    idx.append(i - 1 if i > 0 else len(verts) + i)
                tris += [(idx[0], idx[k], idx[k + 1]) for k in range(1, len(idx) - 1)]
        except ValueError:
            raise SmoothPurifyError(f"OBJ line {number}: not a vertex or face ({line[:40]!r})") from None
    v = np.asarray(verts, np.float64).reshape(-1, 3)
    f = np.asarray(tris, np.int64).reshape(-1, 3)
    if len(f) and (f.min() < 0 or f.max() >= len(v)):
        raise SmoothPurifyError("OBJ face refers to a vertex it does not have")
    return v, f


def upright(verts: np.ndarray, rotation: np.ndarray, size: list[float]) -> np.ndarray:
    """A model in Sweet Home 3D's frame (rotated, centred, scaled to width x height x depth; y up),
    then turned so that z is up (x, y, z) -> (x, -z, y), a proper rotation."""
    v = verts @ rotation.T
    lo, hi = v.min(0), v.max(0)
    v = (v - (lo + hi) / 2) / np.maximum(hi - lo, 1e-9) * np.asarray(size)
    return np.stack([v[:, 0], -v[:, 2], v[:, 1]], axis=1)


def furniture_folder(cache_dir: Path) -> tuple[Path, str]:
    """The folder of ``.sh3f`` catalogues: the installed package's, or the package fetched without root
    into ``<cache>/sh3d-catalogues`` (:func:`modalities.kit.unpack_deb`)."""
    system = Path("/") / FURNITURE_FOLDER
    if any(system.glob("*.sh3f")):
        return system, f"Debian {FURNITURE_PACKAGE} (installed)"
    target = Path(cache_dir) / "sh3d-catalogues"
    if not any((target / FURNITURE_FOLDER).glob("*.sh3f")):
        try:
            unpack_deb(FURNITURE_PACKAGE, target)
        except SmoothPurifyError as err:
            raise SmoothPurifyError(f"no furniture catalogues: {err}; run `apt-get update` once, install the "
                                    "package, or set pointcloud.dataset to cgal") from None
    return target / FURNITURE_FOLDER, f"Debian {FURNITURE_PACKAGE} (apt-get download)"


def furniture_meshes(cache_dir: Path) -> tuple[Path, dict[str, tuple[str, ...]], str]:
    """Convert the selected models once into ``<cache>/furniture-meshes/<mesh>.off``; returns that folder,
    the meshes per class (identical geometry kept once) and where the catalogues came from."""
    folder, how = furniture_folder(cache_dir)
    out = Path(cache_dir) / "furniture-meshes"
    manifest = out / _MANIFEST
    if manifest.is_file():
        classes = {k: tuple(v) for k, v in json.loads(manifest.read_text()).items()}
        return out, classes, how
    staging = Path(tempfile.mkdtemp(dir=Path(cache_dir)))
    try:
        classes = _convert(folder, staging)
        (staging / _MANIFEST).write_text(json.dumps(classes, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)   # only left when the conversion failed
    return out, {k: tuple(v) for k, v in classes.items()}, how


def _convert(folder: Path, staging: Path) -> dict[str, list[str]]:
    """Every classed model of every catalogue in ``folder`` as ``<staging>/<mesh>.off``: the meshes per class."""
    classes: dict[str, list[str]] = {cls: [] for cls, *_ in FURNITURE_CLASSES}
    seen: set[str] = set()
    for sh3f in sorted(folder.glob("*.sh3f")):
        entries = [e for e in catalogue_entries(sh3f) if class_of(e["name"], e["category"])]
        with zipfile.ZipFile(sh3f) as z:
            for e in sorted(entries, key=lambda e: e["id"]):
                try:
                    verts, faces = parse_obj(z.read(e["model"]).decode("latin-1"))
                except (KeyError, SmoothPurifyError) as err:
                    raise SmoothPurifyError(f"{sh3f.name}: model {e['model']}: {err}") from None
                if len(faces) < 4:
                    continue
                v = upright(verts, e["rotation"], e["size"])
                key = hashlib.sha1(np.round(v, 2).tobytes() + faces.tobytes()).hexdigest()
                if key in seen:    # the same geometry shipped twice must not sit in both splits
                    continue
                seen.add(key)
                slug = re.sub(r"[^a-z0-9]+", "-", f"{e['catalogue']}-{e['id'].split('#')[-1]}".lower()).strip("-")
                write_off(staging / f"{slug}.off", v, faces, normalised=False)
                classes[class_of(e["name"], e["category"])].append(slug)
    return classes

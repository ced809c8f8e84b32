"""Point-cloud datasets: views composed from real meshes (the default's furniture, :mod:`.furniture`, or
CGAL's demo meshes), and the loaders of
ModelNet10/40 (class folders of ``.off`` meshes) and ``modelnet40_normal_resampled`` (text clouds).

The default is written in ModelNet's layout (``<root>/<class>/<train|test>/<name>.off``) and read
back through the same loader that reads ModelNet, so that path is exercised on every run. Every
loader returns ``x: [N, P, 3]`` float32 (see :mod:`modalities.pointcloud.geometry` for the
convention), ``y: [N]`` int64 and the class names.
"""
from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from smoothpurify import SmoothPurifyError
from modalities.kit import unpack_deb
from modalities.pointcloud.geometry import canonicalise, cloud_from_mesh, random_view, read_off, write_off

CGAL_PACKAGE = "libcgal-demo"
CGAL_TARBALL = "usr/share/doc/libcgal-dev/data.tar.gz"
# Seven shape classes of the meshes in CGAL's demo data (Debian libcgal-demo 5.5.1): each class has
# several distinct meshes so that the split by mesh leaves some in train and some in test.
CGAL_CLASSES: dict[str, tuple[str, ...]] = {
    "animal": ("bear", "bull", "camel", "cow", "diplodocus", "dino", "elephant", "elk", "lion", "pig",
               "triceratops"),
    "humanoid": ("armadillo", "homer", "man", "mannequin-devil"),
    "mechanical": ("anchor", "blade", "couplingdown", "dragknob", "fandisk", "joint", "mech-holes-shark", "part",
                   "pinion", "rotor", "spool", "turbine"),
    "box": ("beam", "cheese-box", "cube", "cube-meshed", "cube_quad", "oblong", "small_cube"),
    "round": ("blob-closed", "blobby", "ellipsoid", "geosphere", "larger_sphere", "sphere", "sphere966"),
    "ring": ("3torus", "double-torus-3-holes", "double-torus-example", "eight", "knot", "knot1", "knot2",
             "torus_quad"),
    "polyhedron": ("icosahedron", "octahedron", "pyramid", "star", "tetrahedron", "tripod"),
}


# --------------------------------------------------------------------------- CGAL meshes
def _extract_meshes(tarball: Path, target: Path) -> None:
    """The regular ``.off`` files under ``data/meshes`` of CGAL's data tarball into ``target`` (replaced
    once the extraction succeeded): nothing else from the archive touches the disk."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent))
    try:
        with tarfile.open(tarball) as tar:
            keep = [m for m in tar.getmembers() if m.isfile() and m.name.startswith("data/meshes/")
                    and m.name.endswith(".off") and "/.." not in m.name]
            tar.extractall(staging, members=keep, filter="data")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def cgal_mesh_dir(cache_dir: Path) -> tuple[Path, str]:
    """The folder of CGAL's ``.off`` meshes, extracted once into ``<cache>/cgal-meshes`` from the
    installed package's tarball or from the package fetched without root (:func:`modalities.kit.unpack_deb`)."""
    cache_dir = Path(cache_dir)
    target = cache_dir / "cgal-meshes"
    system = Path("/") / CGAL_TARBALL
    how = f"Debian {CGAL_PACKAGE} ({'installed' if system.is_file() else 'apt-get download'})"
    if (target / "data" / "meshes").is_dir():
        return target / "data" / "meshes", how
    if system.is_file():
        _extract_meshes(system, target)
        return target / "data" / "meshes", how
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        try:
            tarball = unpack_deb(CGAL_PACKAGE, Path(tmp) / "deb") / CGAL_TARBALL
        except SmoothPurifyError:
            tarball = None
        if tarball is None or not tarball.is_file():
            raise SmoothPurifyError(f"no CGAL meshes: install the Debian package {CGAL_PACKAGE} (or let `apt-get "
                                    "download` reach the package lists; run `apt-get update` once), or set "
                                    "pointcloud.dataset to modelnet40 with pointcloud.data_path")
        _extract_meshes(tarball, target)
    return target / "data" / "meshes", how


def split_meshes(names: list[str], test_share: float, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """A class's meshes split into train and test (at least one each): no mesh is in both."""
    order = [names[i] for i in rng.permutation(len(names))]
    n_test = min(max(1, int(round(test_share * len(names)))), len(names) - 1)
    return sorted(order[n_test:]), sorted(order[:n_test])


def load_mesh(path: Path, orient: str = "pca", up: str = "minor") -> tuple[np.ndarray, np.ndarray]:
    """``(vertices, triangles)`` of a mesh file; ``orient="pca"`` turns it into its principal frame with
    principal axis ``up`` as z (:func:`~modalities.pointcloud.geometry.canonicalise`), ``"none"``
    keeps the frame it was modelled in."""
    verts, faces, _ = read_off(path)
    if orient == "pca":
        return canonicalise(verts, faces, up), faces
    if orient != "none":
        raise SmoothPurifyError(f"orient must be pca or none, got {orient!r}")
    return verts, faces


def compose_meshes(mesh_dir: Path, out_root: Path, num_points: int, per_class: dict[str, int], test_share: float,
                 seed: int, orient: str = "pca", up: str = "minor",
                 classes: dict[str, tuple[str, ...]] | None = None) -> dict[str, list[str]]:
    """Write views of meshes (``<mesh_dir>/<name>.off``; by default CGAL's, grouped by
    :data:`CGAL_CLASSES`) in ModelNet's layout under ``out_root``; returns the meshes per split.

    Each class gets ``per_class[split]`` views spread evenly over that split's meshes (so a class's
    size does not depend on how many meshes it has); each view is :func:`random_view` of the mesh as
    :func:`load_mesh` gives it: CGAL's meshes share no up axis, so by default (``orient="pca"``) each
    is first turned into its principal frame, and the views' random rotation is about a principal axis.
    """
    rng = np.random.default_rng(seed)
    used: dict[str, list[str]] = {"train": [], "test": []}
    for cls, names in (CGAL_CLASSES if classes is None else classes).items():
        present = [n for n in names if (mesh_dir / f"{n}.off").is_file()]
        if len(present) < 2:
            raise SmoothPurifyError(f"{mesh_dir}: class {cls} needs two of its meshes, found {present}")
        for split, meshes in zip(("train", "test"), split_meshes(present, test_share, rng)):
            loaded = [load_mesh(mesh_dir / f"{m}.off", orient, up) for m in meshes]
            for k in range(per_class[split]):
                j = k % len(meshes)
                pts = random_view(*loaded[j], num_points, rng)
                write_off(out_root / cls / split / f"{cls}_{meshes[j]}_{k:04d}.off", pts)
            used[split] += [f"{cls}/{m}" for m in meshes]
    return used


# --------------------------------------------------------------------------- ModelNet layouts
def class_folders(root: Path) -> list[str]:
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))


def load_modelnet(root: Path, split: str, num_points: int, seed: int, limit: int | None = None,
                  classes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """ModelNet10/40's layout: ``<root>/<class>/<split>/*.off`` (classes sorted by name). Meshes are
    sampled by area (``num_points``, seeded per file); ``limit`` takes an even share per class first."""
    root = Path(root)
    if not root.is_dir():
        raise SmoothPurifyError(f"dataset path not found: {root}")
    classes = classes or class_folders(root)
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((root / name / split).glob("*.off"))]
    if not files:
        raise SmoothPurifyError(f"{root}: no <class>/{split}/*.off files (ModelNet layout)")
    rng = np.random.default_rng(seed)
    if limit and len(files) > limit:
        keep = np.sort(rng.choice(len(files), limit, replace=False))
        files = [files[i] for i in keep]
    x = np.stack([cloud_from_mesh(*read_off(f), num_points, np.random.default_rng([seed, i]))
                  for i, (f, _) in enumerate(files)])
    return x, np.array([c for _, c in files], dtype=np.int64), classes


def load_resampled(root: Path, split: str, num_points: int, seed: int, limit: int | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``modelnet40_normal_resampled``: ``<root>/modelnet{10,40}_shape_names.txt``, ``..._<split>.txt``
    listing ``<class>_<nnnn>``, each ``<root>/<class>/<class>_<nnnn>.txt`` of ``x,y,z,nx,ny,nz`` rows.
    A seeded random subset of ``num_points`` points per cloud, normalised (normals are dropped)."""
    root = Path(root)
    names_file = next(iter(sorted(root.glob("modelnet*_shape_names.txt"))), None)
    if names_file is None:
        raise SmoothPurifyError(f"{root}: no modelnet*_shape_names.txt (modelnet40_normal_resampled layout)")
    prefix = names_file.name[:-len("_shape_names.txt")]
    classes = [ln.strip() for ln in names_file.read_text().splitlines() if ln.strip()]
    listing = root / f"{prefix}_{split}.txt"
    if not listing.is_file():
        raise SmoothPurifyError(f"{root}: no {listing.name}")
    items = [ln.strip() for ln in listing.read_text().splitlines() if ln.strip()]
    rng = np.random.default_rng(seed)
    if limit and len(items) > limit:
        items = [items[i] for i in np.sort(rng.choice(len(items), limit, replace=False))]
    xs, ys = [], []
    for i, item in enumerate(items):
        cls = item.rsplit("_", 1)[0]
        if cls not in classes:
            raise SmoothPurifyError(f"{listing}: {item!r} is of no class in {names_file.name}")
        path = root / cls / f"{item}.txt"
        try:
            pts = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)[:, :3]
        except (OSError, ValueError) as err:
            raise SmoothPurifyError(f"{path}: not a comma-separated point file ({err})") from None
        xs.append(cloud_from_mesh(pts, np.zeros((0, 3), np.int64), False, num_points,
                                  np.random.default_rng([seed, i])))
        ys.append(classes.index(cls))
    if not xs:
        raise SmoothPurifyError(f"{listing}: lists no clouds")
    return np.stack(xs), np.array(ys, dtype=np.int64), classes


def load_any(root: Path, split: str, num_points: int, seed: int, limit: int | None = None):
    """Either layout, told apart by the ``*_shape_names.txt`` file of the resampled one."""
    root = Path(root)
    if any(root.glob("modelnet*_shape_names.txt")):
        return load_resampled(root, split, num_points, seed, limit)
    return load_modelnet(root, split, num_points, seed, limit)


def write_modelnet(root: Path, split: str, x: np.ndarray, y: np.ndarray, classes: list[str]) -> None:
    """Clouds as point-only OFF files in ModelNet's layout (every class folder made, even if empty)."""
    for c in classes:
        (Path(root) / c / split).mkdir(parents=True, exist_ok=True)
    for i, (pts, label) in enumerate(zip(x, y)):
        write_off(Path(root) / classes[int(label)] / split / f"{classes[int(label)]}_{i:05d}.off", pts)


# --------------------------------------------------------------------------- synthetic (offline checks)
def synthetic(n: int, num_points: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Six primitive shapes (sphere, cube surface, cylinder, cone, torus, plane) as noisy clouds: a
    learnable set made here in milliseconds for the conformance suite and tests; never a benchmark."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 6
    out = np.empty((n, num_points, 3), np.float32)
    for i, c in enumerate(y):
        u, v = rng.random(num_points), rng.random(num_points)
        t = 2 * np.pi * u
        if c == 0:
            p = rng.normal(size=(num_points, 3))
            p /= np.linalg.norm(p, axis=1, keepdims=True)
        elif c == 1:
            p = rng.uniform(-1, 1, (num_points, 3))
            ax = rng.integers(0, 3, num_points)
            p[np.arange(num_points), ax] = np.sign(p[np.arange(num_points), ax])
        elif c == 2:
            p = np.stack([np.cos(t), np.sin(t), 2 * v - 1], 1)
        elif c == 3:
            p = np.stack([v * np.cos(t), v * np.sin(t), 1 - 2 * v], 1)
        elif c == 4:
            s = 2 * np.pi * v
            p = np.stack([(1 + 0.4 * np.cos(s)) * np.cos(t), (1 + 0.4 * np.cos(s)) * np.sin(t), 0.4 * np.sin(s)], 1)
        else:
            p = np.stack([2 * u - 1, 2 * v - 1, 0.05 * rng.normal(size=num_points)], 1)
        p = p + rng.normal(0, 0.02, p.shape)
        centred = p - p.mean(0)
        out[i] = 0.5 + 0.45 * centred / np.linalg.norm(centred, axis=1).max()
    return out, y.astype(np.int64)

"""Which CGAL meshes a rotation trigger can be seen on: a measurement of the meshes, no model.

    python benchmarks/pointcloud_mesh_symmetry.py [--cache runs/pointcloud/cache] [--meshes a,b,...]
        [--out benchmarks/results/pointcloud_classes/mesh_symmetry.md]

PointBA-O and PointCBA turn a cloud by a fixed rotation (params: 90 degrees about x). The default data's
views turn each canonicalised mesh at random about z, so the trigger is invisible on a mesh whose turned
copy is one of its own views. Per mesh: 1,024 area-weighted surface points of the canonicalised mesh
(centred, farthest point at 1), turned by the trigger; the symmetric Chamfer distance to a second sample,
minimised over 72 turns about z; divided by the distance between two samples of the unturned mesh (the
sampling noise). A ratio near 1: the trigger leaves the mesh as it was (cubes, spheres); the meshes with a
pose score 2-10. Default meshes: the seven classes of the composition (``data.CGAL_CLASSES``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))


def chamfer(a: np.ndarray, b: np.ndarray) -> float:
    d = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=2)
    return float(d.min(1).mean() + d.min(0).mean()) / 2


def visibility_ratio(verts: np.ndarray, faces: np.ndarray, rotation: np.ndarray, rng: np.random.Generator,
                     points: int = 1024, turns: int = 72) -> float:
    from modalities.pointcloud.geometry import rotation_z, sample_surface  # noqa: PLC0415

    v = verts - verts.mean(0)
    v = v / np.linalg.norm(v, axis=1).max()
    p, q = sample_surface(v, faces, points, rng), sample_surface(v, faces, points, rng)
    turned = p @ rotation.T
    best = min(chamfer(turned, q @ rotation_z(t).T) for t in np.linspace(0, 2 * np.pi, turns, endpoint=False))
    return best / chamfer(p, q)


def main(argv: list[str] | None = None) -> None:
    from modalities.pointcloud import data as pcdata  # noqa: PLC0415
    from modalities.pointcloud.attacks import rotation_matrix  # noqa: PLC0415

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=ROOT / "runs/pointcloud/cache")
    ap.add_argument("--meshes", default=None, help="comma-separated mesh names (default: the classes' meshes)")
    ap.add_argument("--axis", default="x")
    ap.add_argument("--degrees", type=float, default=90.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    mesh_dir, _ = pcdata.cgal_mesh_dir(args.cache)
    rows = ([(c, n) for c, names in pcdata.CGAL_CLASSES.items() for n in names] if args.meshes is None
            else [("-", n) for n in args.meshes.split(",")])
    rotation = rotation_matrix(args.axis, args.degrees).double().numpy()
    rng = np.random.default_rng(0)
    lines = [f"| class | mesh | ratio ({args.degrees:g} degrees about {args.axis}) |", "|---|---|---|"]
    for cls, name in rows:
        verts, faces = pcdata.load_mesh(mesh_dir / f"{name}.off")
        ratio = visibility_ratio(verts, faces, rotation, rng)
        lines.append(f"| {cls} | {name} | {ratio:.2f} |")
        print(lines[-1], flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join([f"Mesh symmetry under the rotation trigger (`{Path(__file__).name}`; "
                                       "ratio ~1: invisible)", "", *lines]) + "\n")


if __name__ == "__main__":
    main()

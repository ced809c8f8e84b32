"""Meshes and point clouds as numpy arrays: the OFF format, area-weighted surface sampling and the
normalisation every cloud of this modality shares.

Convention: a cloud is ``[P, 3]`` float32 with coordinates in the unit cube, centred at 0.5 with its
farthest point at radius :data:`RADIUS` (0.45). Keeping inputs in ``[0, 1]`` lets the core's
input-space defenses (AWM, I-BAU), which clip perturbed inputs to ``[0, 1]``, work unchanged; the
models map it back to the unit ball (``2x - 1``) themselves.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from smoothpurify import SmoothPurifyError
from smoothpurify.checkpoint import atomic_write

RADIUS = 0.45
# A written cloud that is already normalised says so in its OFF header, so that reading it back never
# renormalises it (a triggered cloud must keep its trigger exactly where the attack put it).
NORMALISED_TAG = "# smoothpurify: normalised unit-cube point cloud"


# --------------------------------------------------------------------------- OFF
def parse_off(text: str, source: str = "OFF") -> tuple[np.ndarray, np.ndarray, bool]:
    """``(vertices [V, 3], triangles [T, 3], normalised)`` from the text of an OFF file.

    Accepts OFF / COFF / NOFF headers, the ModelNet quirk of counts glued to the header
    (``OFF490 518 0``), ``#`` comments, per-vertex colours after x y z, and polygons of any size
    (fan-triangulated). A bad file raises one :class:`SmoothPurifyError` line naming ``source``.
    """
    normalised = NORMALISED_TAG in text
    lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines or not lines[0].lstrip().upper().split()[0].rstrip("0123456789").endswith("OFF"):
        raise SmoothPurifyError(f"{source}: not an OFF file (no OFF header)")
    head = lines[0].split()
    rest = head[0].upper().split("OFF", 1)[1]
    counts = ([rest] if rest else []) + head[1:]
    body = 1
    if len(counts) < 2:
        if len(lines) < 2:
            raise SmoothPurifyError(f"{source}: OFF header has no vertex / face counts")
        counts, body = lines[1].split(), 2
    try:
        nv, nf = int(counts[0]), int(counts[1])
    except (ValueError, IndexError):
        raise SmoothPurifyError(f"{source}: bad OFF counts {' '.join(counts)!r}") from None
    if nv < 1 or nf < 0 or len(lines) < body + nv + nf:
        raise SmoothPurifyError(f"{source}: OFF says {nv} vertices and {nf} faces but has {len(lines) - body} lines")
    try:
        verts = np.array([ln.split()[:3] for ln in lines[body:body + nv]], dtype=np.float64)
        tris: list[list[int]] = []
        for ln in lines[body + nv:body + nv + nf]:
            vals = ln.split()
            k = int(vals[0])
            idx = [int(v) for v in vals[1:1 + k]]
            if len(idx) < k:
                raise ValueError(ln)
            tris.extend([idx[0], idx[j], idx[j + 1]] for j in range(1, k - 1))  # fan triangulation
    except ValueError:
        raise SmoothPurifyError(f"{source}: malformed OFF vertex or face line") from None
    if verts.shape != (nv, 3) or not np.isfinite(verts).all():
        raise SmoothPurifyError(f"{source}: OFF vertices must be three finite numbers each")
    faces = np.array(tris, dtype=np.int64).reshape(-1, 3)
    if faces.size and (faces.min() < 0 or faces.max() >= nv):
        raise SmoothPurifyError(f"{source}: a face refers to a vertex outside 0..{nv - 1}")
    return verts, faces, normalised


def read_off(path: Path) -> tuple[np.ndarray, np.ndarray, bool]:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as err:
        raise SmoothPurifyError(f"cannot read {path}: {err.strerror}") from None
    return parse_off(text, str(path))


def write_off(path: Path, points: np.ndarray, faces: np.ndarray | None = None, normalised: bool = True) -> None:
    """Write an OFF file atomically (temp file + rename); a point cloud is an OFF with 0 faces."""
    path = Path(path)
    faces = np.zeros((0, 3), np.int64) if faces is None else faces
    lines = ["OFF"] + ([NORMALISED_TAG] if normalised else []) + [f"{len(points)} {len(faces)} 0"]
    lines += [f"{a:.6f} {b:.6f} {c:.6f}" for a, b, c in points]
    lines += [f"3 {a} {b} {c}" for a, b, c in faces]
    atomic_write(path, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))


# --------------------------------------------------------------------------- sampling
def triangle_areas(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    a, b, c = (verts[faces[:, k]] for k in range(3))
    return 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)


def sample_surface(verts: np.ndarray, faces: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points uniformly on the surface: a triangle with probability proportional to its area,
    then a uniform point in it (barycentric ``(1 - sqrt(u), sqrt(u)(1 - v), sqrt(u) v)``)."""
    areas = triangle_areas(verts, faces) if len(faces) else np.zeros(0)
    total = float(areas.sum())
    if not np.isfinite(total) or total <= 0:
        if len(verts) == 0:
            raise SmoothPurifyError("cannot sample points from an empty mesh")
        return verts[rng.integers(0, len(verts), n)]  # a point-only OFF: its vertices are the cloud
    tri = rng.choice(len(faces), size=n, p=areas / total)
    u, v = rng.random(n), rng.random(n)
    su = np.sqrt(u)
    w = np.stack([1 - su, su * (1 - v), su * v], axis=1)
    corners = verts[faces[tri]]                                    # [n, 3 corners, 3 coords]
    return (w[:, :, None] * corners).sum(axis=1)


def normalise(points: np.ndarray) -> np.ndarray:
    """Centre on the mean, scale the farthest point to :data:`RADIUS`, shift to the cube's centre."""
    p = points - points.mean(axis=0, keepdims=True)
    r = float(np.linalg.norm(p, axis=1).max())
    return (0.5 + RADIUS * p / (r if r > 0 else 1.0)).astype(np.float32)


def rotation_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


# --------------------------------------------------------------------------- canonical orientation
UP_AXES = ("major", "middle", "minor")


def surface_moments(verts: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(weights [T], centroids [T, 3], corners [T, 3, 3])`` of the exact area measure of a mesh: a
    triangle weighs its area. A point-only mesh (no faces, or zero total area) weighs each vertex equally
    (its "triangles" are the degenerate ``(v, v, v)``), so the moments below fall back to the points'."""
    areas = triangle_areas(verts, faces) if len(faces) else np.zeros(0)
    if not np.isfinite(areas.sum()) or areas.sum() <= 0:
        if len(verts) == 0:
            raise SmoothPurifyError("cannot orient an empty mesh")
        corners = np.repeat(np.asarray(verts, np.float64)[:, None, :], 3, axis=1)
        return np.full(len(verts), 1.0 / len(verts)), corners.mean(1), corners
    corners = np.asarray(verts, np.float64)[faces]
    return areas / areas.sum(), corners.mean(1), corners


def principal_frame(verts: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The mesh's principal axes under the exact area-weighted surface measure: ``(centre [3],
    axes [3, 3], variances [3])``, ``axes`` a proper rotation whose rows are the axes sorted by
    decreasing variance (major, middle, minor).

    The moments are integrals over the surface, not over sampled points, so the frame is deterministic
    and exactly rotation-equivariant: for a triangle of area ``A`` with corners ``a, b, c`` and a linear
    ``f``, ``int f dA = A (f_a + f_b + f_c) / 3``, ``int f^2 dA = A h_2(f_a, f_b, f_c) / 6`` and
    ``int f^3 dA = A h_3(f_a, f_b, f_c) / 10`` (``h_k``: the complete homogeneous symmetric polynomial of
    degree ``k``; from ``int l_1^i l_2^j l_3^k dA = 2A i! j! k! / (i + j + k + 2)!`` in barycentric
    coordinates). PCA over the surface rather than over the vertices is the "continuous PCA" of pose
    normalisation (Vranic, Saupe & Richter, "Tools for 3D-object retrieval: Karhunen-Loeve transform and
    spherical harmonics", MMSP 2001), which also fixes each axis's sign by a moment of the surface.
    Signs here: the major and middle axes point to where the surface's third central moment along
    them is positive (the heavier tail); the minor axis is their cross product, so the frame never
    mirrors the object. A shape whose third moment along an axis vanishes
    (a sphere, a cube, a torus) or whose variances tie has no unique frame: tied variances (closer than
    0.5 % of their sum) keep the modelled axes within their eigenspace (:func:`_settle_ties`), and a
    vanishing moment (below ``1e-9`` of ``variance ** 1.5``) falls back to the sign that makes the
    axis's largest component positive. Both are deterministic but not rotation-equivariant: only a
    mesh with distinct variances and non-zero third moments has a frame that rotates with it.
    """
    w, cen, corners = surface_moments(verts, faces)
    centre = (w[:, None] * cen).sum(0)
    c = corners - centre                                                   # [T, 3 corners, 3]
    s = c.sum(1)
    # int x x^T dA = A / 12 (sum_i v_i v_i^T + s s^T), per unit total area
    cov = (w[:, None, None] * (np.einsum("tki,tkj->tij", c, c) + np.einsum("ti,tj->tij", s, s))).sum(0) / 12
    var, vec = np.linalg.eigh(cov)                                         # ascending
    order = np.argsort(var)[::-1]
    var, axes = var[order], _settle_ties(var[order], vec[:, order].T.copy())  # rows: major, middle, minor
    for k in (0, 1):
        f = c @ axes[k]                                                    # [T, 3] values at the corners
        h3 = (f ** 3).sum(1) + (f[:, 0] ** 2 * (f[:, 1] + f[:, 2]) + f[:, 1] ** 2 * (f[:, 0] + f[:, 2])
                                + f[:, 2] ** 2 * (f[:, 0] + f[:, 1])) + f.prod(1)
        m3 = float((w * h3).sum() / 10)
        if abs(m3) > 1e-9 * max(float(var[k]), 1e-30) ** 1.5:
            sign = np.sign(m3)
        else:
            sign = np.sign(axes[k][np.argmax(np.abs(axes[k]))])
        axes[k] *= sign
    axes[2] = np.cross(axes[0], axes[1])
    return centre, axes, var


def _settle_ties(var: np.ndarray, axes: np.ndarray, tol: float = 5e-3) -> np.ndarray:
    """Within a run of variances closer than ``tol`` of their sum (a sphere, a cube, the two in-plane
    axes of a torus) any orthonormal basis of the eigenspace is principal, and ``eigh`` returns an
    arbitrary one. Take instead the modelled coordinate axes projected into it (largest projection
    first, Gram-Schmidt), so a shape PCA cannot orient keeps the frame it was modelled in."""
    gap = tol * max(float(var.sum()), 1e-30)
    start = 0
    for end in range(1, 4):
        if end < 3 and var[end - 1] - var[end] <= gap:
            continue
        if end - start > 1:
            basis = axes[start:end]                                        # rows span the eigenspace
            proj = np.eye(3) @ basis.T @ basis                             # modelled axes, projected
            picked: list[np.ndarray] = []
            for j in sorted(range(3), key=lambda j: (-round(float(np.linalg.norm(proj[j])), 6), j)):
                v = proj[j] - sum((proj[j] @ u) * u for u in picked)
                if len(picked) < end - start and np.linalg.norm(v) > 1e-6:
                    picked.append(v / np.linalg.norm(v))
            axes[start:end] = np.stack(picked)
        start = end
    return axes


def canonicalise(verts: np.ndarray, faces: np.ndarray, up: str = "minor") -> np.ndarray:
    """The mesh's vertices in its principal frame (:func:`principal_frame`), centred at the area centroid,
    with principal axis ``up`` (``major``, ``middle`` or ``minor``) as z. The other two follow in cyclic
    order (``minor`` up: x major, y middle; ``major`` up: x middle, y minor; ``middle`` up: x minor,
    y major), so the map is a proper rotation. A canonicalised mesh then gets :func:`random_view`'s
    rotation about z: its orientation is random about the up axis only, like ModelNet's aligned models."""
    if up not in UP_AXES:
        raise SmoothPurifyError(f"up axis must be one of {', '.join(UP_AXES)}, got {up!r}")
    centre, axes, _ = principal_frame(verts, faces)
    k = UP_AXES.index(up)
    frame = axes[[(k + 1) % 3, (k + 2) % 3, k]]                           # rows: new x, y, z
    return (np.asarray(verts, np.float64) - centre) @ frame.T


def random_view(verts: np.ndarray, faces: np.ndarray, n: int, rng: np.random.Generator,
                scale: tuple[float, float] = (0.8, 1.25), jitter: float = 0.01, clip: float = 0.05) -> np.ndarray:
    """One training view of a mesh: ``n`` area-weighted surface points, a random rotation about the
    up (z) axis, an anisotropic scale drawn per axis from ``scale``, Gaussian jitter (sigma
    ``jitter``, clipped at ``clip``, in unit-ball units), then :func:`normalise`. The mesh is taken in
    the frame it comes in (:func:`canonicalise` it first for a common up axis)."""
    pts = sample_surface(verts, faces, n, rng)
    pts = pts - pts.mean(axis=0)
    pts = pts / max(float(np.linalg.norm(pts, axis=1).max()), 1e-12)
    pts = pts @ rotation_z(rng.uniform(0, 2 * np.pi)).T * rng.uniform(*scale, size=3)
    pts = pts + np.clip(rng.normal(0.0, jitter, pts.shape), -clip, clip)
    return normalise(pts)


def cloud_from_mesh(verts: np.ndarray, faces: np.ndarray, normalised: bool, n: int,
                    rng: np.random.Generator) -> np.ndarray:
    """The ``n``-point cloud a file stands for: a normalised point cloud with ``n`` points is kept as
    is (order included); otherwise points are sampled (area-weighted on a mesh, a random subset of a
    point-only file) and normalised."""
    if normalised and not len(faces) and len(verts) == n:
        return verts.astype(np.float32)
    if not len(faces):
        pts = verts[rng.choice(len(verts), n, replace=len(verts) < n)]
    else:
        pts = sample_surface(verts, faces, n, rng)
    return pts.astype(np.float32) if normalised else normalise(pts)

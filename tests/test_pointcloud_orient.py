"""Canonical orientation of meshes before their views are composed (geometry.principal_frame /
canonicalise, data.load_mesh, the ``pointcloud.compose.orient`` option and its fingerprint)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from smoothpurify import SmoothPurifyError
from modalities.contract import get_modality
from modalities.pointcloud import data as pcdata
from modalities.pointcloud.geometry import (canonicalise, parse_off, principal_frame, sample_surface,
                                            triangle_areas, write_off)
from tests.test_pointcloud import CUBE  # the handmade cube the OFF reader is tested on

def lopsided_mesh(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A triangle soup with three clearly different variances and skewed along every axis."""
    rng = np.random.default_rng(seed)
    verts = rng.exponential(1.0, size=(60, 3)) * np.array([4.0, 2.0, 1.0])
    faces = np.stack([rng.permutation(60)[:3] for _ in range(120)])
    return verts, faces


def test_principal_axes_are_an_orthonormal_proper_frame_sorted_by_variance():
    verts, faces = lopsided_mesh()
    _, axes, var = principal_frame(verts, faces)
    np.testing.assert_allclose(axes @ axes.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(axes) == pytest.approx(1.0)          # a rotation: the object is never mirrored
    assert var[0] > var[1] > var[2] > 0


def test_area_weighted_moments_match_dense_surface_samples():
    verts, faces = lopsided_mesh(1)
    centre, axes, var = principal_frame(verts, faces)
    pts = sample_surface(verts, faces, 400000, np.random.default_rng(0))
    np.testing.assert_allclose(pts.mean(0), centre, atol=0.02 * np.sqrt(var[0]))
    coords = (pts - centre) @ axes.T
    np.testing.assert_allclose(coords.var(0), var, rtol=0.02)
    # The sign convention: the surface's third central moment is positive along the major and middle axes.
    assert (coords[:, 0] ** 3).mean() > 0 and (coords[:, 1] ** 3).mean() > 0


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("up", ["minor", "major"])
def test_a_rotated_mesh_canonicalises_to_the_same_frame(seed, up):
    verts, faces = lopsided_mesh(seed)
    rot = Rotation.random(random_state=seed).as_matrix()
    moved = verts @ rot.T + np.array([3.0, -7.0, 0.5])
    np.testing.assert_allclose(canonicalise(moved, faces, up), canonicalise(verts, faces, up), atol=1e-9)
    _, axes, _ = principal_frame(verts, faces)
    _, axes_moved, _ = principal_frame(moved, faces)
    np.testing.assert_allclose(axes_moved, axes @ rot.T, atol=1e-9)      # the frame turns with the mesh


def test_the_up_option_puts_that_principal_axis_on_z():
    verts, faces = lopsided_mesh(2)
    _, _, var = principal_frame(verts, faces)
    for up, k in (("major", 0), ("middle", 1), ("minor", 2)):
        _, axes, v = principal_frame(canonicalise(verts, faces, up), faces)
        assert v == pytest.approx(var)
        np.testing.assert_allclose(np.abs(axes[k]), [0, 0, 1], atol=1e-9)   # axis k of the result is z
    with pytest.raises(SmoothPurifyError, match="up axis"):
        canonicalise(verts, faces, "sideways")


def test_tied_variances_keep_the_modelled_frame():
    # A cube: every axis has the same variance, so PCA cannot orient it; it keeps its modelled axes.
    verts, faces, _ = parse_off(CUBE)
    np.testing.assert_allclose(canonicalise(verts, faces), verts - 0.5, atol=1e-12)
    # A box 3 x 1 x 1: the long axis is the major one; the tied pair keeps the modelled y and z.
    box = verts * np.array([1.0, 1.0, 3.0])
    _, axes, _ = principal_frame(box, faces)
    np.testing.assert_allclose(np.abs(axes), [[0, 0, 1], [1, 0, 0], [0, 1, 0]], atol=1e-12)


def test_point_only_meshes_use_their_vertices():
    rng = np.random.default_rng(3)
    pts = rng.exponential(size=(500, 3)) * [3.0, 2.0, 1.0]
    centre, axes, var = principal_frame(pts, np.zeros((0, 3), np.int64))
    np.testing.assert_allclose(centre, pts.mean(0))
    np.testing.assert_allclose(np.sort(var)[::-1], np.sort(np.linalg.eigvalsh(np.cov(pts.T, bias=True)))[::-1])
    assert triangle_areas(pts, np.zeros((0, 3), np.int64)).size == 0


def test_load_mesh_orients_a_rotated_file_like_the_original(tmp_path):
    verts, faces = lopsided_mesh(4)
    write_off(tmp_path / "a.off", verts, faces, normalised=False)
    write_off(tmp_path / "b.off", verts @ Rotation.random(random_state=9).as_matrix().T, faces, normalised=False)
    a, fa = pcdata.load_mesh(tmp_path / "a.off")
    b, _ = pcdata.load_mesh(tmp_path / "b.off")
    np.testing.assert_allclose(a, b, atol=1e-4)                           # the files keep 6 decimals
    np.testing.assert_array_equal(fa, faces)
    raw, _ = pcdata.load_mesh(tmp_path / "a.off", orient="none")
    np.testing.assert_allclose(raw, verts, atol=1e-6)
    with pytest.raises(SmoothPurifyError, match="orient"):
        pcdata.load_mesh(tmp_path / "a.off", orient="sideways")


def test_orient_option_is_part_of_the_data_fingerprint():
    mod = get_modality("pointcloud")
    default = mod.data_params({"pointcloud": {"dataset": "cgal"}})
    assert default["compose"]["orient"] == "pca" and default["compose"]["up"] == "minor"
    # The default written out or left out is the same data; another orientation is other data.
    assert mod.data_params({"pointcloud": {"dataset": "cgal", "compose": {"orient": "pca"}}}) == default
    assert mod.data_params({"pointcloud": {"dataset": "cgal", "compose": {"orient": "none"}}}) != default
    assert mod.data_params({"pointcloud": {"dataset": "cgal", "compose": {"up": "major"}}}) != default
    assert mod.config({"pointcloud": {"compose": {"orient": "none"}}}).compose.orient == "none"
    with pytest.raises(SmoothPurifyError):
        mod.config({"pointcloud": {"compose": {"orient": "sideways"}}})

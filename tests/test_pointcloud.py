"""Point-cloud modality: OFF reading, area sampling, FPS / ball query against brute force, the ModelNet
layouts, user data round trips, and the nets under the core's per-sample gradients and f-SFT."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from smoothpurify import SmoothPurifyError
from smoothpurify.fisher import fisher_trace
from smoothpurify.likelihood import Categorical
from smoothpurify.parametrize import spectral_layers
from modalities.contract import get_modality
from modalities.pointcloud import data as pcdata
from modalities.pointcloud.geometry import (NORMALISED_TAG, RADIUS, normalise, parse_off, read_off, sample_surface,
                                            triangle_areas, write_off)
from modalities.pointcloud.models import MODELS, ball_query, farthest_point_sample

# A unit cube as six quads, with a comment, a glued header (ModelNet's quirk) and vertex colours.
CUBE = """OFF8 6 0
# a handmade cube
0 0 0 255 0 0
1 0 0
1 1 0
0 1 0
0 0 1
1 0 1
1 1 1
0 1 1
4 0 3 2 1
4 4 5 6 7
4 0 1 5 4
4 2 3 7 6
4 1 2 6 5
4 0 4 7 3
"""


def test_off_reader_on_a_handmade_cube():
    verts, faces, normalised = parse_off(CUBE)
    assert verts.shape == (8, 3) and not normalised
    assert faces.shape == (12, 3)                              # six quads, fan-triangulated
    np.testing.assert_allclose(triangle_areas(verts, faces).sum(), 6.0)   # the cube's surface area
    np.testing.assert_array_equal(faces[0], [0, 3, 2])
    np.testing.assert_array_equal(faces[1], [0, 2, 1])


def test_off_header_on_its_own_line_and_colour_header():
    text = "COFF\n3 1 0\n0 0 0 1 1 1 1\n1 0 0\n0 1 0\n3 0 1 2 9 9 9\n"
    verts, faces, _ = parse_off(text)
    assert verts.shape == (3, 3) and faces.tolist() == [[0, 1, 2]]


@pytest.mark.parametrize("text", ["PLY\n3 1 0\n", "OFF\n3 1\n0 0 0\n", "OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 7\n",
                                  "OFF\n2 0 0\n0 0 x\n1 1 1\n", ""])
def test_bad_off_is_one_error_line(text):
    with pytest.raises(SmoothPurifyError) as err:
        parse_off(text, "bad.off")
    assert "\n" not in str(err.value) and "bad.off" in str(err.value)


def test_area_sampling_is_uniform_on_a_known_mesh():
    # Two triangles in the plane z = 0: the unit square's lower-left half (area 0.5) and a triangle of
    # area 1.5 next to it. Uniform surface sampling puts 1/4 of the points in the first.
    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [2, 0, 0], [5, 0, 0], [2, 1, 0]], float)
    faces = np.array([[0, 1, 2], [3, 4, 5]])
    pts = sample_surface(verts, faces, 40000, np.random.default_rng(0))
    first = pts[:, 0] <= 1.0
    assert abs(first.mean() - 0.25) < 0.01
    # Inside the first triangle the density is uniform: each of its 4 congruent sub-triangles (midpoint
    # subdivision) gets a quarter of its points.
    x, y = pts[first, 0], pts[first, 1]
    corner = [(x < 0.5) & (y < 0.5) & (x + y > 0.5), x >= 0.5, y >= 0.5, x + y <= 0.5]
    shares = np.array([c.mean() for c in corner])
    np.testing.assert_allclose(shares, 0.25, atol=0.015)
    assert np.all(np.abs(pts[:, 2]) < 1e-12)


def test_area_sampling_covers_the_cube_faces_evenly():
    verts, faces, _ = parse_off(CUBE)
    pts = sample_surface(verts, faces, 12000, np.random.default_rng(1))
    on_face = [np.isclose(pts[:, a], v) for a in range(3) for v in (0.0, 1.0)]
    np.testing.assert_allclose([f.mean() for f in on_face], 1 / 6, atol=0.015)


def test_normalise_puts_the_cloud_in_the_cube():
    pts = normalise(np.random.default_rng(0).normal(size=(100, 3)) * 7 + 3)
    np.testing.assert_allclose(pts.mean(0), 0.5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(pts - 0.5, axis=1).max(), RADIUS, rtol=1e-5)
    assert pts.min() >= 0 and pts.max() <= 1


def _fps_brute(xyz: np.ndarray, k: int) -> list[int]:
    chosen = [0]
    for _ in range(k - 1):
        d = np.min([[np.sum((p - xyz[c]) ** 2) for c in chosen] for p in xyz], axis=1)
        chosen.append(int(np.argmax(d)))
    return chosen


def test_farthest_point_sampling_matches_brute_force():
    xyz = torch.rand(3, 50, 3, generator=torch.Generator().manual_seed(0))
    got = farthest_point_sample(xyz, 12)
    for b in range(3):
        assert got[b].tolist() == _fps_brute(xyz[b].double().numpy(), 12)


def test_ball_query_matches_brute_force():
    gen = torch.Generator().manual_seed(1)
    xyz = torch.rand(2, 60, 3, generator=gen)
    centres = xyz[:, :7]
    got = ball_query(xyz, centres, 0.3, 8)
    for b in range(2):
        for s in range(7):
            inside = [j for j in range(60) if float(((xyz[b, j] - centres[b, s]) ** 2).sum()) <= 0.09]
            want = (inside[:8] + [inside[0]] * 8)[:8]
            assert got[b, s].tolist() == want


def test_models_output_classes_and_support_per_sample_gradients():
    x = torch.rand(4, 3, 64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 1])
    for name in MODELS:
        model = MODELS[name](num_classes=3, num_points=64).eval()
        assert model(x).shape == (4, 3)
        assert float(fisher_trace(model, x, y, Categorical()).detach()) > 0   # torch.func.vmap(grad(...)) runs the net
        layers = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))}
        assert {n for n, _, _ in spectral_layers(model)} == layers   # f-SFT covers every 1x1 conv and linear


def test_modelnet_layout_round_trip(tmp_path):
    # A mesh in ModelNet's layout is sampled by area and normalised; written clouds read back exactly.
    (tmp_path / "mn" / "box" / "test").mkdir(parents=True)
    (tmp_path / "mn" / "box" / "test" / "box_0001.off").write_text(CUBE)
    x, y, classes = pcdata.load_modelnet(tmp_path / "mn", "test", 128, seed=0)
    assert x.shape == (1, 128, 3) and classes == ["box"]
    np.testing.assert_allclose(np.linalg.norm(x[0] - x[0].mean(0), axis=1).max(), RADIUS, rtol=1e-4)
    clouds = np.stack([normalise(np.random.default_rng(i).normal(size=(32, 3))) for i in range(5)])
    pcdata.write_modelnet(tmp_path / "w", "train", clouds, np.array([1, 0, 2, 2, 1]), ["a", "b", "c"])
    assert NORMALISED_TAG in (tmp_path / "w" / "a" / "train" / "a_00001.off").read_text()
    back, yb, _ = pcdata.load_modelnet(tmp_path / "w", "train", 32, seed=0)
    order = np.argsort([1, 0, 2, 2, 1], kind="stable")
    np.testing.assert_allclose(back, clouds[order], atol=1e-6)
    assert yb.tolist() == [0, 1, 1, 2, 2]


def test_resampled_text_layout(tmp_path):
    root = tmp_path / "modelnet40_normal_resampled"
    (root / "chair").mkdir(parents=True)
    (root / "modelnet40_shape_names.txt").write_text("airplane\nchair\n")
    (root / "modelnet40_test.txt").write_text("chair_0001\n")
    rows = np.random.default_rng(0).normal(size=(300, 6))
    np.savetxt(root / "chair" / "chair_0001.txt", rows, delimiter=",", fmt="%.6f")
    x, y, classes = pcdata.load_any(root, "test", 100, seed=0)
    assert x.shape == (1, 100, 3) and y.tolist() == [1] and classes == ["airplane", "chair"]
    assert x.min() >= 0 and x.max() <= 1
    with pytest.raises(SmoothPurifyError):
        pcdata.load_any(root, "train", 100, seed=0)


def test_split_by_mesh_has_no_mesh_in_both():
    rng = np.random.default_rng(0)
    for names in (["a", "b"], list("abcdefghijk")):
        train, test = pcdata.split_meshes(names, 0.34, rng)
        assert train and test and not set(train) & set(test) and sorted(train + test) == sorted(names)


def test_cgal_classes_each_have_a_train_and_a_test_mesh(tmp_path):
    # Stand-in meshes under the real names: the composed folders keep every mesh in one split only.
    for names in pcdata.CGAL_CLASSES.values():
        for n in names:
            write_off(tmp_path / "meshes" / f"{n}.off", *parse_off(CUBE)[:2], normalised=False)
    used = pcdata.compose_meshes(tmp_path / "meshes", tmp_path / "out", 16, {"train": 3, "test": 2}, 0.34, seed=0)
    assert not set(used["train"]) & set(used["test"])
    assert len(pcdata.class_folders(tmp_path / "out")) == len(pcdata.CGAL_CLASSES) >= 6
    for cls in pcdata.CGAL_CLASSES:
        meshes = {p.name.split("_", 1)[1].rsplit("_", 1)[0] for s in ("train", "test")
                  for p in (tmp_path / "out" / cls / s).glob("*.off")}
        assert len(meshes) >= 2


def test_user_data_round_trip_keeps_a_trigger_exactly(tmp_path):
    mod = get_modality("pointcloud")
    x = torch.from_numpy(np.stack([normalise(np.random.default_rng(i).normal(size=(40, 3))).T for i in range(6)]))
    x[:, :, -4:] = 0.95                          # an inserted "trigger" that moves the centroid
    y = torch.tensor([0, 2, 2, 1, 0, 2])
    mod.save_user_data(tmp_path / "poisoned", x, y)
    back, yb = mod.load_user_data(tmp_path / "poisoned", None, (3, 40))
    order = torch.argsort(y, stable=True)
    torch.testing.assert_close(back, x[order], atol=1e-6, rtol=0)
    assert yb.tolist() == y[order].tolist()
    with pytest.raises(SmoothPurifyError):
        mod.save_user_data(tmp_path / "poisoned", x, y)      # never over an existing folder
    with pytest.raises(SmoothPurifyError):
        mod.load_user_data(tmp_path / "missing")
    assert read_off(next((tmp_path / "poisoned" / "class_00" / "test").glob("*.off")))[2]


def test_rotation_trigger_visibility_separates_a_cube_from_a_posed_box():
    """The mesh measurement behind the point-cloud data notes (benchmarks/pointcloud_mesh_symmetry.py):
    90 degrees about x maps a cube onto a turn of itself (ratio ~1, sampling noise) but stands a
    1 x 0.6 x 0.2 box on its side, which no turn about z undoes."""
    import sys  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.pointcloud_mesh_symmetry import visibility_ratio  # noqa: PLC0415
    from modalities.pointcloud.attacks import rotation_matrix  # noqa: PLC0415

    verts, tri, _ = parse_off(CUBE)
    turn = rotation_matrix("x", 90).double().numpy()
    rng = np.random.default_rng(0)
    cube = visibility_ratio(verts - 0.5, tri, turn, rng, points=512, turns=36)
    box = visibility_ratio((verts - 0.5) * [1.0, 0.6, 0.2], tri, turn, rng, points=512, turns=36)
    assert cube < 1.3 < 2.0 < box

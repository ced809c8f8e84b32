"""Sweet Home 3D furniture catalogues: properties, OBJ, the upright frame, classes, the mesh cache."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest

from smoothpurify import SmoothPurifyError
from modalities.pointcloud import data as pcdata
from modalities.pointcloud import furniture as fur
from modalities.pointcloud.geometry import read_off

# A unit box, x in [0, 1], y (up in Sweet Home 3D) in [0, 3], z in [0, 2]; quads as OBJ writes them.
BOX_OBJ = """# box
v 0 0 0
v 1 0 0
v 1 3 0
v 0 3 0
v 0 0 2
v 1 0 2
v 1 3 2
v 0 3 2
vt 0 0
vn 0 0 1
f 1/1/1 2/1/1 3/1/1 4/1/1
f 5 8 7 6
f -8 -4 -3 -7
f 2 6 7 3
f 3 7 8 4
f 1 4 8 5
"""


def test_properties_escapes_and_continuations():
    text = "# comment\n! other\nname#1=Caf\\u00e9 chair\nlong#1 = a \\\n    b\nkey\\=x: y\ncategory#1=Living room\n"
    props = fur.parse_properties(text)
    assert props["name#1"] == "Caf\u00e9 chair"
    assert props["long#1"] == "a b"
    assert props["key=x"] == "y"
    assert props["category#1"] == "Living room"


def test_obj_quads_fan_and_negative_indices():
    verts, faces = fur.parse_obj(BOX_OBJ)
    assert verts.shape == (8, 3) and faces.shape == (12, 3)
    # the third face used negative indices: -8..-7 are vertices 0..1 (0-based) of the 8 so far
    assert faces[4].tolist() == [0, 4, 5] and faces[5].tolist() == [0, 5, 1]
    with pytest.raises(SmoothPurifyError, match="does not have"):
        fur.parse_obj("v 0 0 0\nf 1 2 3\n")
    with pytest.raises(SmoothPurifyError, match="OBJ line 2"):
        fur.parse_obj("v 0 0 0\nv 1 x 0\n")


def test_upright_scales_to_size_and_turns_y_up_into_z_up():
    verts, _ = fur.parse_obj(BOX_OBJ)
    # size is width x height x depth: the box's y (height 3) must end as z with extent 30
    out = fur.upright(verts, np.eye(3), [10.0, 30.0, 20.0])
    assert np.allclose(out.max(0) - out.min(0), [10.0, 20.0, 30.0])
    assert np.allclose(out.max(0) + out.min(0), 0.0)
    # a model's rotation is applied first: a quarter turn about x lays the box's y axis along z
    quarter = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], float)
    laid = fur.upright(verts, quarter, [1.0, 2.0, 3.0])
    assert np.allclose(laid.max(0) - laid.min(0), [1.0, 3.0, 2.0])
    # the frame change is a proper rotation (no mirror): the images of the unit axes keep their handedness
    corner_and_axes = np.vstack([np.zeros(3), np.eye(3)])
    moved = fur.upright(corner_and_axes, np.eye(3), [1.0, 1.0, 1.0])
    turn = moved[1:] - moved[0]
    assert np.allclose(turn @ turn.T, np.eye(3)) and np.linalg.det(turn) > 0

@pytest.mark.parametrize("name,category,cls", [
    ("Armchair", "Living room", "chair"), ("Wheelchair", "Miscellaneous", None), ("Armchair ottoman", "Living room", None),
    ("Bedside table", "Bedroom", None), ("Child bed", "Bedroom", "bed"), ("Desk lamp", "Lights", "lamp"),
    ("Sitting female", "Characters", "person"), ("Woman shoes", "Bedroom", None), ("Street lamp", "Lights", "lamp"),
    ("Plant box", "Exterior", None), ("Palm tree", "Exterior", "plant"), ("Corner sofa", "Living room", "sofa"),
    ("Full bookcase", "Living room", "storage"), ("Coffee table", "Living room", "table"), ("Table fan", "Misc", None)])
def test_classes_follow_the_name_rules(name, category, cls):
    assert fur.class_of(name, category) == cls


def _catalogue(path, entries):
    lines = []
    with zipfile.ZipFile(path, "w") as z:
        for n, (name, category, obj) in enumerate(entries, 1):
            z.writestr(f"cat/m{n}.obj", obj)
            lines += [f"id#{n}=Test#m{n}", f"name#{n}={name}", f"category#{n}={category}", f"model#{n}=/cat/m{n}.obj",
                      f"width#{n}=10", f"height#{n}=30", f"depth#{n}=20"]
        z.writestr("PluginFurnitureCatalog.properties", "\n".join(lines) + "\n")


def test_mesh_cache_from_catalogues_keeps_identical_geometry_once(tmp_path):
    folder = tmp_path / "sh3d-catalogues" / fur.FURNITURE_FOLDER
    folder.mkdir(parents=True)
    pyramid = "v 0 0 0\nv 1 0 0\nv 0 0 1\nv 0 1 0\nf 1 2 3\nf 1 2 4\nf 2 3 4\nf 1 3 4\n"
    _catalogue(folder / "test.sh3f", [("Chair", "Living room", BOX_OBJ), ("Chair", "Office", BOX_OBJ),
                                       ("Bed", "Bedroom", pyramid), ("Rug", "Living room", pyramid)])
    out, classes, how = fur.furniture_meshes(tmp_path)
    assert classes["chair"] == ("test-m1",) and classes["bed"] == ("test-m3",)
    assert sum(map(len, classes.values())) == 2 and "apt-get" in how
    verts, faces, normalised = read_off(out / "test-m1.off")
    assert faces.shape == (12, 3) and not normalised
    assert np.allclose(verts.max(0) - verts.min(0), [10.0, 20.0, 30.0], atol=1e-5)
    assert fur.furniture_meshes(tmp_path)[1] == classes  # the manifest is read back, nothing redone


def test_a_broken_model_names_its_catalogue_and_file(tmp_path):
    folder = tmp_path / "sh3d-catalogues" / fur.FURNITURE_FOLDER
    folder.mkdir(parents=True)
    _catalogue(folder / "bad.sh3f", [("Chair", "L", "v 0 0 zero\n")])
    with pytest.raises(SmoothPurifyError, match="bad.sh3f: model cat/m1.obj: OBJ line 1"):
        fur.furniture_meshes(tmp_path)
    assert not (tmp_path / "furniture-meshes").exists()      # nothing half-written is left as the cache
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sh3d-catalogues"]


def test_views_of_furniture_meshes_in_modelnet_layout(tmp_path):
    folder = tmp_path / "sh3d-catalogues" / fur.FURNITURE_FOLDER
    folder.mkdir(parents=True)
    pyramid = "v 0 0 0\nv 1 0 0\nv 0 0 1\nv 0 1 0\nf 1 2 3\nf 1 2 4\nf 2 3 4\nf 1 3 4\n"
    tall = BOX_OBJ.replace("v 0 3 0", "v 0 5 0")
    _catalogue(folder / "t.sh3f", [("Chair", "L", BOX_OBJ), ("Chair", "L", tall), ("Bed", "B", pyramid),
                                    ("Bed", "B", pyramid.replace("v 0 1 0", "v 0.5 1 0.5"))])
    out, classes, _ = fur.furniture_meshes(tmp_path)
    used = pcdata.compose_meshes(out, tmp_path / "mn", 16, {"train": 3, "test": 2}, 0.34, seed=0, orient="none",
                               classes={k: v for k, v in classes.items() if v})
    assert pcdata.class_folders(tmp_path / "mn") == ["bed", "chair"]
    assert not set(used["train"]) & set(used["test"])
    x, y, names = pcdata.load_modelnet(tmp_path / "mn", "test", 16, seed=0)
    assert x.shape == (4, 16, 3) and sorted(y.tolist()) == [0, 0, 1, 1]

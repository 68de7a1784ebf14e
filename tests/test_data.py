import io
import os

import numpy as np
import pytest
from PIL import Image

from uadkit.data.demo import make_demo_dataset
from uadkit.data.formats import detect_format, load_index
from uadkit.data.image_io import load_image, load_mask, prepare_image, resolve_sources
from uadkit.errors import UadkitError


def _save(path, arr, mode=None, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(path, **kw)
    return str(path)


def test_modes_become_rgb_uint8(tmp_path):
    gray = (np.arange(64 * 48) % 256).astype(np.uint8).reshape(48, 64)
    g = load_image(_save(tmp_path / "g.png", gray))
    assert g.shape == (48, 64, 3) and g.dtype == np.uint8 and (g[..., 0] == gray).all()
    # 16-bit gray scales to 8 bits, not clipped
    g16 = (np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 21)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    a = load_image(str(tmp_path / "g16.png"))
    assert a.dtype == np.uint8 and a.max() > 200 and a.min() == 0
    # RGBA: transparent pixels composite to black, opaque keep their colour
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255
    r = load_image(_save(tmp_path / "a.png", rgba))
    assert r.shape == (8, 8, 3) and r[0, 0, 0] == 200 and r[7, 7, 0] == 0
    # palette
    p = Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).convert("P")
    p.save(tmp_path / "p.png")
    assert load_image(str(tmp_path / "p.png")).shape == (8, 8, 3)


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)  # wide image
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_image(str(tmp_path / "rot.jpg")).shape[:2] == (40, 20)


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(UadkitError, match="no such file"):
        load_image(str(tmp_path / "missing.png"))
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(UadkitError, match="text.png: not an image"):
        load_image(str(tmp_path / "text.png"))
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buf, "PNG")
    (tmp_path / "trunc.png").write_bytes(buf.getvalue()[:60])
    with pytest.raises(UadkitError, match="trunc.png: corrupt or truncated"):
        load_image(str(tmp_path / "trunc.png"))
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(UadkitError, match="empty.png: empty file"):
        load_image(str(tmp_path / "empty.png"))


def test_sources_folder_recursive_sorted_images_only(tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    _save(tmp_path / "b.png", img)
    _save(tmp_path / "sub" / "a.jpg", img)
    _save(tmp_path / "A.PNG", img)
    (tmp_path / "notes.txt").write_text("x")
    names = [s.name for s in resolve_sources(str(tmp_path))]
    assert names == sorted(names) and len(names) == 3
    assert all(n.lower().endswith((".png", ".jpg")) for n in names)
    arr_sources = resolve_sources([img, np.zeros((8, 8), np.uint8), str(tmp_path / "b.png")])
    assert [s.name for s in arr_sources][:2] == ["array_0", "array_1"] and arr_sources[1].load().shape == (8, 8, 3)


def test_sources_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UadkitError, match="folder has no images"):
        resolve_sources(str(tmp_path / "empty"))
    with pytest.raises(UadkitError, match="no such file or folder"):
        resolve_sources(str(tmp_path / "nope.png"))
    # a bad array is reported when loaded, so that the other inputs of a list still run
    with pytest.raises(UadkitError, match="dtype uint8"):
        resolve_sources(np.zeros((4, 4, 3), np.float32))[0].load()
    with pytest.raises(UadkitError, match="HxWx3"):
        resolve_sources(np.zeros((4, 4, 2), np.uint8))[0].load()


def test_prepare_image_resizes_and_scales():
    im = np.full((30, 50, 3), 255, np.uint8)
    x = prepare_image(im, (16, 24))
    assert x.shape == (3, 16, 24) and x.dtype == np.float32 and np.allclose(x, 1.0)


def test_mask_binarised_and_size_checked(tmp_path):
    m = np.array([[0, 127], [128, 255]], np.uint8)
    p = _save(tmp_path / "m.png", m)
    assert load_mask(p).tolist() == [[False, False], [True, True]]
    with pytest.raises(UadkitError, match="differs from its image"):
        load_mask(p, (3, 3))


def test_demo_dataset_is_mvtec_layout(tmp_path):
    root = make_demo_dataset(tmp_path / "d", n_train=5, n_test_good=2, n_test_defect=2, size=64)
    assert detect_format(root) == "MVTec_AD"
    idx = load_index(root, val_split=0.2)
    assert len(idx.train) == 4 and len(idx.val) == 1
    defects = [s for s in idx.test if s.label]
    assert len(defects) == 4 and all(s.mask and os.path.isfile(s.mask) for s in defects)
    for s in defects:  # every defect has pixels in its mask
        assert load_mask(s.mask).any()
    # Same seed, same pixels: the demo is reproducible.
    again = make_demo_dataset(tmp_path / "e", n_train=5, n_test_good=2, n_test_defect=2, size=64)
    assert (load_image(os.path.join(root, "train/good/000.png")) ==
            load_image(os.path.join(again, "train/good/000.png"))).all()


def test_list_and_folder_formats(tmp_path):
    img = np.full((16, 16, 3), 100, np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8, 4:8] = 255
    root = tmp_path / "lists"
    for i in range(4):
        _save(root / "images" / f"g{i}.png", img)
    _save(root / "images" / "scratch" / "d0.png", img)
    _save(root / "masks" / "d0.png", mask)
    _save(root / "masks" / "zero.png", np.zeros((16, 16), np.uint8))
    (root / "train.txt").write_text("".join(f"images/g{i}.png\n" for i in range(3)))
    (root / "val.txt").write_text("images/g3.png masks/zero.png\nimages/scratch/d0.png masks/d0.png\n")
    idx = load_index(str(root), val_split=0.0)
    assert idx.type == "ListFile" and len(idx.train) == 3
    assert [(s.label, s.defect) for s in idx.test] == [(0, "good"), (1, "scratch")]
    # plain folders: good/ and defect/<type>/ with masks/
    f = tmp_path / "plain"
    for i in range(10):
        _save(f / "good" / f"{i}.png", img)
    _save(f / "defect" / "crack" / "c0.png", img)
    _save(f / "masks" / "c0.png", mask)
    idx = load_index(str(f), val_split=0.0)
    assert idx.type == "Folder" and len(idx.train) == 8
    assert sorted((s.label, s.defect) for s in idx.test) == [(0, "good"), (0, "good"), (1, "crack")]
    assert next(s for s in idx.test if s.label).mask.endswith("c0.png")
    # a folder of good images only
    g = tmp_path / "goodonly"
    for i in range(3):
        _save(g / f"{i}.png", img)
    idx = load_index(str(g), val_split=0.0)
    assert idx.type == "Folder" and len(idx.train) == 3 and not idx.test


def test_unknown_layout_is_clear(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "readme.txt").write_text("hi")
    with pytest.raises(UadkitError, match="not a known dataset layout"):
        detect_format(str(tmp_path / "x"))
    with pytest.raises(UadkitError, match="is not a folder"):
        detect_format(str(tmp_path / "nothing"))

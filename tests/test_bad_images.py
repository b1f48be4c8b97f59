"""Messy image folders: unreadable files are skipped and named once, odd modes load as RGB, class folders
are scanned safely, and the dataset folder is never written to."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, make_dataset, run_cli, tree_hash
from vitcli.data import BadImage, decode_square, load_rgb, scan_dataset

BOMB_LIMIT = 40 * 40  # Image.MAX_IMAGE_PIXELS in these tests: the 32 px images pass, the bombs do not


def _png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def write_bad_images(folder: Path) -> dict[str, str]:
    """One file per kind of unusable input -> the phrase its warning must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    png = bytearray(_png_bytes(Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))))
    start = png.find(b"IDAT") + 8
    for k in range(start, start + 64):  # flip bits inside the compressed pixel data
        png[k] ^= 0xFF
    (folder / "corrupt.png").write_bytes(bytes(png))
    jpg = _png_bytes(Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)), "JPEG")
    (folder / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (folder / "zero.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is a text file with an image extension\n" * 20)
    (folder / "pcx_named.png").write_bytes(_png_bytes(Image.new("RGB", (32, 32)), "PCX"))  # not allowlisted
    (folder / "icon.bmp").write_bytes(_png_bytes(Image.new("RGB", (32, 32)), "ICO"))
    Image.new("RGB", (48, 48)).save(folder / "bomb_warn.png")  # over the limit: Pillow warns -> error
    Image.new("RGB", (100, 100)).save(folder / "bomb_error.png")  # over twice the limit: Pillow raises
    return {"corrupt.png": "unreadable image", "truncated.jpg": "truncated", "zero.png": "empty file",
            "notes.jpg": "not an image in an allowed format", "pcx_named.png": "not an image in an allowed format",
            "icon.bmp": "not an image in an allowed format", "bomb_warn.png": "decompression-bomb limit",
            "bomb_error.png": "decompression-bomb limit"}


def write_odd_modes(folder: Path) -> dict[str, tuple[tuple[int, int], tuple[int, int, int]]]:
    """Readable images in awkward modes -> (a pixel (x, y), the RGB value it must load as)."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("1", (32, 32), 1).save(folder / "mode_1.png")
    Image.new("L", (32, 32), 100).save(folder / "mode_l.png")
    Image.new("LA", (32, 32), (100, 0)).save(folder / "mode_la.png")  # fully transparent -> white
    pal = Image.new("P", (32, 32), 0)
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putpixel((0, 0), 1)
    pal.save(folder / "mode_p.png", transparency=0)  # index 0 transparent -> white, index 1 kept
    pal.save(folder / "mode_p.gif", transparency=0)
    Image.new("RGBA", (32, 32), (0, 0, 0, 128)).save(folder / "mode_rgba.png")  # half black on white
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(folder / "mode_cmyk.tif")  # red
    Image.new("CMYK", (32, 32), (0, 0, 0, 0)).save(folder / "mode_cmyk.jpg")  # white
    grey16 = np.full((32, 32), 32768, dtype=np.uint16)
    grey16[0, 1] = 1000  # 1000 / 65535 * 255 = 4: scaled, where clipping would give 255
    Image.fromarray(grey16).save(folder / "mode_i16.png")
    rotated = Image.new("RGB", (40, 20), (255, 0, 0))
    rotated.paste((0, 0, 255), (0, 0, 10, 20))  # left stripe blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display: the blue stripe ends up on top
    rotated.save(folder / "exif_rotated.jpg", exif=exif.tobytes(), quality=95)
    rotated.save(folder / "broken_exif.jpg", exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xffjunk", quality=95)
    return {"mode_1.png": ((5, 5), (255, 255, 255)), "mode_l.png": ((5, 5), (100, 100, 100)),
            "mode_la.png": ((5, 5), (255, 255, 255)), "mode_p.png": ((0, 0), (200, 100, 50)),
            "mode_p.gif": ((5, 5), (255, 255, 255)), "mode_rgba.png": ((5, 5), (127, 127, 127)),
            "mode_cmyk.tif": ((5, 5), (255, 0, 0)), "mode_cmyk.jpg": ((5, 5), (255, 255, 255)),
            "mode_i16.png": ((1, 0), (4, 4, 4)), "exif_rotated.jpg": ((15, 5), (0, 0, 255)),
            "broken_exif.jpg": ((30, 10), (255, 0, 0))}


def close(a, b, tol: int = 3) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b, strict=True))


@pytest.fixture
def bomb_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", BOMB_LIMIT)


# ----------------------------------------------------------------------------------------------- decoding
def test_odd_modes_load_as_rgb_with_the_right_pixels(tmp_path, recwarn):
    expected = write_odd_modes(tmp_path / "odd")
    for name, (xy, rgb) in expected.items():
        img = load_rgb(tmp_path / "odd" / name)
        assert img.mode == "RGB", name
        assert close(img.getpixel(xy), rgb), (name, img.getpixel(xy), rgb)
    assert load_rgb(tmp_path / "odd" / "exif_rotated.jpg").size == (20, 40)  # EXIF orientation applied
    assert load_rgb(tmp_path / "odd" / "broken_exif.jpg").size == (40, 20)  # broken EXIF: pixels as stored
    assert load_rgb(tmp_path / "odd" / "mode_i16.png").getpixel((5, 5)) == (128, 128, 128)
    for name in expected:  # the training decode path (JPEG draft mode, resize, crop) agrees
        t = decode_square(tmp_path / "odd" / name, 32)
        assert t.shape == (3, 32, 32) and t.dtype == torch.uint8
    assert not [w for w in recwarn if "EXIF" in str(w.message)]  # Pillow's EXIF noise stays quiet


def test_each_bad_file_is_refused_with_its_path_and_reason(tmp_path, bomb_limit):
    reasons = write_bad_images(tmp_path / "bad")
    for name, phrase in reasons.items():
        with pytest.raises(BadImage) as e:
            decode_square(tmp_path / "bad" / name, 32)
        msg = str(e.value)
        assert msg.startswith(str(tmp_path / "bad" / name)) and phrase in msg, msg
        assert "\n" not in msg


def test_truncated_images_are_not_silently_padded():
    from PIL import ImageFile

    import vitcli.data  # noqa: F401  (importing vitcli must not switch Pillow to lenient decoding)

    assert not ImageFile.LOAD_TRUNCATED_IMAGES


# ----------------------------------------------------------------------------------------------- train
def _messy_dataset(tmp_path: Path) -> tuple[Path, dict[str, str], list[str]]:
    root = make_dataset(tmp_path / "messy", classes=("red", "green", "blue"), per_class=10)
    reasons = write_bad_images(root / "red")
    odd = write_odd_modes(root / "green")
    (root / "blue" / "picture.ppm").write_bytes(_png_bytes(Image.new("RGB", (32, 32)), "PPM"))  # not listed
    return root, reasons, list(odd)


def _warning_lines(output: str, name: str) -> list[str]:
    return [ln for ln in output.splitlines() if ln.startswith("warning: skipped") and f"/{name}:" in ln]


@pytest.mark.parametrize("cache", ["on", "off"])
def test_train_skips_and_names_each_bad_file_and_leaves_the_dataset_untouched(tmp_path, bomb_limit, cache):
    root, reasons, odd = _messy_dataset(tmp_path)
    before = tree_hash(root)
    # batch size 1 and no workers: with cache off every train image is decoded in the one epoch
    res = run_cli("train", root, *TINY, "--epochs", "1", "--batch-size", "1", "--set", f"data.cache={cache}",
                  "--set", "data.max_bad_fraction=0.5", "--set", "data.num_workers=0")
    assert res.exit_code == 0, res.output
    for name, phrase in reasons.items():
        lines = _warning_lines(res.output, name)
        assert len(lines) == 1 and phrase in lines[0], (name, lines, res.output)
    for name in odd + ["picture.ppm", "red_000.png"]:
        assert name not in res.output
    assert f"unreadable images skipped │ {len(reasons)}" in res.output.replace("  ", " ").replace("  ", " ")
    assert "Traceback" not in res.output
    assert tree_hash(root) == before


@pytest.mark.parametrize("cache", ["on", "off"])
def test_train_stops_when_more_than_max_bad_fraction_cannot_be_read(tmp_path, bomb_limit, cache):
    root, reasons, _ = _messy_dataset(tmp_path)
    before = tree_hash(root)
    total = 30 + len(reasons) + 11
    res = run_cli("train", root, *TINY, "--epochs", "1", "--set", f"data.cache={cache}",
                  "--set", "data.max_bad_fraction=0.1", "--set", "data.num_workers=0")
    assert res.exit_code == 1, res.output
    found = re.search(rf"(\d+) of {total} images in '.*' cannot be read, more than 'data.max_bad_fraction' 0.1",
                      res.output)
    assert found, res.output
    # cached: every file was decoded; uncached: the up-front header probe finds all but the corrupt pixel data
    # (and the truncated JPEG when its cut falls after the header) before a single step
    n = int(found[1])
    assert n == len(reasons) if cache == "on" else len(reasons) - 2 <= n <= len(reasons)
    assert "Traceback" not in res.output and not (tmp_path / "runs" / "train" / "last.pt").exists()
    assert tree_hash(root) == before


def test_uncached_training_stops_when_files_that_fail_only_on_decoding_pass_the_share(tmp_path):
    """Truncated files pass the up-front header probe; the share is checked again as they turn up."""
    root = make_dataset(tmp_path / "d", classes=("red", "green"), per_class=8)
    for p in sorted((root / "red").iterdir())[:4]:
        data = p.read_bytes()
        p.write_bytes(data[: data.find(b"IDAT") + 16])  # header intact, pixel data cut short
    res = run_cli("train", root, *TINY, "--epochs", "2", "--batch-size", "1", "--set", "data.cache=off",
                  "--set", "data.max_bad_fraction=0.1", "--set", "data.num_workers=0")
    assert res.exit_code == 1, res.output
    assert "cannot be read, more than 'data.max_bad_fraction' 0.1" in res.output
    assert "epoch 1/2" in res.output  # found while training, not by the up-front probe
    assert "Traceback" not in res.output


# ----------------------------------------------------------------------------------------------- folders
def test_hidden_folders_and_files_are_ignored(tmp_path):
    root = make_dataset(tmp_path / "d", classes=("red", "green"), per_class=4)
    for hidden in (".git", ".cache", "__MACOSX"):
        (root / hidden).mkdir()
        Image.new("RGB", (8, 8)).save(root / hidden / "x.png")
    (root / "red" / ".thumbs").mkdir()
    Image.new("RGB", (8, 8)).save(root / "red" / ".thumbs" / "t.png")
    Image.new("RGB", (8, 8)).save(root / "red" / "._red_000.png")
    ds = scan_dataset(root, 0.25, 0)
    assert ds.classes == ["green", "red"]
    assert len(ds.train) + len(ds.val) == 8


def test_empty_class_folder_is_a_clear_error_naming_it(tmp_path):
    root = make_dataset(tmp_path / "d", classes=("red", "green"), per_class=4)
    (root / "blue").mkdir()
    (root / "blue" / "readme.txt").write_text("no images here")
    res = run_cli("train", root, *TINY, "--epochs", "1")
    assert res.exit_code == 1
    assert "blue" in res.output and "holds no images" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output


def test_fewer_than_two_classes_is_a_clear_error(tmp_path):
    root = make_dataset(tmp_path / "d", classes=("red",), per_class=4)
    res = run_cli("train", root, *TINY, "--epochs", "1")
    assert res.exit_code == 1 and "at least two class subfolders" in res.output and "(red)" in res.output
    assert "Traceback" not in res.output


def test_class_names_with_markup_and_odd_characters_print_literally(tmp_path):
    root = make_dataset(tmp_path / "d", classes=("red", "green"), per_class=6)
    os.rename(root / "red", root / "[red]x")
    os.rename(root / "green", root / "grün 2 [bold]")
    before = tree_hash(root)
    res = run_cli("train", root, *TINY, "--epochs", "1", "--batch-size", "4")
    assert res.exit_code == 0, res.output
    assert "[red]x 5" in res.output and "grün 2 [bold] 5" in res.output
    assert tree_hash(root) == before
    written = [p for p in (tmp_path / "runs").rglob("*")]
    assert all(p.resolve().is_relative_to((tmp_path / "runs").resolve()) for p in written)


def test_symlink_loops_do_not_hang_or_duplicate_images(tmp_path):
    root = make_dataset(tmp_path / "d", classes=("red", "green"), per_class=4)
    os.symlink("..", root / "red" / "up")  # back to the dataset root: would pull in green's images
    os.symlink(".", root / "green" / "self")
    os.symlink("../../d", root / "green" / "deeper")
    os.symlink(".", root / "root_again")  # a "class" that is the dataset itself
    os.symlink("b.png", root / "red" / "a.png")  # a loop of file links
    os.symlink("a.png", root / "red" / "b.png")
    before = tree_hash(root)
    ds = scan_dataset(root, 0.25, 0)
    assert ds.classes == ["green", "red"]
    paths = [p.name for p in ds.train.paths + ds.val.paths]
    # the looping file links are skipped at the scan (one line each), like every other non-regular file
    assert sorted(paths) == sorted([f"green_{i:03d}.png" for i in range(4)] + [f"red_{i:03d}.png" for i in range(4)])
    with pytest.raises(BadImage, match="a.png"):
        load_rgb(root / "red" / "a.png")
    assert tree_hash(root) == before


# ----------------------------------------------------------------------------------------------- other commands
@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    """A tiny trained model for the red / green / blue classes of the messy dataset."""
    out = tmp_path_factory.mktemp("model")
    data = make_dataset(out / "clean", per_class=6)
    res = run_cli("train", data, *TINY, "--epochs", "1", "--batch-size", "4", "--output", out / "runs")
    assert res.exit_code == 0, res.output
    return out / "runs" / "train"


@pytest.mark.parametrize("command", ["predict", "eval", "inspect data"])
def test_other_commands_skip_and_name_each_bad_file_and_leave_the_dataset_untouched(tmp_path, bomb_limit,
                                                                                    model_run, command):
    root, reasons, odd = _messy_dataset(tmp_path)
    before = tree_hash(root)
    if command == "predict":
        res = run_cli("predict", root / "red", root / "green", "--model", model_run, "--device", "cpu")
        assert res.exit_code == 2, res.output  # some inputs could not be predicted
        for name in odd:  # the readable odd-mode images got a prediction row
            assert f"green/{name}" in res.output, name
    elif command == "eval":
        res = run_cli("eval", root, "--model", model_run, "--device", "cpu", "--output", tmp_path / "ev")
        assert res.exit_code == 0, res.output
        assert f"({len(reasons)} unreadable skipped)" in res.output
    else:
        res = run_cli("inspect", "data", root)
        assert res.exit_code == 0, res.output
        assert f"unreadable files: {len(reasons)}" in res.output
    for name, phrase in reasons.items():
        lines = [ln for ln in res.output.splitlines() if f"/red/{name}:" in ln]
        assert len(lines) == 1 and phrase in lines[0], (name, lines, res.output)
    assert "Traceback" not in res.output
    assert tree_hash(root) == before


@pytest.mark.parametrize("mode,values,want", [
    ("I", [70000, 32768, 0], [255, 128, 0]),  # 32-bit grey: 16-bit range, brighter clips (not scaled by its max)
    ("I", [200, 100, 0], [200, 100, 0]),  # 32-bit grey holding 8-bit values: as stored
    ("F", [1.0, 0.5, 0.0], [255, 128, 0]),  # float in 0..1: not black
    ("F", [300.0, 100.0, -5.0], [255, 100, 0]),  # float beyond 0..1: read as 0..255, clipped
    ("F", [float("nan"), 1.0, 0.0], [0, 255, 0]),  # NaN is black
])
def test_grey_modes_decode_by_their_declared_range(mode, values, want):
    from PIL import Image

    from vitcli.decode import to_rgb

    img = Image.new(mode, (3, 1))
    for x, v in enumerate(values):
        img.putpixel((x, 0), v)
    assert [to_rgb(img).getpixel((x, 0))[0] for x in range(3)] == want

"""Scanning, stratified splits and decoding: deterministic, and the dataset folder is never touched."""


import pytest
import torch
from PIL import Image

from conftest import make_dataset, tree_hash
from vitcli.data import decode_square, load_rgb, scan_dataset, stratified_split
from vitcli.errors import VitcliError


def test_stratified_split_is_deterministic_and_per_class():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    a = stratified_split(labels, 0.2, seed=3)
    assert a == stratified_split(labels, 0.2, seed=3)
    assert a != stratified_split(labels, 0.2, seed=4)
    train, val = a
    assert sorted(train + val) == list(range(100))
    assert [sum(labels[i] == c for i in val) for c in range(3)] == [10, 6, 4]


def test_scan_class_folders_makes_split_in_memory(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=10)
    (root / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".hidden" / "x.png")
    (root / "red" / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8)).save(root / "red" / "UPPER.JPG")
    before = tree_hash(root)
    ds = scan_dataset(root, 0.2, seed=0)
    assert ds.classes == ["blue", "green", "red"] and ds.split_made
    assert len(ds.train) + len(ds.val) == 31  # .txt and hidden folder ignored, .JPG counted
    assert scan_dataset(root, 0.2, seed=0).val.paths == ds.val.paths
    assert tree_hash(root) == before


def test_train_val_test_layout(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=4, splits=("train", "val", "test"))
    ds = scan_dataset(root, 0.2, seed=0)
    assert not ds.split_made
    assert (len(ds.train), len(ds.val), len(ds.test)) == (12, 12, 12)


def test_fewer_than_two_classes_is_an_error(tmp_path):
    make_dataset(tmp_path / "d", classes=("red",), per_class=3)
    with pytest.raises(VitcliError, match="at least two class subfolders"):
        scan_dataset(tmp_path / "d", 0.2, 0)


def test_decode_applies_exif_orientation_and_returns_rgb_square(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    shown = load_rgb(tmp_path / "r.jpg")
    assert shown.size == (20, 40) and shown.mode == "RGB"
    x = decode_square(tmp_path / "r.jpg", 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8

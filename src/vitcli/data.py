"""The data core's public names, in one import: `from vitcli import data as D`.

The rooms live in their own modules: dataset.py (splits, the Source and Store protocols), sources.py (the
table that says what DATA is), folders.py / manifest.py / shards.py (class folders, label files, tar shards),
decode.py (files -> uint8 tensors), store.py (decoded splits as batches) and augment.py (batched transforms).
Every image is decoded once to a square uint8 tensor of side `resize_size` (shorter side resized, center crop);
evaluation center-crops `img_size` from it, training draws random-resized crops on the compute device. The
dataset folder is only ever read.
"""

from __future__ import annotations

from vitcli.augment import TrainAugment, center_crop, crop_grid, eval_transform, normalize, normalize_
from vitcli.dataset import (
                            SPLIT_NAMES,
                            Dataset,
                            Source,
                            Split,
                            Store,
                            check_val_split,
                            class_counts,
                            label_text,
                            stratified_split,
)
from vitcli.decode import (
                            IMAGE_EXTS,
                            PIL_FORMATS,
                            BadImage,
                            allowed_formats,
                            check_regular,
                            decode_many,
                            decode_square,
                            file_kind,
                            load_rgb,
                            load_rgb_draft,
                            pil_warning_filters,
                            preprocess_info,
                            probe_image,
                            probe_many,
                            probe_pixels,
                            probe_sizes,
                            resample_filter,
                            resize_size_for,
                            to_rgb,
)
from vitcli.folders import ScanLog, class_folders, is_hidden, is_run_folder, list_images, scan_classes
from vitcli.sources import open_source, scan_dataset, scan_eval_folder
from vitcli.store import BadImageLog, ImageStore, PathList, epoch_batches, label_tensor, sequential_batches

__all__ = ["IMAGE_EXTS", "PIL_FORMATS", "SPLIT_NAMES", "BadImage", "BadImageLog", "Dataset", "ImageStore",
           "PathList", "ScanLog", "Source", "Split", "Store", "TrainAugment", "allowed_formats", "center_crop",
           "check_regular", "check_val_split", "class_counts", "class_folders", "crop_grid", "decode_many",
           "decode_square", "epoch_batches", "eval_transform", "file_kind", "is_hidden", "is_run_folder",
           "label_tensor", "label_text", "list_images", "load_rgb", "load_rgb_draft", "normalize", "normalize_",
           "open_source", "pil_warning_filters", "preprocess_info", "probe_image", "probe_many",
           "probe_pixels", "probe_sizes",
           "resample_filter", "resize_size_for", "scan_classes", "scan_dataset", "scan_eval_folder",
           "sequential_batches", "stratified_split", "to_rgb"]

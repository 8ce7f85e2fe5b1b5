import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mgd_ray.data.datasets import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    VOC_CLASSES,
    VOC_PALETTE,
    DatasetError,
    Sample,
    SegmentationDataset,
    cityscapes_samples,
    folder_samples,
    load_mask,
    read_id_list,
    voc_samples,
)
from mgd_ray.data.partitions import build_manifest

META = {
    "dataset": "folder",
    "root": "/x",
    "num_classes": 4,
    "class_names": ["a", "b", "c", "d"],
    "partition": "generated",
    "fraction": 0.5,
    "seed": 0,
}


def test_class_constants():
    assert len(VOC_CLASSES) == len(VOC_PALETTE) == 21
    assert VOC_PALETTE[:3] == ((0, 0, 0), (128, 0, 0), (0, 128, 0))
    assert VOC_PALETTE[VOC_CLASSES.index("person")] == (192, 128, 128)
    assert len(CITYSCAPES_CLASSES) == len(CITYSCAPES_PALETTE) == 19
    assert CITYSCAPES_PALETTE[CITYSCAPES_CLASSES.index("car")] == (0, 0, 142)


# ---------------------------------------------------------------- VOC
def test_voc_samples_use_the_train_aug_layout(voc_root):
    samples = voc_samples(voc_root, ["a_2", "a_0"], "train_aug.txt")
    assert samples == [
        Sample("a_2", voc_root.absolute() / "JPEGImages/a_2.jpg", voc_root.absolute() / "SegmentationClassAug/a_2.png"),
        Sample("a_0", voc_root.absolute() / "JPEGImages/a_0.jpg", voc_root.absolute() / "SegmentationClassAug/a_0.png"),
    ]


def test_voc_falls_back_to_segmentation_class_only_without_aug(voc_root):
    shutil.copytree(voc_root / "SegmentationClassAug", voc_root / "SegmentationClass")
    assert voc_samples(voc_root, ["a_1"], "l")[0].label.parent.name == "SegmentationClassAug"
    shutil.rmtree(voc_root / "SegmentationClassAug")
    assert voc_samples(voc_root, ["a_1"], "l")[0].label.parent.name == "SegmentationClass"


def test_voc_id_not_in_dataset_names_list_and_line(voc_root):
    with pytest.raises(DatasetError, match=r"train_aug\.txt line 2: image of id 'b_9'.*not in this dataset"):
        voc_samples(voc_root, ["a_0", "b_9"], "train_aug.txt")


def test_voc_missing_label_names_the_file(voc_root):
    (voc_root / "SegmentationClassAug" / "a_3.png").unlink()
    with pytest.raises(DatasetError, match=r"val\.txt line 4: label of id 'a_3'") as err:
        voc_samples(voc_root, ["a_0", "a_1", "a_2", "a_3"], "val.txt")
    assert str(voc_root.absolute() / "SegmentationClassAug" / "a_3.png") in str(err.value)


def test_voc_duplicate_ids_name_both_lines(voc_root):
    with pytest.raises(DatasetError, match=r"l\.txt line 3: 'a_0' already appears on line 1"):
        voc_samples(voc_root, ["a_0", "a_1", "a_0"], "l.txt")


def test_voc_ids_escaping_the_root_are_refused(voc_root, tmp_path, files):
    files.image(tmp_path / "etc" / "x.jpg", np.zeros((4, 4, 3)))
    with pytest.raises(DatasetError, match=r"l\.txt line 1: .*outside the dataset root"):
        voc_samples(voc_root, ["../../etc/x"], "l.txt")


def test_voc_symlink_leading_out_of_the_root_is_refused(voc_root, tmp_path, files):
    outside = files.image(tmp_path / "elsewhere.jpg", np.zeros((4, 4, 3)))
    (voc_root / "JPEGImages" / "link.jpg").symlink_to(outside)
    files.mask(voc_root / "SegmentationClassAug" / "link.png", np.zeros((4, 4)))
    with pytest.raises(DatasetError, match="outside the dataset root") as err:
        voc_samples(voc_root, ["link"], "l.txt")
    assert str(outside) in str(err.value)


def test_folder_symlink_leading_out_of_the_root_is_refused(folder_root, tmp_path, files):
    outside = files.image(tmp_path / "elsewhere.png", np.zeros((8, 8, 3)))
    (folder_root / "images" / "s0.png").unlink()
    (folder_root / "images" / "s0.png").symlink_to(outside)
    with pytest.raises(DatasetError, match=r"s0\.png resolves to .*elsewhere\.png, outside the dataset root"):
        folder_samples(folder_root)


def test_voc_root_without_jpeg_images(tmp_path):
    with pytest.raises(DatasetError, match="JPEGImages"):
        voc_samples(tmp_path, ["a"], "l.txt")


def test_read_id_list_handles_crlf_and_missing_final_newline(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_bytes(b"a_1\r\nb_2\r\nc_3")
    assert read_id_list(path) == ["a_1", "b_2", "c_3"]
    path.write_text("a_1\nb 2\n")
    with pytest.raises(DatasetError, match=r"ids\.txt line 2: expected one id"):
        read_id_list(path)


# ---------------------------------------------------------------- Cityscapes
def test_cityscapes_samples_parse_the_cps_list(cityscapes_root):
    samples = cityscapes_samples(cityscapes_root, cityscapes_root / "train_list.txt")
    root = cityscapes_root.absolute()
    assert [s.id for s in samples] == ["aachen_000000_000019", "bremen_000001_000019"]
    assert samples[1].image == root / "images/train/bremen_000001_000019.png"
    assert samples[1].label == root / "segmentation/train/bremen_000001_000019_gtFine.png"


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("/images/train/aachen_000000_000019.png\n", "expected '<image path><TAB><label path>'"),
        ("a.png\tb.png\tc.png\n", "expected '<image path><TAB><label path>'"),
        ("/images/train/nope.png\t/segmentation/train/nope_gtFine.png\n", "image .*nope.png does not exist"),
        ("/../outside.png\t/segmentation/train/x.png\n", "outside the dataset root"),
        (
            "/images/train/aachen_000000_000019.png\t/segmentation/train/aachen_000000_000019_gtFine.png\n",
            "'aachen_000000_000019' already listed on line 1",
        ),
    ],
)
def test_cityscapes_list_errors_name_file_and_line(cityscapes_root, bad_line, message):
    list_file = cityscapes_root / "train_list.txt"
    list_file.write_text(list_file.read_text() + "\n" + bad_line)
    with pytest.raises(DatasetError, match=message) as err:
        cityscapes_samples(cityscapes_root, list_file)
    assert f"{list_file} line 4:" in str(err.value)


def test_cityscapes_missing_label(cityscapes_root):
    (cityscapes_root / "segmentation/train/bremen_000001_000019_gtFine.png").unlink()
    with pytest.raises(DatasetError, match=r"train_list\.txt line 2: label .*bremen_000001_000019_gtFine\.png"):
        cityscapes_samples(cityscapes_root, str(cityscapes_root / "train_list.txt"))


# ---------------------------------------------------------------- folder
def test_folder_samples_pair_images_and_masks(folder_root):
    samples, names = folder_samples(folder_root)
    assert names == ["background", "one", "two", "three"]
    assert [s.id for s in samples] == [f"s{i}" for i in range(10)]
    assert samples[0].image == folder_root.absolute() / "images/s0.png"
    assert samples[0].label == folder_root.absolute() / "labels/s0.png"


def test_folder_accepts_jpeg_images(folder_root, files):
    (folder_root / "images" / "s0.png").unlink()
    files.image(folder_root / "images" / "s0.jpeg", np.zeros((8, 8, 3)))
    samples, _ = folder_samples(folder_root)
    assert samples[0].image.name == "s0.jpeg"


def test_folder_image_without_mask_is_unlabeled(folder_root):
    (folder_root / "labels" / "s4.png").unlink()
    samples, _ = folder_samples(folder_root)
    assert [s.id for s in samples if s.label is None] == ["s4"] and len(samples) == 10


def test_folder_mask_without_image(folder_root, files):
    files.mask(folder_root / "labels" / "ghost.png", np.zeros((8, 8)))
    with pytest.raises(DatasetError, match="masks without an image: ghost"):
        folder_samples(folder_root)


def test_folder_duplicate_ids(folder_root, files):
    files.image(folder_root / "images" / "s2.jpg", np.zeros((8, 8, 3)))
    with pytest.raises(DatasetError, match="two images with id 's2'"):
        folder_samples(folder_root)


def test_folder_class_file_problems(folder_root):
    (folder_root / "classes.txt").write_text("background\n\nthing\n")
    with pytest.raises(DatasetError, match=r"classes\.txt line 2: empty class name"):
        folder_samples(folder_root)
    (folder_root / "classes.txt").unlink()
    with pytest.raises(DatasetError, match=r"classes\.txt: cannot read class list"):
        folder_samples(folder_root)


# ---------------------------------------------------------------- loading
def manifest_for(root: Path, labeled: list[str], meta: dict = META):
    samples, _ = folder_samples(root)
    train, val = samples[:-2], samples[-2:]
    unlabeled = [s.id for s in train if s.id not in labeled]
    return build_manifest(train, val, labeled, unlabeled, meta)


def test_dataset_items_per_subset(folder_root):
    table = manifest_for(folder_root, ["s3", "s7"])
    labeled = SegmentationDataset(table, "labeled", num_classes=4)
    assert len(labeled) == 2
    item = labeled[1]
    assert item["id"] == "s7"
    expected = np.array(Image.open(folder_root / "labels" / "s7.png"))
    assert item["label"].dtype == torch.int64 and item["label"].tolist() == expected.tolist()
    assert item["label"][7, 7] == 255 and item["label"][0, 7] == 3
    pixels = np.array(Image.open(folder_root / "images" / "s7.png"))
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 8, 8)
    assert torch.allclose(item["image"], torch.from_numpy(pixels).permute(2, 0, 1) / 255.0)

    unlabeled = SegmentationDataset(table, "unlabeled", num_classes=4)
    assert len(unlabeled) == 6 and all("label" not in unlabeled[i] for i in range(6))
    val = SegmentationDataset(table, "val", num_classes=4)
    assert [val[i]["id"] for i in range(2)] == ["s8", "s9"] and "label" in val[0]


def test_dataset_applies_the_joint_transform(folder_root):
    calls = []

    def transform(image, mask):
        calls.append((type(image).__name__, None if mask is None else type(mask).__name__))
        return image.float(), None if mask is None else mask.long() + 1

    table = manifest_for(folder_root, ["s0"])
    item = SegmentationDataset(table, "labeled", 4, transform)[0]
    SegmentationDataset(table, "unlabeled", 4, transform)[0]
    assert calls == [("Image", "Mask"), ("Image", None)]
    assert item["label"][0, 0] == 1 and item["label"][7, 0] == 2


def test_palette_masks_read_as_indices(tmp_path, files):
    mask = np.array([[0, 1], [2, 255]], np.uint8)
    path = files.mask(tmp_path / "m.png", mask, palette=True)
    assert Image.open(path).mode == "P"
    assert load_mask(path, 3).tolist() == mask.tolist()


def test_mask_value_out_of_range_names_file_values_and_range(folder_root, files):
    mask = np.zeros((8, 8))
    mask[0, 0], mask[1, 1], mask[2, 2], mask[3, 3] = 9, 7, 255, 3
    files.mask(folder_root / "labels" / "s1.png", mask)
    table = manifest_for(folder_root, ["s1"])
    with pytest.raises(DatasetError, match=r"s1\.png: mask values \[7, 9\] outside the allowed range 0\.\.3"):
        SegmentationDataset(table, "labeled", num_classes=4)[0]


def test_rgb_mask_is_refused(tmp_path, files):
    path = files.image(tmp_path / "m.png", np.zeros((4, 4, 3)))
    with pytest.raises(DatasetError, match=r"m\.png: mask has PIL mode 'RGB'"):
        load_mask(path, 3)


def test_corrupt_image_names_the_file_when_loaded(folder_root):
    (folder_root / "images" / "s1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    table = manifest_for(folder_root, ["s1"])
    with pytest.raises(DatasetError, match=r"s1\.png: cannot read image"):
        SegmentationDataset(table, "labeled", num_classes=4)[0]


def test_mask_and_image_sizes_must_match(folder_root, files):
    files.mask(folder_root / "labels" / "s2.png", np.zeros((6, 8)))
    table = manifest_for(folder_root, ["s2"])
    with pytest.raises(DatasetError, match=r"s2\.png: mask is 8×6"):
        SegmentationDataset(table, "labeled", num_classes=4)[0]


def test_subset_must_exist_and_be_non_empty(folder_root):
    table = manifest_for(folder_root, [f"s{i}" for i in range(8)])
    with pytest.raises(DatasetError, match="no 'unlabeled' rows"):
        SegmentationDataset(table, "unlabeled", num_classes=4)
    with pytest.raises(DatasetError, match="subset 'train'"):
        SegmentationDataset(table, "train", num_classes=4)

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from pipeline.render import (
    Format,
    decode_jpeg,
    decode_png_labels,
    encode_rle,
    overlay,
    palette,
    render,
    rle_counts,
    rle_decode,
    rle_from_string,
    rle_to_string,
)

CLASSES = ("background", "person", "dog")


def labels_and_image(h=48, w=64, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.zeros((h, w), np.uint8)
    labels[5:30, 10:40] = 1
    labels[20:45, 35:60] = 2
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return image, labels


def test_overlay_tints_only_labelled_pixels():
    image, labels = labels_and_image()
    out = overlay(image, labels, alpha=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(out[labels == 0], image[labels == 0])
    person = palette(3)[1].astype(int)
    diff_before = np.abs(image[labels == 1].astype(int) - person).mean()
    diff_after = np.abs(out[labels == 1].astype(int) - person).mean()
    assert diff_after < diff_before * 0.6  # pulled towards the class colour


def test_overlay_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="does not match"):
        overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4), np.uint8))


def test_overlay_jpeg_decodes_to_source_size():
    image, labels = labels_and_image()
    header, payload = render(Format.OVERLAY, image, labels, CLASSES, quality=90)
    assert header == {}
    assert decode_jpeg(payload).shape == image.shape


def test_labels_png_and_raw_round_trip_exactly():
    image, labels = labels_and_image()
    _, png = render(Format.LABELS, image, labels, CLASSES)
    assert np.array_equal(decode_png_labels(png), labels)
    header, raw = render(Format.RAW, image, labels, CLASSES)
    assert header["dtype"] == "uint8"
    assert np.array_equal(np.frombuffer(raw, np.uint8).reshape(labels.shape), labels)


def test_rle_is_what_pycocotools_writes_and_reads():
    rng = np.random.default_rng(1)
    for _ in range(30):
        h, w = (int(v) for v in rng.integers(1, 50, 2))
        m = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        ours = rle_to_string(rle_counts(m))
        assert ours == coco_mask.encode(np.asfortranarray(m))["counts"].decode()
        assert np.array_equal(coco_mask.decode({"size": [h, w], "counts": ours}), m)
        assert np.array_equal(rle_decode(rle_from_string(ours), h, w), m.astype(bool))


def test_rle_format_lists_present_classes_only():
    image, labels = labels_and_image()
    header, payload = render(Format.RLE, image, labels, CLASSES)
    assert payload == b""
    assert [r["class"] for r in header["rle"]] == [1, 2]
    rebuilt = np.zeros_like(labels)
    for r in header["rle"]:
        rebuilt[coco_mask.decode({"size": r["size"], "counts": r["counts"]}).astype(bool)] = r["class"]
    assert np.array_equal(rebuilt, labels)
    assert encode_rle(np.zeros((3, 3), np.uint8), CLASSES) == []


def test_bad_quality_is_rejected():
    image, labels = labels_and_image()
    with pytest.raises(ValueError, match="quality"):
        render(Format.OVERLAY, image, labels, CLASSES, quality=0)

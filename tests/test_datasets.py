"""Readers of labelled image trees and manifests, on trees made in tmp_path."""

import re

import pytest

from anchorscan.anchors.io.datasets import LabelledImage, forensynths, genimage, read_dataset
from anchorscan.anchors.io.datasets import manifest as read_labelled_manifest
from anchorscan.anchors.io.storage import read_bytes
from anchorscan.transforms.listing import files_below


def manifest(path):
    return read_labelled_manifest(path, read_bytes(path))


def read_kind(kind, root, split="val"):
    return read_dataset(kind, root, files_below, read_bytes, split)


def make_tree(root, relative_paths):
    """Empty files stand for images: the readers only list them."""
    for relative in relative_paths:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    return root


def as_triples(images, root):
    prefix = f"{root}/"
    assert all(image.uri.startswith(prefix) for image in images)
    return {(image.uri[len(prefix) :], image.label, image.generator) for image in images}


FORENSYNTHS_TREE = {
    # ProGAN-like: a category level
    "progan/airplane/0_real/a.png": (0, "progan"),
    "progan/airplane/1_fake/b.PNG": (1, "progan"),
    "progan/cat/0_real/nested/c.jpeg": (0, "progan"),
    "progan/cat/1_fake/d.webp": (1, "progan"),
    # no category level
    "biggan/0_real/e.JPG": (0, "biggan"),
    "biggan/1_fake/f.bmp": (1, "biggan"),
    "biggan/1_fake/g.tiff": (1, "biggan"),
}


def test_forensynths_with_and_without_categories(tmp_path):
    root = make_tree(tmp_path, [*FORENSYNTHS_TREE, "progan/airplane/0_real/notes.txt", "README.md"])
    images = forensynths(str(root), files_below)
    assert as_triples(images, root) == {(path, *truth) for path, truth in FORENSYNTHS_TREE.items()}
    assert images == sorted(images, key=lambda image: image.uri)
    assert read_kind("forensynths", str(root)) == images


def test_forensynths_refuses_another_structure_naming_it(tmp_path):
    make_tree(tmp_path, ["sdv4/val/ai/a.png", "sdv4/val/nature/b.png"])
    with pytest.raises(ValueError, match=r"2 images .* not in the forensynths folder structure .*0_real"):
        forensynths(str(tmp_path), files_below)


def test_forensynths_refuses_a_stray_image(tmp_path):
    make_tree(tmp_path, [*FORENSYNTHS_TREE, "progan/preview.png"])
    with pytest.raises(ValueError, match=re.escape("progan/preview.png")):
        forensynths(str(tmp_path), files_below)


def test_a_label_folder_needs_a_file_below_it(tmp_path):
    make_tree(tmp_path, ["biggan/0_real.png"])
    with pytest.raises(ValueError, match="not in the forensynths folder structure"):
        forensynths(str(tmp_path), files_below)


GENIMAGE_TREE = {
    "midjourney/imagenet_midjourney/train/ai/a.png": (1, "midjourney", "train"),
    "midjourney/imagenet_midjourney/train/nature/b.JPEG": (0, "midjourney", "train"),
    "midjourney/imagenet_midjourney/val/ai/c.png": (1, "midjourney", "val"),
    "midjourney/imagenet_midjourney/val/nature/d.jpg": (0, "midjourney", "val"),
    "sdv4/val/ai/e.png": (1, "sdv4", "val"),
    "sdv4/val/nature/sub/f.png": (0, "sdv4", "val"),
    "sdv4/train/ai/g.png": (1, "sdv4", "train"),
}


@pytest.mark.parametrize("split", ["val", "train"])
def test_genimage_reads_one_split(tmp_path, split):
    root = make_tree(tmp_path, GENIMAGE_TREE)
    expected = {
        (path, label, generator)
        for path, (label, generator, in_split) in GENIMAGE_TREE.items()
        if in_split == split
    }
    assert as_triples(genimage(str(root), files_below, split=split), root) == expected
    assert as_triples(read_kind("genimage", str(root), split=split), root) == expected


def test_genimage_reads_val_by_default(tmp_path):
    root = make_tree(tmp_path, GENIMAGE_TREE)
    assert genimage(str(root), files_below) == genimage(str(root), files_below, split="val")


def test_genimage_refuses_unknown_label_folders_and_splits(tmp_path):
    make_tree(tmp_path, [*GENIMAGE_TREE, "sdv4/val/fake/h.png"])
    with pytest.raises(ValueError, match=re.escape("sdv4/val/fake/h.png")):
        genimage(str(tmp_path), files_below)
    with pytest.raises(ValueError, match="split"):
        genimage(str(tmp_path), files_below, split="test")


def test_genimage_refuses_a_forensynths_tree(tmp_path):
    make_tree(tmp_path, FORENSYNTHS_TREE)
    with pytest.raises(ValueError, match="not in the genimage"):
        genimage(str(tmp_path), files_below)


def test_genimage_split_without_images_is_an_error(tmp_path):
    make_tree(tmp_path, ["sdv4/train/ai/a.png"])
    with pytest.raises(ValueError, match=r"no images .* \(split val\)"):
        genimage(str(tmp_path), files_below)


@pytest.mark.parametrize("kind", ["forensynths", "genimage"])
def test_a_tree_without_images_is_an_error(tmp_path, kind):
    make_tree(tmp_path, ["progan/cat/0_real/notes.txt"])
    with pytest.raises(ValueError, match="no images"):
        read_kind(kind, str(tmp_path))


def test_a_missing_root_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        forensynths(str(tmp_path / "absent"), files_below)


def test_the_file_listing_can_be_replaced():
    listing = ["progan/cat/0_real/a.png", "progan/cat/1_fake/b.png"]
    images = forensynths("gs://bucket/univfd/", lambda root: listing)
    assert images == [
        LabelledImage("gs://bucket/univfd/progan/cat/0_real/a.png", 0, "progan"),
        LabelledImage("gs://bucket/univfd/progan/cat/1_fake/b.png", 1, "progan"),
    ]


def test_files_below_lists_relative_paths_below_the_root(tmp_path):
    make_tree(tmp_path, ["a/b/c.png", "d.txt"])
    assert sorted(files_below(str(tmp_path))) == ["a/b/c.png", "d.txt"]


def write_manifest(path, text):
    path.write_text(text)
    return str(path)


def test_manifest_resolves_relative_uris_and_reads_both_label_spellings(tmp_path):
    folder = tmp_path / "sets"
    folder.mkdir()
    absolute = tmp_path / "elsewhere" / "x.png"
    path = write_manifest(
        folder / "eval.csv",
        (
            "generator,uri,label\n"
            "dalle,images/a.png,1\n"
            "none,images/b.jpg,0\n"
            f"none,{absolute},Real\n"
            "sdxl,gs://bucket/c.png, fake \n"
        ),
    )
    assert manifest(path) == [
        LabelledImage(str(folder / "images" / "a.png"), 1, "dalle"),
        LabelledImage(str(folder / "images" / "b.jpg"), 0, "none"),
        LabelledImage(str(absolute), 0, "none"),
        LabelledImage("gs://bucket/c.png", 1, "sdxl"),
    ]
    assert read_kind("manifest", path) == manifest(path)


def test_manifest_refuses_a_missing_column(tmp_path):
    path = write_manifest(tmp_path / "m.csv", "uri,label\na.png,1\n")
    with pytest.raises(ValueError, match=r"lacks the column.*generator"):
        manifest(path)


@pytest.mark.parametrize("row", ["a.png,2,g", "a.png,synthetic,g", ",1,g", "a.png"])
def test_manifest_refuses_a_bad_row_naming_its_line(tmp_path, row):
    path = write_manifest(tmp_path / "m.csv", f"uri,label,generator\nok.png,0,g\n{row}\n")
    with pytest.raises(ValueError, match="line 3"):
        manifest(path)


def test_an_empty_manifest_is_an_error(tmp_path):
    path = write_manifest(tmp_path / "m.csv", "uri,label,generator\n")
    with pytest.raises(ValueError, match="lists no images"):
        manifest(path)


def test_unknown_dataset_kind_is_refused_listing_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="forensynths, genimage, manifest"):
        read_kind("imagenet", str(tmp_path))

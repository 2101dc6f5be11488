"""Readers of labelled image collections, each returning ``LabelledImage(uri, label, generator)``
with label 0 for real images and 1 for generated ones.

The folder layouts parse a flat listing of the files below the root, as '/'-separated paths
relative to it: the form in which an object store lists a prefix, so that a lister for gs:// can
be passed as ``list_files`` without changing the parsing.
"""
from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Callable, Iterable

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
FORENSYNTHS_LABELS = {"0_real": 0, "1_fake": 1}
GENIMAGE_LABELS = {"nature": 0, "ai": 1}
GENIMAGE_SPLITS = ("train", "val")
MANIFEST_LABELS = {"0": 0, "1": 1, "real": 0, "fake": 1}
MANIFEST_COLUMNS = ("uri", "label", "generator")

FileLister = Callable[[str], Iterable[str]]


@dataclasses.dataclass(frozen=True)
class LabelledImage:
    uri: str
    label: int  # 0 real, 1 generated
    generator: str


def local_files(root: str) -> list[str]:
    """Every file below a local folder, as '/'-separated paths relative to it."""
    if not os.path.isdir(root):
        raise ValueError(f"image root {root} is not a folder")
    return [os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
            for folder, _, names in os.walk(root) for name in names]


def is_image(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _image_paths(root: str, list_files: FileLister) -> list[list[str]]:
    return [path.split("/") for path in sorted(list_files(root)) if is_image(path)]


def _join(root: str, parts: list[str]) -> str:
    return "/".join([root.rstrip("/"), *parts])


def _marker_index(parts: list[str], names) -> int | None:
    """Where a folder named in ``names`` follows <generator> and an optional middle folder, with
    something below it."""
    for index in (1, 2):
        if index < len(parts) - 1 and parts[index] in names:
            return index
    return None


def _checked(images: list[LabelledImage], strays: list[list[str]], root: str, layout: str,
             structure: str) -> list[LabelledImage]:
    if strays:
        examples = ", ".join("/".join(parts) for parts in strays[:3])
        raise ValueError(f"{len(strays)} images under {root} are not in the {layout} layout "
                         f"{structure} (e.g. {examples}); choose the layout these folders follow")
    if not images:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {root} "
                         f"in the {layout} layout {structure}")
    return images


def forensynths(root: str, list_files: FileLister = local_files) -> list[LabelledImage]:
    """``ROOT/<generator>/[<category>/]{0_real,1_fake}/...``, the ForenSynths and UnivFD test
    layout; generators may differ in whether they have categories."""
    images, strays = [], []
    for parts in _image_paths(root, list_files):
        index = _marker_index(parts, FORENSYNTHS_LABELS)
        if index is None:
            strays.append(parts)
        else:
            images.append(LabelledImage(_join(root, parts), FORENSYNTHS_LABELS[parts[index]],
                                        parts[0]))
    return _checked(images, strays, root, "forensynths",
                    "ROOT/<generator>/[<category>/]{0_real,1_fake}/...")


def genimage(root: str, split: str = "val", list_files: FileLister = local_files) -> list[LabelledImage]:
    """``ROOT/<generator>/[<subset>/]{train,val}/{nature,ai}/...``: the GenImage layout, whose
    downloads nest one folder per generator (e.g. ``imagenet_ai_0419_sdv4``) before the split."""
    if split not in GENIMAGE_SPLITS:
        raise ValueError(f"split must be one of {GENIMAGE_SPLITS}, got {split!r}")
    images, strays = [], []
    for parts in _image_paths(root, list_files):
        index = _marker_index(parts, GENIMAGE_SPLITS)
        if index is None or index + 2 >= len(parts) or parts[index + 1] not in GENIMAGE_LABELS:
            strays.append(parts)
        elif parts[index] == split:
            images.append(LabelledImage(_join(root, parts), GENIMAGE_LABELS[parts[index + 1]],
                                        parts[0]))
    return _checked(images, strays, root, f"genimage (split {split})",
                    "ROOT/<generator>/[<subset>/]{train,val}/{nature,ai}/...")


def _resolve(uri: str, folder: str) -> str:
    return uri if "://" in uri or os.path.isabs(uri) else os.path.join(folder, uri)


def manifest(path: str) -> list[LabelledImage]:
    """A CSV with columns uri,label,generator; labels 0/1 or real/fake, URIs absolute or
    relative to the manifest's folder."""
    folder = os.path.dirname(os.path.abspath(path))
    images = []
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        missing = [column for column in MANIFEST_COLUMNS if column not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"manifest {path} lacks the column(s) {', '.join(missing)}; "
                             f"its header must name {','.join(MANIFEST_COLUMNS)}")
        for row in reader:
            uri, label, generator = ((row[column] or "").strip() for column in MANIFEST_COLUMNS)
            if not uri or label.lower() not in MANIFEST_LABELS:
                raise ValueError(f"manifest {path} line {reader.line_num}: needs a uri and a label "
                                 f"0, 1, real or fake, got uri {uri!r} and label {label!r}")
            images.append(LabelledImage(_resolve(uri, folder), MANIFEST_LABELS[label.lower()],
                                        generator))
    if not images:
        raise ValueError(f"manifest {path} lists no images")
    return images


LAYOUTS: dict[str, Callable[..., list[LabelledImage]]] = {
    "forensynths": forensynths, "genimage": genimage, "manifest": manifest}


def read_layout(kind: str, root: str, **kwargs) -> list[LabelledImage]:
    """The labelled images of a collection in the layout named ``kind``."""
    if kind not in LAYOUTS:
        raise ValueError(f"unknown layout {kind!r}; choose one of {', '.join(sorted(LAYOUTS))}")
    return LAYOUTS[kind](root, **kwargs)

"""Readers of labelled image datasets, each returning ``LabelledImage(uri, label, generator)``
with label 0 for real images and 1 for generated ones.

Folder datasets (ForenSynths, GenImage) parse a flat listing of the files below the root, as
'/'-separated paths relative to it: the form in which an object store lists a prefix. The
caller passes the lister (``list_files``) and, for manifests, the file's bytes, so this module
reads nothing itself and gs:// behaves as local folders do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

from anchorscan.anchors.errors import UserError
from anchorscan.anchors.io.manifests import names_local_file, read_manifest
from anchorscan.anchors.io.uris import IMAGE_EXTENSIONS, is_image_path

FORENSYNTHS_LABELS = {"0_real": 0, "1_fake": 1}
GENIMAGE_LABELS = {"nature": 0, "ai": 1}
GENIMAGE_SPLITS = ("train", "val")
MANIFEST_LABELS = {"0": 0, "1": 1, "real": 0, "fake": 1}
MANIFEST_COLUMNS = ("uri", "label", "generator")

FileLister = Callable[[str], Iterable[str]]


class DatasetError(UserError, ValueError):
    """A labelled dataset that is not laid out or labelled as its --dataset says."""


@dataclasses.dataclass(frozen=True)
class LabelledImage:
    uri: str
    label: int  # 0 real, 1 generated
    generator: str


def _image_paths(root: str, list_files: FileLister) -> list[list[str]]:
    return [path.split("/") for path in sorted(list_files(root)) if is_image_path(path)]


def _join(root: str, parts: list[str]) -> str:
    return "/".join([root.rstrip("/"), *parts])


def _marker_index(parts: list[str], names) -> int | None:
    """Where a folder named in ``names`` follows <generator> and an optional middle folder, with
    something below it."""
    for index in (1, 2):
        if index < len(parts) - 1 and parts[index] in names:
            return index
    return None


def _checked(
    images: list[LabelledImage], strays: list[list[str]], root: str, kind: str, structure: str
) -> list[LabelledImage]:
    if strays:
        examples = ", ".join("/".join(parts) for parts in strays[:3])
        raise DatasetError(
            f"{len(strays)} images under {root} are not in the {kind} folder "
            f"structure {structure} (e.g. {examples}); choose the --dataset these "
            "folders follow"
        )
    if not images:
        raise DatasetError(
            f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {root} "
            f"in the {kind} folder structure {structure}"
        )
    return images


def forensynths(root: str, list_files: FileLister) -> list[LabelledImage]:
    """``ROOT/<generator>/[<category>/]{0_real,1_fake}/...``, the ForenSynths and UnivFD test
    set's folders; generators may differ in whether they have categories."""
    images, strays = [], []
    for parts in _image_paths(root, list_files):
        index = _marker_index(parts, FORENSYNTHS_LABELS)
        if index is None:
            strays.append(parts)
        else:
            images.append(LabelledImage(_join(root, parts), FORENSYNTHS_LABELS[parts[index]], parts[0]))
    return _checked(images, strays, root, "forensynths", "ROOT/<generator>/[<category>/]{0_real,1_fake}/...")


def genimage(root: str, list_files: FileLister, split: str = "val") -> list[LabelledImage]:
    """``ROOT/<generator>/[<subset>/]{train,val}/{nature,ai}/...``: GenImage's folders, whose
    downloads nest one folder per generator (e.g. ``imagenet_ai_0419_sdv4``) before the split."""
    if split not in GENIMAGE_SPLITS:
        raise DatasetError(f"split must be one of {GENIMAGE_SPLITS}, got {split!r}")
    images, strays = [], []
    for parts in _image_paths(root, list_files):
        index = _marker_index(parts, GENIMAGE_SPLITS)
        if index is None or index + 2 >= len(parts) or parts[index + 1] not in GENIMAGE_LABELS:
            strays.append(parts)
        elif parts[index] == split:
            images.append(LabelledImage(_join(root, parts), GENIMAGE_LABELS[parts[index + 1]], parts[0]))
    return _checked(
        images,
        strays,
        root,
        f"genimage (split {split})",
        "ROOT/<generator>/[<subset>/]{train,val}/{nature,ai}/...",
    )


def manifest(path: str, data: bytes) -> list[LabelledImage]:
    """A manifest (see ``manifests``) with columns uri,label,generator; labels 0/1 or real/fake."""
    images = []
    for line, row in enumerate(read_manifest(path, data, MANIFEST_COLUMNS), start=2):
        label, generator = ((row[column] or "").strip() for column in MANIFEST_COLUMNS[1:])
        if names_local_file(path, row["uri"]):
            raise DatasetError(
                f"manifest {path} line {line} names the local file {row['uri']!r}; a manifest fetched "
                "over http(s) or from gs:// may name only remote URIs"
            )
        if not row["uri"] or label.lower() not in MANIFEST_LABELS:
            raise DatasetError(
                f"manifest {path} line {line}: needs a uri and a label 0, 1, real "
                f"or fake, got uri {row['uri']!r} and label {label!r}"
            )
        images.append(LabelledImage(row["uri"], MANIFEST_LABELS[label.lower()], generator))
    if not images:
        raise DatasetError(f"manifest {path} lists no images")
    return images


DATASETS = ("forensynths", "genimage", "manifest")


def read_dataset(
    kind: str, root: str, list_files: FileLister, read_bytes: Callable[[str], bytes], split: str = "val"
) -> list[LabelledImage]:
    """The labelled images of the dataset at ``root`` (a folder, or the manifest file)."""
    if kind == "forensynths":
        return forensynths(root, list_files)
    if kind == "genimage":
        return genimage(root, list_files, split)
    if kind == "manifest":
        return manifest(root, read_bytes(root))
    raise DatasetError(f"unknown dataset kind {kind!r}; choose one of {', '.join(DATASETS)}")

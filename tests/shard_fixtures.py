"""Shards as users have them: written by webdataset's own writer in img2dataset's layout (a tar of
KEY.jpg, KEY.json and KEY.txt per sample, keys of the shard's number and the sample's, a sidecar
Parquet of every attempted download beside it), and hostile shards with what each must give."""

from __future__ import annotations

import hashlib
import io
import json
import pathlib
import tarfile
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from helpers import sample_photos


def photo_jpegs(count: int, seed: int = 0, size=(240, 256), downloaded=None) -> list[bytes]:
    """Random crops of the sample photos, as JPEG bytes; with ``downloaded``, crops of that
    (height, width) area-downscaled to ``size``, as img2dataset stores an image at its
    --image_size (cv2's INTER_AREA, JPEG quality 95)."""
    rng = np.random.default_rng(seed)
    photos = list(sample_photos().values())
    cut = downloaded or size
    images = []
    for i in range(count):
        photo = photos[i % len(photos)]
        top = rng.integers(0, photo.shape[0] - cut[0])
        left = rng.integers(0, photo.shape[1] - cut[1])
        image = Image.fromarray(photo[top : top + cut[0], left : left + cut[1]])
        if downloaded:
            image = image.resize(size[::-1], Image.Resampling.BOX)  # PIL's area average
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=95)
        images.append(buffer.getvalue())
    return images


def write_img2dataset(
    folder: pathlib.Path,
    shards: int,
    per_shard: int,
    first_shard: int = 0,
    seed: int = 0,
    sidecar: bool = True,
    failed_per_shard: int = 1,
    host: str = "images.example",
    downloaded: tuple[int, int] | None = None,
) -> dict:
    """Shards ``folder/NNNNN.tar`` as img2dataset writes them, through ``webdataset.ShardWriter``;
    each shard's last ``failed_per_shard`` keys failed to download: in the sidecar (status
    ``failed_to_download``), not in the tar; URLs on ``host``. ``downloaded``: the (height,
    width) each image was downloaded at before it was stored downscaled (see ``photo_jpegs``),
    which its metadata records as ``original_height``, ``original_width``. Returns the shards,
    the sample URIs by shard, each sample's image bytes by URI and its sidecar row by URI."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    images = iter(photo_jpegs(shards * per_shard, seed, downloaded=downloaded))
    written: dict = {"shards": [], "samples": {}, "images": {}, "rows": {}}
    pattern = str(folder / "%05d.tar")
    with wds.ShardWriter(pattern, maxcount=per_shard, start_shard=first_shard, verbose=0) as writer:
        for number in range(first_shard, first_shard + shards):
            shard = str(folder / f"{number:05d}.tar")
            rows = []
            for index in range(per_shard + failed_per_shard):
                key = f"{number:05d}{index:04d}"
                url = f"http://{host}/{key}.jpg"
                caption = f"photo {key}"
                if index >= per_shard:
                    rows.append(_row(key, url, caption, "failed_to_download", None))
                    continue
                image = next(images)
                meta = _row(key, url, caption, "success", image, downloaded)
                writer.write({"__key__": key, "jpg": image, "json": meta, "txt": caption})
                rows.append(meta)
                uri = f"{shard}#{key}"
                written["samples"].setdefault(shard, []).append(uri)
                written["images"][uri] = image
                written["rows"][uri] = meta
            written["shards"].append(shard)
            if sidecar:
                pq.write_table(pa.Table.from_pylist(rows), folder / f"{number:05d}.parquet")
    return written


def _row(
    key: str, url: str, caption: str, status: str, image: bytes | None, downloaded: tuple | None = None
) -> dict:
    """A sample's metadata as img2dataset records it (json member and sidecar row alike): the
    stored image's size, and the downloaded one's (the same where it was not resized)."""
    size = Image.open(io.BytesIO(image)).size if image else (None, None)
    original = downloaded[::-1] if downloaded and image else size
    return {
        "key": key,
        "url": url,
        "caption": caption,
        "status": status,
        "error_message": None if image else "HTTP 404",
        "width": size[0],
        "height": size[1],
        "original_width": original[0],
        "original_height": original[1],
        "sha256": hashlib.sha256(image).hexdigest() if image else None,
    }


# --- hostile shards ------------------------------------------------------------------------


def _add(
    archive: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""
):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _tar(path: pathlib.Path, members: list[tuple]) -> bytes:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as archive:
        for member in members:
            _add(archive, *member)
    return path.read_bytes()


# A member larger than this is refused; hostile_shards' big member is past it.
HOSTILE_MAX_BYTES = 200_000


def write_hostile_shards(folder: pathlib.Path) -> dict[str, dict]:
    """Hostile shards in ``folder``: name -> {"scored": sample URIs that must be scored,
    "errors": {URI: words its error row must hold}}; failed downloads recorded as such are in
    neither."""
    folder.mkdir(parents=True, exist_ok=True)
    jpg = photo_jpegs(12, seed=7)
    meta = json.dumps({"status": "success"}).encode()
    failed = json.dumps({"status": "failed_to_download"}).encode()
    expected: dict[str, dict] = {}

    def shard(name: str, members: list[tuple], scored=(), errors=None, sidecar: list[dict] | None = None):
        path = folder / name
        _tar(path, members)
        if sidecar is not None:
            pq.write_table(pa.Table.from_pylist(sidecar), path.with_suffix(".parquet"))
        uri = str(path)
        expected[name] = {
            "scored": [f"{uri}#{key}" for key in scored],
            "errors": {
                (uri if key is None else f"{uri}#{key}"): words for key, words in (errors or {}).items()
            },
        }
        return path

    # Cut inside its third sample's image; the sidecar lists a fourth the read never reaches.
    good = [(f"k{i}.jpg", jpg[i]) for i in range(4)]
    whole = _tar(folder / "whole.tar", good)
    with tarfile.open(folder / "whole.tar") as archive:
        last = archive.getmember("k3.jpg")
    (folder / "whole.tar").unlink()
    cut = last.offset_data + last.size // 2
    path = folder / "truncated.tar"
    path.write_bytes(whole[:cut])
    pq.write_table(
        pa.Table.from_pylist([{"key": f"k{i}", "status": "success"} for i in range(4)]),
        folder / "truncated.parquet",
    )
    expected["truncated.tar"] = {
        "scored": [f"{path}#k0", f"{path}#k1", f"{path}#k2"],
        "errors": {f"{path}#k3": "cut short", str(path): "cut short"},
    }
    shard(
        "big_member.tar",
        [("small.jpg", jpg[4]), ("big.jpg", b"\xff" * (HOSTILE_MAX_BYTES + 1))],
        scored=["small"],
        errors={"big": "larger than --max_bytes"},
    )
    shard(
        "escaping.tar",
        [
            ("../escape.jpg", jpg[5]),
            ("/etc/absolute.jpg", jpg[5]),
            ("symlink.jpg", b"", tarfile.SYMTYPE, "/etc/passwd"),
            ("hardlink.jpg", b"", tarfile.LNKTYPE, "../escape.jpg"),
            ("device.jpg", b"", tarfile.CHRTYPE),
            ("pipe.jpg", b"", tarfile.FIFOTYPE),
            ("fine.jpg", jpg[6]),
        ],
        scored=["fine"],
        errors={
            "../escape": "climbs out",
            "/etc/absolute": "absolute path",
            "symlink": "a link",
            "hardlink": "a link",
            "device": "a device",
            "pipe": "a device or pipe",
        },
    )
    shard(
        "duplicate_keys.tar",
        [("a.jpg", jpg[7]), ("b.jpg", jpg[8]), ("a.jpg", jpg[9])],
        scored=["a", "b"],
        errors={"a#member=3": "duplicate key"},
    )
    shard(
        "no_image.tar",
        [("lost.json", meta), ("lost.txt", b"a caption"), ("failed.json", failed), ("kept.jpg", jpg[10])],
        scored=["kept"],
        errors={"lost": "no image member"},
    )
    shard(
        "two_images.tar",
        [("both.jpg", jpg[0]), ("both.png", jpg[1]), ("masked.jpg", jpg[2]), ("masked.mask.png", b"mask")],
        scored=["masked"],
        errors={"both": "2 image members"},
    )
    (folder / "not_a_tar.tar").write_bytes(jpg[11])
    expected["not_a_tar.tar"] = {"scored": [], "errors": {str(folder / "not_a_tar.tar"): "not a tar archive"}}
    shard("empty.tar", [], errors={None: "holds no samples"})
    (folder / "zero_bytes.tar").write_bytes(b"")
    expected["zero_bytes.tar"] = {
        "scored": [],
        "errors": {str(folder / "zero_bytes.tar"): "not a tar archive"},
    }
    # The sidecar does not match the tar: a downloaded sample it lists is missing, one it does
    # not list is there (scored, with its JSON member's fields).
    shard(
        "mismatched.tar",
        [
            ("listed.jpg", jpg[3]),
            ("unlisted.jpg", jpg[4]),
            ("unlisted.json", json.dumps({"url": "u"}).encode()),
        ],
        scored=["listed", "unlisted"],
        errors={"missing": "does not hold it"},
        sidecar=[
            {"key": "listed", "url": "http://a/listed", "status": "success"},
            {"key": "missing", "url": "http://a/missing", "status": "success"},
            {"key": "failed", "url": "http://a/failed", "status": "failed_to_download"},
        ],
    )
    bad = shard("bad_sidecar.tar", [("alone.jpg", jpg[5])], scored=["alone"])
    bad.with_suffix(".parquet").write_bytes(b"not parquet at all")
    expected["bad_sidecar.tar"]["errors"][str(bad.with_suffix(".parquet"))] = "not a Parquet table"
    return expected


def write_flood(path: pathlib.Path, members: int = 100_000) -> None:
    """A shard of ``members`` empty caption members: every one a sample without an image."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as archive:
        for index in range(members):
            _add(archive, f"{index:06d}.txt")


def write_gzip_bomb(path: pathlib.Path, declared: int, kind: bytes = tarfile.REGTYPE) -> None:
    """A gzip'd tar whose one member declares ``declared`` bytes of zeros, streamed through gzip
    so the file is about a thousandth of that: a member ``bomb.jpg``, or with ``kind`` a GNU
    long-name (``tarfile.GNUTYPE_LONGNAME``) or PAX (``tarfile.XHDTYPE``) header."""
    info = tarfile.TarInfo("bomb.jpg")
    info.type, info.size = kind, declared
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)  # 31: the gzip container
    zeros = bytes(2**20)
    with open(path, "wb") as out:
        out.write(compressor.compress(info.tobuf(tarfile.GNU_FORMAT)))
        left = -(-declared // 512) * 512 + 1024  # the padded data, then the end-of-archive marker
        while left:
            chunk = min(left, len(zeros))
            out.write(compressor.compress(zeros[:chunk]))
            left -= chunk
        out.write(compressor.flush())


def write_gzip_shard(path: pathlib.Path, images: list[bytes]) -> list[str]:
    """A gzip'd tar of one JPEG sample per image (keys g0, g1, ...); returns the keys."""
    keys = [f"g{index}" for index in range(len(images))]
    with tarfile.open(path, "w:gz", format=tarfile.GNU_FORMAT) as archive:
        for key, image in zip(keys, images):
            _add(archive, f"{key}.jpg", image)
    return keys


# Keys no sample URI can carry, as (member name, the words of its error row).
UNSAFE_KEYS = [
    ("k#member=5.jpg", "holds '#'"),
    ("line\nbreak.jpg", "a control character"),
    ("L" * 5000 + ".jpg", "longer than 256 characters"),
]


def write_unsafe_keys(path: pathlib.Path) -> dict:
    """A shard whose keys would make URIs collide or break lines: ``k``, then a literal
    ``k#member=5`` (the URI a duplicate ``k`` at member 5 gets), ``x``, ``y``, the duplicate
    ``k`` at member 5, a key with a newline and a 5,000-character key, then ``ok``. Returns
    {"scored": URIs, "errors": {URI: words}}."""
    jpg = photo_jpegs(8, seed=11)
    names = [
        "k.jpg",
        UNSAFE_KEYS[0][0],
        "x.jpg",
        "y.jpg",
        "k.jpg",
        UNSAFE_KEYS[1][0],
        UNSAFE_KEYS[2][0],
        "ok.jpg",
    ]
    _tar(path, [(name, image) for name, image in zip(names, jpg)])
    shard = str(path)
    errors = {f"{shard}#k#member=5": "duplicate key"}
    for position, (_, words) in zip((2, 6, 7), UNSAFE_KEYS):
        errors[f"{shard}##member={position}"] = words
    return {"scored": [f"{shard}#{key}" for key in ("k", "x", "y", "ok")], "errors": errors}

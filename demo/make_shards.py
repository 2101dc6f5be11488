"""Writes the demo's tiny scraped dataset, demo/data/shards/, in img2dataset's layout: tar shards
of KEY.jpg-style samples (here the bundled PNG crops: KEY.png, KEY.json, KEY.txt) with a sidecar
Parquet per shard listing every attempted download, one of which failed (no sample in the tar).
The scan's real, bicubic and waifu2x crops are dealt round-robin into three shards, and one
real crop is "scraped" twice (an exact duplicate that curation drops). Every byte is a function
of the crops, so rerunning this script rewrites the same files.

    python demo/make_shards.py
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

HERE = Path(__file__).parent
SCAN = HERE / "data" / "scan"
OUT = HERE / "data" / "shards"
CLASSES = ("real", "bicubic", "waifu2x")
SHARDS = 3


def _member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uname = info.gname = ""
    archive.addfile(info, io.BytesIO(data))


def main() -> None:
    crops = [path for kind in CLASSES for path in sorted((SCAN / kind).glob("*.png"))]
    crops.append(sorted((SCAN / "real").glob("*.png"))[0])  # scraped twice
    OUT.mkdir(parents=True, exist_ok=True)
    for number in range(SHARDS):
        mine = crops[number::SHARDS]
        rows = []
        with tarfile.open(OUT / f"{number:05d}.tar", "w", format=tarfile.PAX_FORMAT) as archive:
            for index, path in enumerate(mine):
                key = f"{number:05d}{index:04d}"
                data = path.read_bytes()
                width, height = Image.open(path).size
                meta = {
                    "key": key,
                    "url": f"https://photos.example/{path.parent.name}/{path.name}",
                    "caption": path.stem.split("__")[0].replace("_", " "),
                    "status": "success",
                    "error_message": None,
                    "width": width,
                    "height": height,
                }
                _member(archive, f"{key}.png", data)
                _member(archive, f"{key}.json", json.dumps(meta).encode())
                _member(archive, f"{key}.txt", meta["caption"].encode())
                rows.append(meta)
        key = f"{number:05d}{len(mine):04d}"
        rows.append(
            {
                "key": key,
                "url": f"https://photos.example/gone/{key}.jpg",
                "caption": "a photo that was gone",
                "status": "failed_to_download",
                "error_message": "HTTP 404 Not Found",
                "width": None,
                "height": None,
            }
        )
        pq.write_table(pa.Table.from_pylist(rows), OUT / f"{number:05d}.parquet")
    print(f"{len(crops)} samples in {SHARDS} shards under {OUT}")


if __name__ == "__main__":
    main()

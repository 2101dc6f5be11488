"""The byte sources, in the order they claim a URI: the first that claims it reads it (a tar
shard's source before the plain file's, which claims everything). Kept apart from the sources
themselves so that no source module imports another's."""

from __future__ import annotations

from anchorscan.anchors.io.shards import TarShardSource
from anchorscan.anchors.io.sources import ByteSource, FileSource

SOURCES: tuple[ByteSource, ...] = (TarShardSource(), FileSource())


def source_for(uri: str) -> ByteSource:
    return next(source for source in SOURCES if source.claims(uri))


def listable(path: str) -> bool:
    """Whether a folder's walk lists this file (an image, or a container a source reads)."""
    return any(source.lists(path) for source in SOURCES)

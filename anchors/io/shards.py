"""WebDataset tar shards, as img2dataset writes scraped datasets (``00000.tar`` holding
``KEY.jpg``, ``KEY.json``, ``KEY.txt``, with ``00000.parquet`` beside it): read member by member
as a stream, never extracted and never held whole, each sample (the members that share a key)
one record whose URI is ``SHARD#KEY``.

Keys follow webdataset: a member's name up to the first dot of its base name, folders
included (``part/000010005.jpg`` -> ``part/000010005``); consecutive members with one key form
a sample. A sample's image is its member whose extension is an image extension (``jpg``,
``png``, ...; ``KEY.mask.png`` is not one); a sample with none or with two is an error row.
Member names are never used as paths: a link, a device, a name with ``..`` or an absolute
name makes its sample an error row, and nothing from it is read."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import posixpath
import tarfile
from collections.abc import Iterator
from typing import Literal

from anchorscan.anchors.errors import exception_name
from anchorscan.anchors.io import gcs
from anchorscan.anchors.io.fetch import FetchError, HttpConfig, fetch, open_stream
from anchorscan.anchors.io.sources import (
    ByteSource,
    ReadError,
    ReadFailure,
    ReadLimits,
    Record,
    Unit,
    open_regular_file,
    raise_if_stopped,
    read_limited,
)
from anchorscan.anchors.io.uris import IMAGE_EXTENSIONS, SHARD_EXTENSIONS, Location
from anchorscan.anchors.tables import CLASH_PREFIX, clashing_columns, json_text

IMAGE_MEMBER_EXTENSIONS = frozenset(extension.lstrip(".") for extension in IMAGE_EXTENSIONS)
# img2dataset's status of a sample whose image was downloaded; other rows have no image.
SUCCESS = "success"
# More members than this is not a shard but a flood (or an endless stream): it stops there.
MAX_MEMBERS = 1_000_000
# A key longer than this is refused (its sample an error row): keys are written into every
# table and into curate's keys file, whose entries are all as wide as the longest.
MAX_KEY_LENGTH = 256
# A web server's answers that say a shard has no sidecar.
GONE = (404, 410)
# A GNU long-name or PAX header is read into memory whole: one declaring more is refused.
MAX_HEADER_BYTES = 2**20
_HEADER_TYPES = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)
GZIP_MAGIC = b"\x1f\x8b"
# Cloud Storage reads: bytes fetched per request (what a shard's read holds at once).
GCS_CHUNK_BYTES = 8 * 2**20


def sidecar_of(shard: str) -> str:
    """The Parquet file img2dataset writes beside a shard: the same stem."""
    stem = next(shard[: -len(e)] for e in SHARD_EXTENSIONS if shard.lower().endswith(e))
    return stem + ".parquet"


def key_and_extension(name: str) -> tuple[str, str] | None:
    """webdataset's split of a member name: (folder + stem, extension after the first dot of
    the base name, lower case); None for a name without one (it belongs to no sample)."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not stem or not dot or not extension:
        return None
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def key_problem(key: str) -> str | None:
    """Why a key cannot name a sample in ``SHARD#KEY``, or None: ``#`` would make its URI read
    as another's (``k#member=5``), a control character (a newline) breaks the lines and files
    it is written to, a long one widens every row."""
    shown = repr(key if len(key) <= 60 else key[:60] + "...")
    if len(key) > MAX_KEY_LENGTH:
        return f"the key {shown} is longer than {MAX_KEY_LENGTH} characters ({len(key):,})"
    if "#" in key:
        return f"the key {shown} holds '#', which separates a shard from a key in sample URIs"
    if any(ord(character) < 32 or 127 <= ord(character) < 160 for character in key):
        return f"the key {shown} holds a control character"
    return None


def unsafe_name(name: str) -> str | None:
    """Why a member name could write outside a folder if anyone extracted it, or None."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not UTF-8"
    if name.startswith("/") or name.startswith("\\") or (len(name) > 1 and name[1] == ":"):
        return "its name is an absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "its name climbs out of the shard's folder (..)"
    return None


def _kind(info: tarfile.TarInfo) -> str:
    if info.issym() or info.islnk():
        return f"a link (to {info.linkname})"
    if info.isdev() or info.isfifo():
        return "a device or pipe"
    return "not a regular file"


@dataclasses.dataclass
class Member:
    name: str
    extension: str
    data: bytes


@dataclasses.dataclass
class Sample:
    """The members of one key, in the shard's order; ``problem``: why the sample cannot be used
    (its members' data is then not kept), ``position``: its first member's number in the shard
    (from 1)."""

    key: str
    position: int
    members: list[Member] = dataclasses.field(default_factory=list)
    problem: str | None = None
    size: int = 0
    # Another sample has its key (a duplicate), or it has none: its URI names its position.
    by_position: bool = False

    def uri(self, shard: str) -> str:
        if key_problem(self.key):  # no key holds '#': this names no other sample
            return f"{shard}##member={self.position}"
        uri = str(Location.sample(shard, self.key))
        return f"{uri}#member={self.position}" if self.by_position else uri

    def refuse(self, problem: str) -> None:
        if self.problem is None:
            self.problem = problem
        self.members = []

    def image(self) -> Member:
        """The image member; ReadError where there is none or more than one."""
        images = [member for member in self.members if member.extension in IMAGE_MEMBER_EXTENSIONS]
        if len(images) == 1:
            return images[0]
        names = ", ".join(posixpath.basename(member.name) for member in (images or self.members))
        if images:
            raise ReadError(
                f"the sample has {len(images)} image members ({names}); one image is scored per "
                "sample: give the others a compound extension (KEY.mask.png) that marks them as "
                "not the image"
            )
        raise NoImageError(f"the sample has no image member (members: {names or 'none'})")

    def metadata(self) -> dict | None:
        """The fields of its ``json`` member (an object), or None."""
        member = next((m for m in self.members if m.extension == "json"), None)
        if member is None:
            return None
        try:
            fields = json.loads(member.data)
        except ValueError:
            return None
        return fields if isinstance(fields, dict) else None


class SidecarClashError(ReadError):
    """A sidecar whose columns cannot all be carried to the score rows: its shard is not read."""


class NoImageError(ReadError):
    """A sample without an image member."""


class DamagedShardError(ReadError):
    """The shard stopped being a tar before its end (truncated, or garbage after a member)."""


class ShardLimitError(ReadError):
    """The shard's read reached a limit on the bytes it goes through; the rest is not read."""


class _Header(tarfile.TarInfo):
    """Remembers the header error that makes tarfile end an archive quietly: past the first
    member it takes a cut or damaged header for the archive's end. Refuses a long-name or PAX
    header larger than MAX_HEADER_BYTES, which tarfile would read into memory whole."""

    def _proc_member(self, tarfile_):
        if self.type in _HEADER_TYPES and self.size > MAX_HEADER_BYTES:
            raise ShardLimitError(
                f"member {self.name!r} is a tar header that declares {self.size:,} bytes, more than "
                f"{MAX_HEADER_BYTES:,} (a GNU long name or PAX header is a few hundred)"
            )
        return super()._proc_member(tarfile_)  # type: ignore[misc]  # tarfile's documented hook, untyped

    @classmethod
    def fromtarfile(cls, archive):
        try:
            return super().fromtarfile(archive)
        except tarfile.EOFHeaderError:  # type: ignore[attr-defined]  # the end-of-archive marker: a proper end
            raise
        except tarfile.HeaderError as error:
            archive.damage = error
            raise


class _ShardStream:
    """A shard's bytes as tarfile reads them, in chunks of 10 KiB: each read first checks that
    the read step has not stopped this read (``raise_if_stopped``); ``compressed``: whether they
    start as gzip does."""

    def __init__(self, stream):
        self.stream = stream
        self.head = stream.read(len(GZIP_MAGIC))
        self.compressed = self.head == GZIP_MAGIC

    def read(self, size: int = -1) -> bytes:
        raise_if_stopped()
        if not self.head:
            return self.stream.read(size)
        cut = len(self.head) if size < 0 else min(size, len(self.head))
        head, self.head = self.head[:cut], self.head[cut:]
        if size < 0:
            return head + self.stream.read()
        return head + self.stream.read(size - cut) if size > cut else head


def _check_ahead(archive: tarfile.TarFile, last: tarfile.TarInfo | None, limits: ReadLimits) -> None:
    """Before tarfile reads past what is left of the last member to the next header: the bytes
    that skips (a member not read), and where the next header starts, within the limits."""
    skipped = archive.offset - archive.fileobj.tell()
    if last is not None and skipped > limits.max_skip_bytes:
        raise ShardLimitError(
            f"member {last.name!r} ({last.size:,} bytes) is not read, and reading past it would go "
            f"through more than --max_skip_bytes {limits.max_skip_bytes:,}"
        )
    if archive.offset > limits.max_shard_bytes:
        raise ShardLimitError(f"the shard goes on past --max_shard_bytes {limits.max_shard_bytes:,}")


def samples(stream, limits: ReadLimits) -> Iterator[Sample]:
    """The samples of a tar (plain or gzip'd) read from ``stream`` (read once, in order, never
    seeking back); members larger than ``limits.max_bytes`` (or a sample's members together)
    are not read into memory; at most ``max_shard_bytes`` of the tar (decompressed) are gone
    through, and at most ``max_skip_bytes`` to read past one member. Raises DamagedShardError
    where the tar is cut short or damaged, ShardLimitError at a limit, ReadError where it is not
    a tar at all; the samples before that point have been yielded."""
    shard_stream = _ShardStream(stream)
    # Only gzip is decompressed: its output is at most about 1,000 times its input, a chunk's
    # some 10 MB, where a bzip2 or xz chunk could decompress to gigabytes at once.
    mode: Literal["r|gz", "r|"] = "r|gz" if shard_stream.compressed else "r|"
    try:
        # Stream modes only read: typeshed's file protocol asks for more than _ShardStream has.
        archive: tarfile.TarFile = tarfile.open(fileobj=shard_stream, mode=mode, tarinfo=_Header)  # type: ignore[call-overload]  # noqa: SIM115 (closed by the caller's stream)
    except tarfile.ReadError as error:
        raise ReadError(f"not a tar archive ({error})", "tarfile.ReadError") from None
    seen: set[str] = set()
    current: Sample | None = None
    count = 0
    info: tarfile.TarInfo | None = None
    try:
        while True:
            _check_ahead(archive, info, limits)
            info = archive.next()
            archive.members.clear()  # type: ignore[attr-defined]  # tarfile keeps every header it read; a shard may hold millions
            if info is None:
                break
            count += 1
            if count > MAX_MEMBERS:
                raise DamagedShardError(
                    f"the shard holds more than {MAX_MEMBERS:,} members; the rest is not read"
                )
            if info.isdir():
                continue
            split = key_and_extension(info.name)
            if split is None:
                problem = "the member has no extension: it belongs to no sample"
                yield Sample(info.name, count, problem=problem, by_position=True)
                continue
            key, extension = split
            if current is None or key != current.key:
                if current is not None:
                    yield current
                current = Sample(key, count, by_position=key in seen)
                if key in seen:
                    current.refuse(f"a sample with this key came earlier in the shard (duplicate key {key})")
                refusal = key_problem(key)
                if refusal:
                    current.refuse(f"{refusal}: the sample is not read")
                seen.add(key)
            reason = unsafe_name(info.name) or (None if info.isreg() else f"it is {_kind(info)}")
            if reason:
                current.refuse(f"member {info.name!r} is not read: {reason}")
                continue
            if current.problem:
                continue
            if any(member.extension == extension for member in current.members):
                current.refuse(f"the sample has two members named {posixpath.basename(info.name)}")
                continue
            current.size += info.size
            max_bytes = limits.max_bytes
            if info.size > max_bytes or current.size > max_bytes:
                what = "member " + posixpath.basename(info.name) if info.size > max_bytes else "its members"
                current.refuse(f"{what} larger than --max_bytes {max_bytes:,}")
                continue
            if info.offset_data + info.size > limits.max_shard_bytes:
                raise ShardLimitError(f"the shard goes on past --max_shard_bytes {limits.max_shard_bytes:,}")
            handle = archive.extractfile(info)
            if handle is None:  # not a regular member: refused above
                continue
            current.members.append(Member(info.name, extension, handle.read()))
        damage = getattr(archive, "damage", None)
        if isinstance(damage, tarfile.EmptyHeaderError):  # type: ignore[attr-defined]
            raise DamagedShardError(
                f"the shard ends after {count:,} members without the end-of-archive marker (truncated?)"
            )
        if damage is not None:
            raise DamagedShardError(f"the shard is damaged after {count:,} members ({damage})")
    except (tarfile.ReadError, EOFError, OSError, ValueError) as error:
        # The sample being read may have lost members: it is refused, not scored incomplete.
        if current is not None:
            current.refuse(
                "the shard's read stopped at a limit inside or right after this sample"
                if isinstance(error, ShardLimitError)
                else "the shard is cut short or damaged inside or right after this sample"
            )
            yield current
            current = None
        if isinstance(error, ReadError):
            raise
        raise DamagedShardError(
            f"the shard is cut short or damaged after {count:,} members ({error})", exception_name(error)
        ) from None
    if current is not None:
        yield current
    if count == 0:
        raise ReadError("the shard holds no samples (an empty tar)")


# --- opening a shard as a stream ---------------------------------------------------------------


@contextlib.contextmanager
def open_shard(uri: str, http: HttpConfig = HttpConfig()):
    """A shard as a readable stream: a local regular file, a Cloud Storage object read in chunks,
    or a web server's response read as it arrives."""
    location = Location.parse(uri)
    if location.is_http:
        try:
            with open_stream(uri, http) as body:
                yield body
        except FetchError as error:
            raise ReadError(str(error), exception_name(error)) from None
        return
    if location.is_gcs:
        with gcs.storage_errors(uri):
            reader = gcs.blob(uri).open("rb", chunk_size=GCS_CHUNK_BYTES, timeout=gcs.TRANSFER_TIMEOUT)
        with reader:
            yield _StorageStream(uri, reader)
        return
    if location.is_remote:
        raise ReadError("only local files, gs:// and http(s):// URIs can be read")
    with open_regular_file(uri) as handle:
        yield handle


class _StorageStream:
    """A Cloud Storage reader whose errors say what happened in words."""

    def __init__(self, uri: str, reader):
        self.uri, self.reader = uri, reader

    def read(self, size: int = -1) -> bytes:
        with gcs.storage_errors(self.uri):
            return self.reader.read(size)


def read_sidecar(shard: str, limits: ReadLimits) -> dict[str, dict] | None:
    """The rows of the shard's sidecar Parquet by key, or None where it has none; ReadError
    where it is there but not a table of keys."""
    import pyarrow.parquet as pq

    sidecar = sidecar_of(shard)
    if Location.parse(sidecar).is_http:
        try:
            data = fetch(sidecar, limits.max_bytes, limits.http)
        except FetchError as error:
            if error.status_code in GONE:
                return None
            raise ReadError(str(error), exception_name(error)) from None
    elif not sidecar_exists(sidecar):
        return None
    else:
        data = read_limited(sidecar, limits.max_bytes, limits.http)
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as error:
        raise ReadError(f"the sidecar is not a Parquet table ({error})", exception_name(error)) from None
    if "key" not in table.column_names:
        raise ReadError("the sidecar has no key column, so its rows cannot be matched to samples")
    clashing = clashing_columns(table.column_names)
    if clashing:
        raise SidecarClashError(
            f"the sidecar {sidecar} has the columns {', '.join(map(repr, clashing))} and "
            f"{', '.join(repr(CLASH_PREFIX + name) for name in clashing)}: a score column is carried "
            f"with the prefix {CLASH_PREFIX}, which is taken; rename one in the sidecar"
        )
    rows: dict[str, dict] = {}
    for row in table.to_pylist():
        # A key no sample may have names none: the tar's sample under it is refused on its own.
        if row["key"] is not None and not key_problem(str(row["key"])):
            rows.setdefault(str(row["key"]), row)
    return rows


def sidecar_exists(sidecar: str) -> bool:
    location = Location.parse(sidecar)
    if location.is_http:
        return True  # a web server answers 404 for a missing one, which the read tells apart
    if location.is_gcs:
        with gcs.storage_errors(sidecar):
            return gcs.existing_blob(sidecar) is not None
    path = location.local_path
    return path is not None and os.path.isfile(path)


def carried_values(shard: str, sample: Sample, sidecar_row: dict | None) -> dict:
    """The columns a sample carries to its score row: its key and shard, then its sidecar row,
    or its JSON member's fields where the sidecar has no row for it."""
    fields = sidecar_row if sidecar_row is not None else (sample.metadata() or {})
    return {
        **{name: json_text(value) for name, value in fields.items() if name != "key"},
        "key": sample.key,
        "shard": shard,
    }


class TarShardSource(ByteSource):
    """A tar shard (local, gs:// or http(s)://; .tar, .tar.gz, .tgz): one record per sample,
    streamed; or one sample of it, named ``SHARD#KEY``."""

    name = "shard"

    def lists(self, path: str) -> bool:
        return Location.parse(path).is_shard

    def claims(self, uri: str) -> bool:
        location = Location.parse(uri)
        return location.is_shard or location.shard_and_key is not None

    def read(self, unit: Unit, limits: ReadLimits) -> Iterator[Record | ReadFailure]:
        split = Location.parse(unit.uri).shard_and_key
        shard, wanted = split if split else (unit.uri, None)
        try:
            sidecar = read_sidecar(shard, limits)
        except SidecarClashError:
            raise
        except ReadError as error:
            sidecar = None
            if wanted is None:
                message = f"{error}; the shard is read without it"
                yield ReadFailure(sidecar_of(shard), message, error.error_type)
        except Exception as error:  # e.g. a web server that cannot say whether there is one
            sidecar = None
            if wanted is None:
                yield ReadFailure(
                    sidecar_of(shard), f"cannot read the sidecar ({error}); the shard is read without it"
                )
        unmatched: dict[str, dict] = dict(sidecar or {})
        found = False
        try:
            with open_shard(shard, limits.http) as stream:
                for sample in samples(stream, limits):
                    if wanted is not None and sample.key != wanted:
                        continue
                    found = True
                    row = unmatched.pop(sample.key, None)
                    yield from _outcome(shard, sample, row)
                    if wanted is not None:
                        return
        except ReadError as error:
            if wanted is None:
                yield from _never_reached(shard, unmatched, "the shard was cut short before this sample")
            raise ReadError(f"{error}{_after(found, wanted)}", error.error_type) from None
        if wanted is not None:
            raise ReadError(f"the shard holds no sample with the key {wanted}")
        yield from _never_reached(
            shard, unmatched, "the sidecar lists this sample as downloaded, but the shard does not hold it"
        )


def _after(found: bool, wanted: str | None) -> str:
    if wanted is not None:
        return f" (looking for the sample {wanted})"
    return "; the samples before that point were read" if found else ""


def _outcome(shard: str, sample: Sample, sidecar_row: dict | None):
    """A sample's record, or its error row, or nothing where img2dataset recorded no image."""
    uri = sample.uri(shard)
    if sample.problem:
        yield ReadFailure(uri, sample.problem)
        return
    try:
        image = sample.image()
    except NoImageError as error:
        status = (sidecar_row or sample.metadata() or {}).get("status")
        if status is None or status == SUCCESS:
            yield ReadFailure(uri, str(error))
        return  # else a failed download, recorded as such: not the scan's error
    except ReadError as error:
        yield ReadFailure(uri, str(error))
        return
    yield Record(uri, image.data, carried_values(shard, sample, sidecar_row))


def _never_reached(shard: str, unmatched: dict[str, dict], why: str):
    """Error rows for the samples the sidecar lists as downloaded that the read never met."""
    for key, row in sorted(unmatched.items()):
        if row.get("status", SUCCESS) == SUCCESS:
            yield ReadFailure(str(Location.sample(shard, key)), why)

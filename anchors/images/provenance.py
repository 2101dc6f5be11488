"""Declared provenance: what a file says about its own origin, read from the bytes the scan
already holds (no fetch: no remote manifest, no OCSP or timestamp lookup). The sources, in the
order a tie between them is settled: a C2PA manifest (c2pa-python), XMP's IPTC
``DigitalSourceType`` (JPEG APP1, PNG iTXt, WebP), generators' PNG text chunks, EXIF
``Software`` naming a generator; an img2dataset sidecar's ``exif`` column is read at scoring.

Every read is bounded: segments and chunks walked, bytes of each block, XML without entities or
DTDs, and the whole read by a deadline (a thread the decode worker waits on; a worker left with
such a thread is retired, see decoder_pool.py). What cannot be read is named in the row
(``refused:...``) and the image is still scored."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import re
import threading
import zlib

# IPTC's digital source type codes (https://cv.iptc.org/newscodes/digitalsourcetype/) -> kind.
AI_GENERATED, AI_EDITED, EDITED, CAPTURED = "ai_generated", "ai_edited", "edited", "captured"
IPTC_KINDS = {
    "trainedAlgorithmicMedia": AI_GENERATED,
    "algorithmicMedia": AI_GENERATED,
    "compositeWithTrainedAlgorithmicMedia": AI_EDITED,
    "compositeSynthetic": AI_EDITED,
    "humanEdits": EDITED,
    "minorHumanEdits": EDITED,
    "algorithmicallyEnhanced": EDITED,
    "composite": EDITED,
    "digitalCapture": CAPTURED,
    "computationalCapture": CAPTURED,
    "compositeCapture": CAPTURED,
    "negativeFilm": CAPTURED,
    "positiveFilm": CAPTURED,
    "print": CAPTURED,
    "screenCapture": CAPTURED,
}
# Where a file declares several kinds, the first of this order is its provenance: an AI origin
# anywhere in its history outweighs a later edit or an earlier capture.
KIND_ORDER = (AI_GENERATED, AI_EDITED, EDITED, CAPTURED)
AI_KINDS = (AI_GENERATED, AI_EDITED)

IPTC_NAMESPACE = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
RDF_RESOURCE = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}resource"
XMP_JPEG_PREFIX = b"http://ns.adobe.com/xap/1.0/\x00"
XMP_PNG_KEYWORD = "XML:com.adobe.xmp"
# EXIF or PNG ``Software`` values that name an image generator (cameras and editors do not).
GENERATOR_SOFTWARE = re.compile(
    r"\b(stable.?diffusion|midjourney|dall.?e|novelai|comfyui|automatic1111|invokeai|fooocus|"
    r"adobe firefly|imagen|flux|sdxl|leonardo\.ai)\b",
    re.IGNORECASE,
)

# Bounds on hostile metadata: blocks walked, bytes of one block, of the whole manifest store.
MAX_BLOCKS = 1000
MAX_BLOCK_BYTES = 1 << 20
MAX_C2PA_BYTES = 8 << 20
MAX_SIDECAR_BYTES = 64 << 10
DEFAULT_TIMEOUT = 10.0
C2PA_FORMATS = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


@dataclasses.dataclass(frozen=True)
class Provenance:
    """``kind``: "" or one of KIND_ORDER; ``source``: where it was declared (``c2pa``, ``xmp``,
    ``png:parameters`` ...), or, declaring nothing, the reads that were refused
    (``refused:xmp_entities`` ...); ``signer``: a C2PA signer's name and validation state."""

    kind: str = ""
    source: str = ""
    signer: str = ""

    @property
    def declares_ai(self) -> bool:
        return self.kind in AI_KINDS


@dataclasses.dataclass
class _Blocks:
    """The metadata blocks of one file, as its container holds them."""

    container: str = ""
    xmp: list[bytes] = dataclasses.field(default_factory=list)
    exif: list[bytes] = dataclasses.field(default_factory=list)
    texts: dict[str, str] = dataclasses.field(default_factory=dict)
    c2pa_bytes: int = 0
    refused: list[str] = dataclasses.field(default_factory=list)


def _jpeg_blocks(data: bytes, blocks: _Blocks) -> None:
    position, count = 2, 0
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            position += 2
            continue
        if marker in (0xDA, 0xD9):  # the pixels start: metadata segments come before them
            return
        count += 1
        if count > MAX_BLOCKS:
            blocks.refused.append("jpeg_segment_flood")
            return
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        payload = data[position + 4 : position + 2 + length]
        if marker == 0xE1 and payload.startswith(b"Exif\x00\x00"):
            blocks.exif.append(payload)
        elif marker == 0xE1 and payload.startswith(XMP_JPEG_PREFIX):
            blocks.xmp.append(payload[len(XMP_JPEG_PREFIX) :])
        elif marker == 0xEB:  # APP11: JUMBF, where C2PA keeps its manifest store
            blocks.c2pa_bytes += len(payload)
        position += 2 + max(length, 2)


def _inflate(compressed: bytes) -> bytes | None:
    """A zlib stream's bytes, None past MAX_BLOCK_BYTES (a decompression bomb)."""
    inflater = zlib.decompressobj()
    text = inflater.decompress(compressed, MAX_BLOCK_BYTES)
    return None if inflater.unconsumed_tail else text


def _png_text(kind: bytes, payload: bytes) -> tuple[str, str | None]:
    """(keyword, text) of a tEXt, zTXt or iTXt chunk; text None where it is a bomb."""
    keyword, _, rest = payload.partition(b"\x00")
    name = keyword.decode("latin-1")
    if kind == b"tEXt":
        return name, rest.decode("latin-1")
    if kind == b"zTXt":
        text = _inflate(rest[1:])
        return name, None if text is None else text.decode("latin-1")
    compressed, rest = rest[:1] == b"\x01", rest[2:]
    _, _, rest = rest.partition(b"\x00")  # language
    _, _, rest = rest.partition(b"\x00")  # translated keyword
    text = _inflate(rest) if compressed else rest
    return name, None if text is None else text.decode("utf-8", "replace")


def _png_blocks(data: bytes, blocks: _Blocks) -> None:
    position, count = 8, 0
    while position + 8 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        payload = data[position + 8 : position + 8 + length]
        position += 12 + length
        if kind == b"IEND":
            return
        if kind == b"IDAT":
            continue
        count += 1
        if count > MAX_BLOCKS:
            blocks.refused.append("png_chunk_flood")
            return
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            name, text = _png_text(kind, payload) if length <= MAX_BLOCK_BYTES else ("", None)
            if text is None:
                blocks.refused.append("png_text_too_large")
            elif name == XMP_PNG_KEYWORD:
                blocks.xmp.append(text.encode())
            else:
                blocks.texts.setdefault(name, text)
        elif kind == b"eXIf":
            blocks.exif.append(payload)
        elif kind == b"caBX":  # C2PA's manifest store
            blocks.c2pa_bytes += length


def _webp_blocks(data: bytes, blocks: _Blocks) -> None:
    position, count = 12, 0
    while position + 8 <= len(data):
        kind = data[position : position + 4]
        length = int.from_bytes(data[position + 4 : position + 8], "little")
        payload = data[position + 8 : position + 8 + length]
        position += 8 + length + (length & 1)
        count += 1
        if count > MAX_BLOCKS:
            blocks.refused.append("webp_chunk_flood")
            return
        if kind == b"EXIF":
            blocks.exif.append(payload)
        elif kind == b"XMP ":
            blocks.xmp.append(payload)
        elif kind == b"C2PA":
            blocks.c2pa_bytes += length


def metadata_blocks(data: bytes) -> _Blocks:
    """The XMP, EXIF, text and C2PA blocks of a JPEG, PNG or WebP (other formats: none)."""
    blocks = _Blocks()
    if data.startswith(b"\xff\xd8"):
        blocks.container = "jpeg"
        _jpeg_blocks(data, blocks)
    elif data.startswith(b"\x89PNG\r\n\x1a\n"):
        blocks.container = "png"
        _png_blocks(data, blocks)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        blocks.container = "webp"
        _webp_blocks(data, blocks)
    return blocks


def iptc_kind(code: str) -> str:
    """The kind of an IPTC digital source type, given as its URI or its bare code; "" for codes
    outside the mapping (digitalArt, virtualRecording, dataDrivenMedia ...)."""
    return IPTC_KINDS.get(code.strip().rstrip("/").rsplit("/", 1)[-1], "")


def xmp_source_types(packet: bytes) -> list[str]:
    """The ``Iptc4xmpExt:DigitalSourceType`` values of an XMP packet, in both its attribute
    form and its element form (text or ``rdf:resource``). Raises defusedxml's and the parser's
    errors: entities and DTDs are refused."""
    from defusedxml import ElementTree

    root = ElementTree.fromstring(packet, forbid_dtd=True)
    name = f"{{{IPTC_NAMESPACE}}}DigitalSourceType"
    values = []
    for element in root.iter():
        if name in element.attrib:
            values.append(element.attrib[name])
        if element.tag == name:
            values.append(element.get(RDF_RESOURCE) or element.text or "")
    return values


def _xmp_kinds(blocks: _Blocks) -> list[str]:
    if not blocks.xmp:
        return []
    from defusedxml import DefusedXmlException

    kinds = []
    for packet in blocks.xmp:
        if len(packet) > MAX_BLOCK_BYTES:
            blocks.refused.append("xmp_too_large")
            continue
        try:
            kinds += [iptc_kind(value) for value in xmp_source_types(packet)]
        except DefusedXmlException:
            blocks.refused.append("xmp_entities")
        except SyntaxError:  # ElementTree's ParseError
            blocks.refused.append("xmp_malformed")
    return [kind for kind in kinds if kind]


def _generator_text(name: str, text: str) -> bool:
    """Whether a PNG text chunk is a generator's record of how it made the image."""
    if name == "parameters":  # AUTOMATIC1111, Forge, Fooocus: the prompt, then "Steps: ..."
        return "Steps: " in text
    if name in ("prompt", "workflow"):  # ComfyUI: its graph as JSON
        try:
            graph = json.loads(text)
        except ValueError:
            return False
        if name == "workflow":
            return isinstance(graph, dict) and isinstance(graph.get("nodes"), list)
        return isinstance(graph, dict) and any(
            isinstance(node, dict) and "class_type" in node for node in graph.values()
        )
    if name in ("invokeai_metadata", "sd-metadata"):  # InvokeAI
        return True
    return name == "Software" and bool(GENERATOR_SOFTWARE.search(text))


def _exif_software(blocks: _Blocks) -> list[str]:
    from PIL import Image

    names = []
    for block in blocks.exif:
        if len(block) > MAX_BLOCK_BYTES:
            blocks.refused.append("exif_too_large")
            continue
        exif = Image.Exif()
        try:
            exif.load(block if block.startswith(b"Exif") else b"Exif\x00\x00" + block)
            names.append(str(exif.get(0x0131, "")))
        except Exception:  # a damaged EXIF block declares nothing
            blocks.refused.append("exif_malformed")
    return names


@functools.cache
def _c2pa_context(trust_anchors: str):
    import c2pa

    settings: dict = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}
    if trust_anchors:
        settings["trust"] = {"user_anchors": trust_anchors}
    return c2pa.Context(c2pa.Settings.from_dict(settings))


# c2pa's validation states -> what the row says of the signer.
SIGNER_STATES = {"Trusted": "trusted", "Valid": "untrusted", "Invalid": "invalid"}


def _c2pa(data: bytes, blocks: _Blocks, trust_anchors: str) -> tuple[list[str], str]:
    """(kinds of the active manifest's actions, "signer (state)") of a file's C2PA manifest."""
    if not blocks.c2pa_bytes:
        return [], ""
    if blocks.c2pa_bytes > MAX_C2PA_BYTES:
        blocks.refused.append("c2pa_too_large")
        return [], ""
    import c2pa  # its native library is loaded by the processes that meet a manifest only

    try:
        reader = c2pa.Reader.try_create(
            C2PA_FORMATS[blocks.container], io.BytesIO(data), context=_c2pa_context(trust_anchors)
        )
        if reader is None:
            return [], ""
        with reader:
            manifest = reader.get_active_manifest() or {}
            state = SIGNER_STATES.get(reader.get_validation_state() or "", "invalid")
    except (c2pa.C2paError, KeyError, ValueError):
        blocks.refused.append("c2pa_malformed")
        return [], ""
    kinds = [
        iptc_kind(str(action.get("digitalSourceType", "")))
        for assertion in manifest.get("assertions", [])
        if str(assertion.get("label", "")).startswith("c2pa.actions")
        for action in (assertion.get("data") or {}).get("actions", [])
        if isinstance(action, dict)
    ]
    signature = manifest.get("signature_info") or {}
    name = signature.get("issuer") or signature.get("common_name") or "unnamed signer"
    return [kind for kind in kinds if kind], f"{name} ({state})"


def _strongest(declared: list[tuple[str, str]]) -> tuple[str, str]:
    """(kind, source) of the first kind in KIND_ORDER, from the first source declaring it."""
    for kind in KIND_ORDER:
        for found, source in declared:
            if found == kind:
                return kind, source
    return "", ""


def read_declarations(data: bytes, trust_anchors: str = "") -> Provenance:
    """What ``data`` declares of its origin, without a deadline (see ``declared_provenance``)."""
    blocks = metadata_blocks(data)
    if not blocks.container:
        return Provenance()
    c2pa_kinds, signer = _c2pa(data, blocks, trust_anchors)
    declared = [(kind, "c2pa") for kind in c2pa_kinds]
    declared += [(kind, "xmp") for kind in _xmp_kinds(blocks)]
    declared += [
        (AI_GENERATED, f"png:{name}") for name, text in blocks.texts.items() if _generator_text(name, text)
    ]
    declared += [(AI_GENERATED, "exif") for name in _exif_software(blocks) if GENERATOR_SOFTWARE.search(name)]
    kind, source = _strongest(declared)
    if not kind and blocks.refused:
        source = ",".join(f"refused:{reason}" for reason in dict.fromkeys(blocks.refused))
    return Provenance(kind, source, signer)


def declared_provenance(data: bytes, trust_anchors: str = "", timeout: float = DEFAULT_TIMEOUT) -> Provenance:
    """``read_declarations`` within ``timeout`` seconds: past it, or where the read fails in a
    way the bounds did not foresee, the row says so and the image is still scored. The read
    runs on a thread left behind if it hangs: the decode worker that sees one is retired."""
    outcome: list[Provenance] = []

    def read() -> None:
        try:
            outcome.append(read_declarations(data, trust_anchors))
        except Exception as error:  # a gap in the bounds above: still only this file's metadata
            outcome.append(Provenance(source=f"refused:{type(error).__name__}"))

    thread = threading.Thread(target=read, name="provenance", daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else Provenance(source="refused:timeout")


def sidecar_provenance(exif_column) -> Provenance:
    """What an img2dataset sidecar's ``exif`` column (JSON of the original file's EXIF tags,
    exifread's names) declares: a generator named in a ``Software`` tag."""
    if not isinstance(exif_column, str) or not exif_column:
        return Provenance()
    if len(exif_column) > MAX_SIDECAR_BYTES:
        return Provenance(source="refused:sidecar_exif_too_large")
    try:
        tags = json.loads(exif_column)
    except ValueError:
        return Provenance(source="refused:sidecar_exif_malformed")
    if not isinstance(tags, dict):
        return Provenance(source="refused:sidecar_exif_malformed")
    software = [str(value) for name, value in tags.items() if str(name).endswith("Software")]
    if any(GENERATOR_SOFTWARE.search(value) for value in software):
        return Provenance(AI_GENERATED, "sidecar:exif")
    return Provenance()


def combined(in_file: Provenance, in_sidecar: Provenance) -> Provenance:
    """The file's own declaration, or the sidecar's where the file declares nothing (its
    re-encoding dropped the file's metadata); declaring nothing, the refusals of both."""
    if in_file.kind:
        return in_file
    if in_sidecar.kind:
        return dataclasses.replace(in_sidecar, signer=in_file.signer)
    return dataclasses.replace(in_file, source=",".join(filter(None, (in_file.source, in_sidecar.source))))

"""Declared provenance: files carrying C2PA manifests, XMP, generators' PNG chunks and EXIF,
each built with the library that writes them in the wild (c2pa-python's Builder signing with a
throwaway CA made with `cryptography`, Pillow's PngInfo and EXIF, XMP packets), and hostile
metadata that must leave the scan running with a clear row."""

from __future__ import annotations

import datetime
import io
import json
import threading

import c2pa
import numpy as np
import pyarrow as pa
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from PIL import Image, PngImagePlugin

from anchorscan.anchors.images import provenance
from anchorscan.anchors.images.decoder_pool import DecoderPool
from anchorscan.anchors.images.provenance import (
    MAX_BLOCK_BYTES,
    MAX_BLOCKS,
    Provenance,
    combined,
    declared_provenance,
    read_declarations,
    sidecar_provenance,
)
from anchorscan.anchors.io import curation
from helpers import decode_that_leaves_a_thread, sample_photos

IPTC = "http://cv.iptc.org/newscodes/digitalsourcetype/"
IPTC_EXT = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"


# --- files as their writers make them ---------------------------------------------------------


def _name(common: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"{common} Org"),
        ]
    )


@pytest.fixture(scope="module")
def credentials() -> dict:
    """A throwaway CA and a C2PA signing certificate it issued (ES256, document signing use)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def certificate(subject, issuer, public_key, signing_key, serial, is_ca):
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.KeyUsage(not is_ca, False, False, False, False, is_ca, is_ca, False, False),
                critical=True,
            )
        )
        if not is_ca:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
            ).add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        return builder.sign(signing_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    ca = certificate(_name("Test CA"), _name("Test CA"), ca_key.public_key(), ca_key, 1, True)
    leaf = certificate(_name("Test Generator"), _name("Test CA"), key.public_key(), ca_key, 2, False)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return {"ca": ca.decode(), "chain": leaf + ca, "key": private}


def picture(seed: int = 0, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def encoded(image: Image.Image, kind: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **params)
    return buffer.getvalue()


def c2pa_signed(credentials: dict, data: bytes, mime: str, source_type: str) -> bytes:
    """``data`` signed by c2pa-python's Builder with one action of this digital source type."""
    manifest = {
        "claim_generator_info": [{"name": "anchorscan-test", "version": "1"}],
        "title": "test",
        "assertions": [
            {
                "label": "c2pa.actions",
                "data": {"actions": [{"action": "c2pa.created", "digitalSourceType": IPTC + source_type}]},
            }
        ],
    }
    context = c2pa.Context(c2pa.Settings.from_dict({"builder": {"thumbnail": {"enabled": False}}}))
    signer = c2pa.Signer.from_info(
        c2pa.C2paSignerInfo(b"es256", credentials["chain"], credentials["key"], None)
    )
    signed = io.BytesIO()
    with c2pa.Builder(manifest, context=context) as builder:
        builder.sign(signer, mime, io.BytesIO(data), signed)
    return signed.getvalue()


def xmp_packet(body: str) -> bytes:
    return (
        '<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
        f'<rdf:RDF xmlns:rdf="{RDF}">{body}</rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    ).encode()


def xmp_attribute(source_type: str) -> bytes:
    """The attribute form, as Google's and Meta's tools write it."""
    return xmp_packet(
        f'<rdf:Description rdf:about="" xmlns:Iptc4xmpExt="{IPTC_EXT}" '
        f'Iptc4xmpExt:DigitalSourceType="{IPTC}{source_type}"/>'
    )


def xmp_element(source_type: str, resource: bool = False) -> bytes:
    """The element form: its value as text, or as an rdf:resource."""
    value = (
        f'<Iptc4xmpExt:DigitalSourceType rdf:resource="{IPTC}{source_type}"/>'
        if resource
        else f"<Iptc4xmpExt:DigitalSourceType>{IPTC}{source_type}</Iptc4xmpExt:DigitalSourceType>"
    )
    return xmp_packet(
        f'<rdf:Description rdf:about="" xmlns:Iptc4xmpExt="{IPTC_EXT}">{value}</rdf:Description>'
    )


def png_with_text(image: Image.Image, texts: dict[str, str], itxt: bool = False) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in texts.items():
        if itxt:
            info.add_itxt(key, value)
        else:
            info.add_text(key, value)
    return encoded(image, "PNG", pnginfo=info)


def with_software(image: Image.Image, kind: str, software: str, **tags) -> bytes:
    exif = Image.Exif()
    exif[0x0131] = software
    for tag, value in tags.items():
        exif[{"make": 0x010F, "model": 0x0110}[tag]] = value
    return encoded(image, kind, exif=exif.tobytes())


A1111 = (
    "a lighthouse at dusk, oil painting\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M Karras, "
    "CFG scale: 7, Seed: 1234, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly"
)
COMFY_PROMPT = json.dumps(
    {
        "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
    }
)
COMFY_WORKFLOW = json.dumps({"last_node_id": 4, "nodes": [{"id": 3, "type": "KSampler"}], "links": []})


# --- what each source declares ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("mime", "kind", "source_type", "expected"),
    [
        ("image/jpeg", "JPEG", "trainedAlgorithmicMedia", "ai_generated"),
        ("image/png", "PNG", "compositeWithTrainedAlgorithmicMedia", "ai_edited"),
        ("image/jpeg", "JPEG", "digitalCapture", "captured"),
        ("image/webp", "WEBP", "algorithmicMedia", "ai_generated"),
    ],
)
def test_a_c2pa_manifest_declares_its_actions_source_type_and_signer(
    credentials, mime, kind, source_type, expected
):
    signed = c2pa_signed(credentials, encoded(picture(), kind), mime, source_type)
    assert read_declarations(signed) == Provenance(expected, "c2pa", "Test Generator Org (untrusted)")
    trusted = read_declarations(signed, trust_anchors=credentials["ca"])
    assert trusted == Provenance(expected, "c2pa", "Test Generator Org (trusted)")


def test_a_c2pa_manifest_whose_pixels_changed_after_signing_reads_invalid(credentials):
    signed = bytearray(
        c2pa_signed(credentials, encoded(picture(), "JPEG"), "image/jpeg", "trainedAlgorithmicMedia")
    )
    signed[-100] ^= 0xFF  # in the entropy-coded pixels, which the manifest's hash covers
    assert read_declarations(bytes(signed)) == Provenance(
        "ai_generated", "c2pa", "Test Generator Org (invalid)"
    )


@pytest.mark.parametrize(
    ("packet", "source_type", "expected"),
    [
        (xmp_attribute, "trainedAlgorithmicMedia", "ai_generated"),
        (xmp_element, "compositeSynthetic", "ai_edited"),
        (lambda code: xmp_element(code, resource=True), "humanEdits", "edited"),
        (xmp_attribute, "computationalCapture", "captured"),
    ],
)
def test_xmp_declares_in_jpeg_png_and_webp_in_both_forms(packet, source_type, expected):
    image = picture()
    files = {
        "jpeg": encoded(image, "JPEG", xmp=packet(source_type)),
        "png": png_with_text(image, {"XML:com.adobe.xmp": packet(source_type).decode()}, itxt=True),
        "webp": encoded(image, "WEBP", xmp=packet(source_type)),
    }
    for container, data in files.items():
        assert read_declarations(data) == Provenance(expected, "xmp"), container


def test_generators_png_chunks_and_exif_software_declare_ai_generated():
    image = picture()
    assert read_declarations(png_with_text(image, {"parameters": A1111})) == Provenance(
        "ai_generated", "png:parameters"
    )
    comfy = png_with_text(image, {"prompt": COMFY_PROMPT, "workflow": COMFY_WORKFLOW})
    assert read_declarations(comfy) == Provenance("ai_generated", "png:prompt")
    assert read_declarations(png_with_text(image, {"workflow": COMFY_WORKFLOW})) == Provenance(
        "ai_generated", "png:workflow"
    )
    compressed = png_with_text(image, {"parameters": A1111}, itxt=True)
    assert read_declarations(compressed).source == "png:parameters"
    for kind in ("JPEG", "PNG", "WEBP"):
        assert read_declarations(with_software(image, kind, "NovelAI")) == Provenance("ai_generated", "exif")


def test_cameras_editors_and_unrelated_metadata_declare_nothing_ai():
    image = picture()
    for data in (
        with_software(image, "JPEG", "Canon EOS R5 Firmware Version 1.8.1", make="Canon", model="EOS R5"),
        with_software(image, "JPEG", "Adobe Photoshop 25.0 (Windows)"),
        with_software(image, "JPEG", "Imagenomic Portraiture 4"),
        png_with_text(image, {"parameters": "exposure=1.2", "prompt": "a caption, not a graph"}),
        png_with_text(image, {"Comment": A1111[:40], "Software": "GIMP 2.10"}),
        encoded(image, "JPEG", xmp=xmp_attribute("digitalArt")),  # outside the mapping
        encoded(image, "GIF"),
    ):
        assert read_declarations(data) == Provenance()
    camera = encoded(image, "JPEG", xmp=xmp_attribute("digitalCapture"))
    assert read_declarations(camera) == Provenance("captured", "xmp")


def test_the_strongest_declaration_wins_and_ties_go_to_the_first_source(credentials):
    captured = c2pa_signed(
        credentials, png_with_text(picture(), {"parameters": A1111}), "image/png", "digitalCapture"
    )
    assert read_declarations(captured) == Provenance(
        "ai_generated", "png:parameters", "Test Generator Org (untrusted)"
    )
    both = c2pa_signed(
        credentials,
        encoded(picture(), "JPEG", xmp=xmp_attribute("trainedAlgorithmicMedia")),
        "image/jpeg",
        "trainedAlgorithmicMedia",
    )
    assert read_declarations(both).source == "c2pa"


def test_an_img2dataset_sidecar_exif_column_declares_a_generator():
    assert sidecar_provenance(json.dumps({"Image Software": "Stable Diffusion XL"})) == Provenance(
        "ai_generated", "sidecar:exif"
    )
    assert (
        sidecar_provenance(json.dumps({"Image Make": "NIKON", "Image Software": "Ver.1.00"})) == Provenance()
    )
    assert sidecar_provenance(None) == Provenance()
    assert sidecar_provenance("{not json").source == "refused:sidecar_exif_malformed"
    assert (
        sidecar_provenance(" " * (provenance.MAX_SIDECAR_BYTES + 1)).source
        == "refused:sidecar_exif_too_large"
    )
    refused = sidecar_provenance("[1]")
    assert combined(Provenance(source="refused:xmp_entities"), refused) == Provenance(
        source="refused:xmp_entities,refused:sidecar_exif_malformed"
    )
    assert combined(Provenance("captured", "xmp"), refused) == Provenance("captured", "xmp")


# --- hostile metadata -------------------------------------------------------------------------

BILLION_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + "".join(
        f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">' for i in range(1, 10)
    )
    + "]>"
    + f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="{RDF}">&lol9;</rdf:RDF></x:xmpmeta>'
).encode()


def hostile_files(credentials: dict) -> dict[str, tuple[bytes, str]]:
    """Each hostile file and the row's provenance_source for it."""
    image = picture()
    flood = PngImagePlugin.PngInfo()
    for i in range(MAX_BLOCKS + 1):
        flood.add_text(f"k{i}", "v")
    # A signed manifest store damaged inside its JUMBF boxes (APP11), past its header.
    manifest = bytearray(
        c2pa_signed(credentials, encoded(image, "JPEG"), "image/jpeg", "trainedAlgorithmicMedia")
    )
    store = manifest.index(b"\xff\xeb") + 4
    manifest[store + 100 : store + 116] = b"\xff" * 16
    return {
        "bomb.jpg": (encoded(image, "JPEG", xmp=BILLION_LAUGHS), "refused:xmp_entities"),
        "broken.webp": (encoded(image, "WEBP", xmp=b"<x:xmpmeta><unclosed"), "refused:xmp_malformed"),
        "flood.png": (encoded(image, "PNG", pnginfo=flood), "refused:png_chunk_flood"),
        "huge.png": (
            png_with_text(image, {"parameters": "Steps: " + "x" * MAX_BLOCK_BYTES}),
            "refused:png_text_too_large",
        ),
        "manifest.jpg": (bytes(manifest), "refused:c2pa_malformed"),
    }


def test_hostile_metadata_is_refused_by_name_within_its_bounds(credentials):
    for name, (data, source) in hostile_files(credentials).items():
        assert read_declarations(data) == Provenance(source=source), name


def test_a_huge_manifest_store_is_not_parsed():
    jpeg = encoded(picture(), "JPEG")
    segment = b"\xff\xeb\xff\xff" + b"JP" + bytes(0xFFFF - 4)
    count = provenance.MAX_C2PA_BYTES // 0xFFFB + 1
    assert read_declarations(jpeg[:2] + segment * count + jpeg[2:]) == Provenance(
        source="refused:c2pa_too_large"
    )


def test_a_read_past_its_deadline_says_so_and_its_worker_is_retired(monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(
        provenance, "read_declarations", lambda data, anchors: release.wait() and Provenance()
    )
    try:
        assert declared_provenance(b"any", timeout=0.01) == Provenance(source="refused:timeout")
    finally:
        release.set()
    # In the decode worker, the thread left behind retires the process: the next decode gets a fresh one.
    pool = DecoderPool(decode_that_leaves_a_thread, processes=1, timeout=60)
    try:
        first = pool.result(pool.submit(b"a"))
        second = pool.result(pool.submit(b"b"))
    finally:
        pool.close()
    assert first != second


# --- decisions --------------------------------------------------------------------------------


def test_curate_drops_declared_ai_unless_told_to_ignore_it():
    uris = [f"/data/{i}.jpg" for i in range(5)]
    declared = ["ai_generated", "ai_edited", "captured", "edited", ""]
    table = pa.table(
        {
            "uri": uris,
            "sha256": [str(i) for i in range(5)],
            "score": [0.0, 0.0, 9.0, 0.0, 0.0],
            "anchor_score": [0.0, 0.0, 9.0, 0.0, 0.0],
            "is_suspect": [True, True, True, False, False],
            "provenance": declared,
            "anchor_id": ["a" * 16] * 5,
        }
    )
    decided = curation.decide([table], [])
    assert dict(zip(decided["uri"].to_pylist(), decided["dropped"].to_pylist())) == {
        uris[0]: "declared_ai",
        uris[1]: "declared_ai",
        uris[2]: "suspect",  # a declared capture is still judged by its pixels
        uris[3]: "",
        uris[4]: "",
    }
    ignored = curation.decide([table], [], curation.KeepRule(max_score=1.0, declared_ai=False))
    assert ignored["dropped"].to_pylist() == ["", "", "score_above", "", ""]


def test_photos_declared_ai_by_a_scan_are_suspect_and_counted_apart(
    fitted_anchor, tmp_path, credentials, capsys
):
    from anchorscan.pipelines import curate, score
    from helpers import RUNNER, read_parquet_rows

    anchor, _ = fitted_anchor
    folder = tmp_path / "scan"
    folder.mkdir()
    photos = sample_photos()
    crops = [Image.fromarray(photo[:240, :256]) for photo in list(photos.values())[:6]]
    files = {
        "c2pa.jpg": c2pa_signed(
            credentials, encoded(crops[0], "JPEG", quality=95), "image/jpeg", "trainedAlgorithmicMedia"
        ),
        "xmp.png": png_with_text(
            crops[1],
            {"XML:com.adobe.xmp": xmp_attribute("compositeWithTrainedAlgorithmicMedia").decode()},
            itxt=True,
        ),
        "a1111.png": png_with_text(crops[2], {"parameters": A1111}),
        "camera.jpg": encoded(crops[3], "JPEG", quality=95, xmp=xmp_attribute("digitalCapture")),
        "bomb.jpg": encoded(crops[4], "JPEG", quality=95, xmp=BILLION_LAUGHS),
        "plain.png": encoded(crops[5], "PNG"),
    }
    hostile = {f"hostile_{name}": source for name, (_, source) in hostile_files(credentials).items()}
    files.update({f"hostile_{name}": data for name, (data, _) in hostile_files(credentials).items()})
    for name, data in files.items():
        (folder / name).write_bytes(data)

    def scan(prefix: str, *flags: str) -> tuple[dict, dict]:
        summary = score.run(
            ["--input", str(folder), "--anchor", str(anchor), "--output", prefix, *flags, *RUNNER]
        )
        rows = read_parquet_rows(f"{prefix}-scores-*.parquet")
        return summary, {row["uri"].rsplit("/", 1)[-1]: row for row in rows}

    summary, rows = scan(str(tmp_path / "used"))
    assert {name: (row["provenance"], row["provenance_source"]) for name, row in rows.items()} == {
        "c2pa.jpg": ("ai_generated", "c2pa"),
        "xmp.png": ("ai_edited", "xmp"),
        "a1111.png": ("ai_generated", "png:parameters"),
        "camera.jpg": ("captured", "xmp"),
        "bomb.jpg": ("", "refused:xmp_entities"),  # still scored
        "plain.png": ("", ""),
        **{name: ("", source) for name, source in hostile.items()},
    }
    assert rows["c2pa.jpg"]["provenance_signer"] == "Test Generator Org (untrusted)"
    declared_ai = ("c2pa.jpg", "xmp.png", "a1111.png")
    assert all(rows[name]["is_suspect"] for name in declared_ai)
    # A declared capture whitelists nothing: its row is the statistics' decision, as every other.
    for name in ("camera.jpg", "bomb.jpg", "plain.png", *hostile):
        assert rows[name]["is_suspect"] == (rows[name]["score"] > 2.0)  # -log10(the anchor's fpr 0.01)
    assert summary["declared_ai"] == 3
    assert summary["provenance"] == {"ai_generated": 2, "ai_edited": 1, "captured": 1}
    statistical = sum(rows[name]["score"] > 2.0 for name in rows if name not in declared_ai)
    assert summary["suspect"] == statistical
    assert (
        "declared    ai_edited 1, ai_generated 2, captured 1 (36.4% of scored; 3 declared AI"
        in capsys.readouterr().out
    )

    anchors = tmp_path / "ca.pem"
    anchors.write_text(credentials["ca"])
    _, ignored = scan(
        str(tmp_path / "ignored"), "--provenance", "ignore", "--c2pa_trust_anchors", str(anchors)
    )
    for name, row in ignored.items():
        assert row["is_suspect"] == (row["score"] > 2.0)
        assert row["provenance"] == rows[name]["provenance"]
    assert ignored["c2pa.jpg"]["provenance_signer"] == "Test Generator Org (trusted)"

    outcome = curate.run(["--scores", str(tmp_path / "used"), "--output", str(tmp_path / "kept"), *RUNNER])
    assert outcome["dropped"]["declared_ai"] == 3


def test_the_report_gives_the_declared_share_and_counts_declared_suspects_apart():
    from anchorscan.pipelines.report import render

    def row(i: int, declared: str, suspect: bool) -> dict:
        values = dict.fromkeys(("score", "anchor_score", "forensic", "semantic", "statistical"), float(i))
        return {
            **values,
            "uri": f"/d/{i}.jpg",
            "is_suspect": suspect,
            "anchor_id": "a",
            "head": "",
            "provenance": declared,
        }

    rows = [row(0, "ai_generated", True), row(1, "captured", True), row(2, "", False), row(3, "", False)]
    page = render(rows, [], None, None, 1, "t")
    assert "<th>suspect</th><td>2 (50.0 %), 1 of them declared AI by their metadata</td>" in page
    assert "<th>declared provenance</th><td>ai_generated: 1, captured: 1 (50.0 % of scored)</td>" in page
    for old in rows:
        del old["provenance"]  # a scan from before the provenance columns
    assert "<th>declared provenance</th><td>none</td>" in render(rows, [], None, None, 1, "t")


def test_trust_anchors_without_a_certificate_are_refused_by_name(tmp_path, capsys):
    from anchorscan.pipelines.cli import main

    key_only = tmp_path / "key.pem"
    key_only.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    flags = ["score", "--input", str(tmp_path), "--anchor", "a", "--output", str(tmp_path / "o")]
    assert main([*flags, "--c2pa_trust_anchors", str(key_only)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and f"--c2pa_trust_anchors: {key_only}: no PEM certificate" in error
    assert main([*flags, "--c2pa_trust_anchors", str(tmp_path / "missing.pem")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "missing.pem" in error


def test_a_sidecar_exif_column_declares_where_the_file_does_not(fitted_anchor):
    from apache_beam.pvalue import TaggedOutput

    from anchorscan.anchors.anchor_file import anchor_from_bytes
    from anchorscan.transforms.decode import ImageMeta
    from anchorscan.transforms.scoring import ScoreBatchFn

    anchor_path, _ = fitted_anchor
    anchor, _ = anchor_from_bytes(anchor_path.read_bytes())
    generator = {"exif": json.dumps({"Image Software": "Midjourney v6"})}
    camera = {"exif": json.dumps({"Image Make": "Canon", "Image Software": "Canon EOS R5 1.8.1"})}
    captured = Provenance("captured", "xmp")
    metas = [
        ImageMeta("reencoded", "0" * 64, 300, 260, "center_crop", generator),
        ImageMeta("camera", "1" * 64, 300, 260, "center_crop", camera),
        ImageMeta("both", "2" * 64, 300, 260, "center_crop", generator, provenance=captured),
    ]
    # Features the statistics do not call suspect: a held-out real image's.
    real = anchor.calibration_rows.features
    vector = real[np.flatnonzero(~anchor.assess(real)["is_suspect"])[0]].astype(np.float64)
    batch = [(meta, (vector, 9.0)) for meta in metas]

    def rows(decide: str) -> dict:
        outputs = ScoreBatchFn(provenance=decide).process(batch, anchor, "anchor-id")
        return {row["uri"]: row for row in outputs if not isinstance(row, TaggedOutput)}

    used = rows("use")
    assert {
        uri: (row["provenance"], row["provenance_source"], row["is_suspect"]) for uri, row in used.items()
    } == {
        "reencoded": ("ai_generated", "sidecar:exif", True),
        "camera": ("", "", False),
        "both": ("captured", "xmp", False),  # the file's own declaration first
    }
    assert not rows("ignore")["reencoded"]["is_suspect"]


def test_mutated_metadata_is_read_or_refused_by_name_never_escaping(credentials):
    """Metadata-carrying files under tests/fuzz.py's mutations, through the decode worker as a
    scan runs it: each mutant decodes with a provenance or is a decode error; no read escapes
    its bounds (``refused:`` an exception's name), crashes its process or runs out of time."""
    import functools
    import random

    from anchorscan.anchors.images.decode import decode_and_declare
    from anchorscan.anchors.images.decoder_pool import DecodeFailed
    from fuzz import mutate

    image = picture()
    files = {
        "c2pa-jpeg": c2pa_signed(
            credentials, encoded(image, "JPEG"), "image/jpeg", "trainedAlgorithmicMedia"
        ),
        "c2pa-png": c2pa_signed(credentials, encoded(image, "PNG"), "image/png", "digitalCapture"),
        "xmp-jpeg": encoded(image, "JPEG", xmp=xmp_element("humanEdits")),
        "xmp-webp": encoded(image, "WEBP", xmp=xmp_attribute("trainedAlgorithmicMedia")),
        "text-png": png_with_text(image, {"parameters": A1111, "prompt": COMFY_PROMPT}, itxt=True),
        "exif-jpeg": with_software(image, "JPEG", "NovelAI"),
    }
    rng, names = random.Random(0), sorted(files)
    mutants = [mutate(files[name], files[name], rng)[1] for name in names for _ in range(60)]
    known = {"", "c2pa", "xmp", "exif", "png:parameters", "png:prompt", "png:Software"}
    pool = DecoderPool(functools.partial(decode_and_declare, size=32, min_side=8), processes=2, timeout=30)
    read = 0
    try:
        for job in [pool.submit(data) for data in mutants]:
            try:
                declared = pool.result(job).provenance
            except DecodeFailed as error:
                assert not error.escaped and error.error_type not in ("TimeoutError", "DecoderCrash"), error
                continue
            reasons = declared.source.removeprefix("refused:").split(",refused:")
            assert declared.source in known or all(reason.islower() for reason in reasons), declared
            read += 1
    finally:
        pool.close()
    assert read > len(mutants) // 2

"""Who wrote a delta (docs/METHOD.md §9.4): Ed25519 signatures from the ``cryptography`` package.

A delta's checksum (anchors/checked_file.py) covers its metadata - the signer's fingerprint
among it - and every tensor, but anyone can recompute it. A site that signs its deltas stores
``signature``, the Ed25519 signature of its checksum, beside it; a coordinator that enrolled the
site's public key (``merge --trust DIR``) accepts only deltas whose signature verifies under a key
it holds. Keys are PEM files: the private key PKCS#8 (written mode 0600), the public key
SubjectPublicKeyInfo; a key's fingerprint is the sha256 of its 32 raw bytes."""

from __future__ import annotations

import base64
import binascii
import hashlib

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from anchorscan.anchors.errors import UserError

# What is signed: the checksum, prefixed so that a signature of a delta is never one of anything else.
CONTEXT = b"anchorscan delta checksum:"


class KeyFileError(UserError, ValueError):
    """A key file that is not an anchorscan Ed25519 key."""


def new_key_pair() -> tuple[bytes, bytes]:
    """(private key PEM, public key PEM) of a fresh Ed25519 key."""
    private = Ed25519PrivateKey.generate()
    return (
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )


def fingerprint(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def _message(checksum: str) -> bytes:
    return CONTEXT + checksum.encode()


class Signer:
    """A site's private key, read from its PEM file."""

    def __init__(self, pem: bytes, source: str = "the key"):
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as problem:
            raise KeyFileError(
                f"{source}: not an unencrypted PEM private key ({problem}); make one with `anchorscan keygen`"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"{source}: a {type(key).__name__}, not an Ed25519 key (`anchorscan keygen`)")
        self._key = key
        self.fingerprint = fingerprint(key.public_key())

    def sign(self, checksum: str) -> str:
        return base64.b64encode(self._key.sign(_message(checksum))).decode()


def public_key(pem: bytes, source: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as problem:
        raise KeyFileError(f"{source}: not a PEM public key ({problem})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{source}: a {type(key).__name__}, not an Ed25519 public key")
    return key


def trusted_keys(pems: dict[str, bytes]) -> dict[str, Ed25519PublicKey]:
    """Public keys by fingerprint, from PEM files by name (a coordinator's enrolled sites)."""
    return {fingerprint(key): key for key in (public_key(pem, name) for name, pem in sorted(pems.items()))}


def verifies(key: Ed25519PublicKey, checksum: str, signature: str) -> bool:
    try:
        key.verify(base64.b64decode(signature, validate=True), _message(checksum))
    except (InvalidSignature, binascii.Error, ValueError, TypeError):
        return False
    return True

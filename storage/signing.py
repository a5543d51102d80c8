"""Ed25519 signatures of manifests: who published a version, beyond the store's own word.

Whoever can write a store can write a manifest that verifies, since the manifest is the only witness
of its files. A build worker holding a private key therefore writes `manifest.sig` beside a version's
`manifest.json` (before it: the manifest is written last), and a reader holding trusted public keys
refuses a manifest whose signature is missing, wrong, or made by a key it does not trust. The
signature covers the manifest's exact bytes, the bytes a child delta pins by sha256, so it lives
beside the manifest and never inside it.

A signature document names its key by id (the first 16 hex digits of the sha256 of the raw public
key) and carries the public key itself, so anyone can tell which key signed a version (`ragindex
versions`); only the configured trusted keys decide whether a reader accepts it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from storage.errors import Rejected, Untrusted

_Key = TypeVar("_Key", Ed25519PrivateKey, Ed25519PublicKey)

ALGORITHM = "ed25519"
MAX_SIGNATURE_BYTES = 4096  # a signature document is ~250 bytes: anything far larger is not one


def key_id(public_key: Ed25519PublicKey) -> str:
    """The id a key is known by: the first 16 hex digits of the sha256 of its raw 32 bytes."""
    return hashlib.sha256(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()[:16]


@dataclass(frozen=True)
class Signer:
    """A build worker's private key: signs the manifests it commits."""

    private_key: Ed25519PrivateKey
    key_id: str

    @classmethod
    def load(cls, path: str) -> Signer:
        """The Ed25519 private key in the PEM file at `path` (`Rejected` naming it otherwise)."""
        key = _load_key(path, "signing key", lambda data: load_pem_private_key(data, password=None),
                        Ed25519PrivateKey)
        return cls(key, key_id(key.public_key()))

    def sign(self, data: bytes) -> bytes:
        """The signature document (JSON) of `data`: algorithm, key id, public key and signature."""
        public = self.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return json.dumps({
            "algorithm": ALGORITHM, "key_id": self.key_id, "public_key": _b64(public),
            "signature": _b64(self.private_key.sign(data)),
        }, indent=2).encode()


def signer_of(data: bytes, document: bytes) -> str:
    """The id of the key whose signature `document` is over `data`, checked with the public key it
    carries; `Untrusted` when it is malformed, names another key than it carries, or does not verify."""
    parsed = _parse(document)
    try:
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(parsed["public_key"], validate=True))
    except ValueError:
        raise Untrusted("its signature is malformed (public_key is not an Ed25519 key)") from None
    if key_id(public) != parsed["key_id"]:
        raise Untrusted(f"its signature names key {parsed['key_id']} but carries key {key_id(public)}")
    _verify(public, data, parsed)
    return parsed["key_id"]


@dataclass(frozen=True)
class TrustedKeys:
    """The public keys a reader accepts manifests from, by key id (several: key rotation)."""

    keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)

    @classmethod
    def load(cls, paths: Iterable[str]) -> TrustedKeys:
        """The Ed25519 public keys in the PEM files at `paths` (`Rejected` naming a bad one)."""
        keys = {}
        for path in paths:
            key = _load_key(path, "trusted key", load_pem_public_key, Ed25519PublicKey)
            keys[key_id(key)] = key
        if not keys:
            raise Rejected("no trusted key given")
        return cls(keys)

    def check(self, data: bytes, document: bytes | None) -> str:
        """The id of the trusted key that signed `data`; `Untrusted` (saying why) when `document` is
        missing, malformed, made by a key not trusted here, or not a signature of exactly `data`."""
        if document is None:
            raise Untrusted("it is unsigned (no manifest.sig) and only signed versions are trusted here")
        parsed = _parse(document)
        key = self.keys.get(parsed["key_id"])
        if key is None:
            raise Untrusted(f"it is signed by key {parsed['key_id']}, which is not a trusted key here")
        _verify(key, data, parsed)
        return parsed["key_id"]


def generate_key_pair(directory: str) -> tuple[str, str, str]:
    """A new Ed25519 key pair written into `directory`: `ragindex-<id>.key.pem` (0600, never overwritten)
    and `ragindex-<id>.pub.pem`. Returns the key id and the two paths."""
    key = Ed25519PrivateKey.generate()
    kid = key_id(key.public_key())
    os.makedirs(directory, mode=0o700, exist_ok=True)
    private_path = os.path.join(directory, f"ragindex-{kid}.key.pem")
    public_path = os.path.join(directory, f"ragindex-{kid}.pub.pem")
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    _write_new(private_path, pem, 0o600)
    _write_new(public_path, key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo), 0o644)
    return kid, private_path, public_path


def _load_key(path: str, what: str, load: Callable[[bytes], object], kind: type[_Key]) -> _Key:
    """The key of type `kind` in the PEM file at `path`; `Rejected` naming `what` and `path` otherwise."""
    try:
        with open(path, "rb") as f:
            key = load(f.read())
    except OSError as exc:
        raise Rejected(f"{what} {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:
        raise Rejected(f"{what} {path}: not an unencrypted PEM key ({exc})") from None
    if not isinstance(key, kind):
        raise Rejected(f"{what} {path}: not an Ed25519 key (make one with `ragindex keygen`)")
    return key


def _write_new(path: str, data: bytes, mode: int) -> None:
    """Create `path` with `mode` from the start (a private key is never readable by others, not even
    for a moment), refusing an existing file or a symlink in its place."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    except FileExistsError:
        raise Rejected(f"{path} already exists: not overwriting a key") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _parse(document: bytes) -> dict[str, str]:
    if len(document) > MAX_SIGNATURE_BYTES:
        raise Untrusted(f"its signature is malformed ({len(document)} bytes, not a signature document)")
    try:
        parsed = json.loads(document)
    except ValueError:
        raise Untrusted("its signature is malformed (not JSON)") from None
    if not isinstance(parsed, dict) or not all(isinstance(parsed.get(k), str)
                                               for k in ("algorithm", "key_id", "public_key", "signature")):
        raise Untrusted("its signature is malformed (algorithm, key_id, public_key and signature are required)")
    if parsed["algorithm"] != ALGORITHM:
        raise Untrusted(f"its signature uses {parsed['algorithm']!r}, not {ALGORITHM}")
    return parsed


def _verify(key: Ed25519PublicKey, data: bytes, parsed: dict[str, str]) -> None:
    try:
        key.verify(base64.b64decode(parsed["signature"], validate=True), data)
    except (InvalidSignature, ValueError):
        raise Untrusted(f"its signature by key {parsed['key_id']} does not match the manifest's bytes "
                        "(edited after signing, or a forged signature)") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()

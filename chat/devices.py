"""Devices and their public keys (end-to-end encryption, step 1): what an upload must be.

Sans-IO: no socket, database or thread here, only the rules the server applies to what a
client uploads, so that they are tested alone (tests/test_devices.py).

A device is one installation of a client, with vodozemac (Olm) identity keys: a Curve25519
key for key agreement and an Ed25519 key that signs. The server keeps the directory
and hands keys out; it trusts none of them: clients verify each other (fingerprints, SAS).
The server still checks what it can, so that its directory holds only what it claims to:
- every key is a public key: 32 bytes in unpadded base64 (43 characters), every
  signature 64 bytes (86 characters); an upload with any other field is refused, so
  nothing secret (a pickle, a private key) can be parked on the server by mistake;
- every key is signed by the device's Ed25519 key, over a canonical JSON object naming
  the user and the device: a key cannot be moved to another user or device.

The signed object is JSON with sorted keys, no spaces, UTF-8 (like Matrix's canonical
JSON, without the floats, which never occur here):
- a device: `{"curve25519":C,"device":D,"ed25519":E,"user":U}`
- a one-time key: `{"device":D,"id":K,"key":C,"user":U}`, and a fallback key the same
  with `"fallback":true`.
`user` is the username as registered (its case included).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from chat.errors import InvalidField

DEVICE_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,32}\Z")
KEY_ID_RE = re.compile(r"[A-Za-z0-9_+/=-]{1,32}\Z")
KEY_BYTES, SIGNATURE_BYTES = 32, 64


def canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _b64(value: Any, size: int, field: str) -> str:
    """An unpadded standard base64 string of exactly `size` bytes, as vodozemac writes."""
    if not isinstance(value, str) or len(value) != (size * 4 + 2) // 3:
        raise InvalidField(f"{field}: {size} bytes in unpadded base64")
    try:
        raw = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidField(f"{field}: {size} bytes in unpadded base64") from None
    if len(raw) != size or base64.b64encode(raw).decode().rstrip("=") != value:
        raise InvalidField(f"{field}: {size} bytes in unpadded base64")
    return value


def device_id(value: Any) -> str:
    if not isinstance(value, str) or not DEVICE_ID_RE.match(value):
        raise InvalidField("device: 1 to 32 characters of A-Z, a-z, 0-9, '_' or '-'")
    return value


def only(obj: Any, fields: set[str], what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise InvalidField(f"{what}: an object is required")
    extra = set(obj) - fields
    if extra:
        # Nothing but public keys and their signatures is kept: anything else may be a
        # secret a client put there by mistake.
        raise InvalidField(f"{what}: only {', '.join(sorted(fields))} are allowed, not "
                           f"{', '.join(sorted(str(k)[:20] for k in extra))}")
    return obj


def verify(ed25519: str, signature: str, signed: dict[str, Any], what: str) -> None:
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(ed25519 + "="))
    try:
        key.verify(base64.b64decode(signature + "=="), canonical(signed))
    except InvalidSignature:
        raise InvalidField(f"{what}: the signature does not match the device's key") from None


@dataclass(frozen=True, slots=True)
class DeviceKeys:
    device: str
    curve25519: str
    ed25519: str
    signature: str

    def public(self) -> dict[str, str]:
        return {"device": self.device, "curve25519": self.curve25519,
                "ed25519": self.ed25519, "signature": self.signature}


@dataclass(frozen=True, slots=True)
class OneTimeKey:
    id: str
    key: str
    signature: str
    fallback: bool = False

    def public(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "key": self.key, "signature": self.signature}
        if self.fallback:
            out["fallback"] = True
        return out


def parse_device(frame: dict[str, Any]) -> DeviceKeys:
    """The fields of a `device_keys` request, each checked (the signature is checked by
    `verify_device`, which needs the user's name)."""
    return DeviceKeys(
        device_id(frame.get("device")),
        _b64(frame.get("curve25519"), KEY_BYTES, "curve25519"),
        _b64(frame.get("ed25519"), KEY_BYTES, "ed25519"),
        _b64(frame.get("signature"), SIGNATURE_BYTES, "signature"),
    )


def verify_device(user: str, keys: DeviceKeys) -> None:
    verify(keys.ed25519, keys.signature,
           {"curve25519": keys.curve25519, "device": keys.device, "ed25519": keys.ed25519,
            "user": user}, "device_keys")


def parse_one_time_key(obj: Any, *, fallback: bool = False) -> OneTimeKey:
    what = "fallback" if fallback else "keys"
    obj = only(obj, {"id", "key", "signature"}, what)
    key_id = obj.get("id")
    if not isinstance(key_id, str) or not KEY_ID_RE.match(key_id):
        raise InvalidField(f"{what}: id: 1 to 32 characters of base64 or '-', '_'")
    return OneTimeKey(key_id, _b64(obj.get("key"), KEY_BYTES, f"{what}: key"),
                      _b64(obj.get("signature"), SIGNATURE_BYTES, f"{what}: signature"),
                      fallback)


def verify_one_time_key(user: str, device: DeviceKeys, key: OneTimeKey) -> None:
    signed: dict[str, Any] = {"device": device.device, "id": key.id, "key": key.key,
                              "user": user}
    if key.fallback:
        signed["fallback"] = True
    verify(device.ed25519, key.signature, signed, "fallback" if key.fallback else "keys")


# --- step 2: what the server relays without reading it --------------------------------
SEND_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
_BASE64_RE = re.compile(r"[A-Za-z0-9+/]+\Z")
OLM_PRE_KEY, OLM_NORMAL = 0, 1


def _ciphertext(value: Any, field: str, max_chars: int) -> str:
    """Unpadded base64 of opaque bytes: the server checks its shape, never its content."""
    if (not isinstance(value, str) or not 1 <= len(value) <= max_chars
            or len(value) % 4 == 1 or not _BASE64_RE.match(value)):
        raise InvalidField(f"{field}: unpadded base64 of at most {max_chars} characters")
    return value


def parse_olm(obj: Any, max_chars: int) -> dict[str, Any]:
    """A to-device message's `olm` object: {"type":0|1,"body":B,"sender_key":C}."""
    obj = only(obj, {"type", "body", "sender_key"}, "olm")
    kind = obj.get("type")
    if type(kind) is not int or kind not in (OLM_PRE_KEY, OLM_NORMAL):
        raise InvalidField("olm: type: 0 (a pre-key message) or 1")
    return {"type": kind, "body": _ciphertext(obj.get("body"), "olm: body", max_chars),
            "sender_key": _b64(obj.get("sender_key"), KEY_BYTES, "olm: sender_key")}


def parse_envelope(obj: Any, max_chars: int) -> dict[str, str]:
    """An encrypted message: {"algorithm":"megolm","device","sender_key","session_id",
    "ciphertext"}, nothing else."""
    obj = only(obj, {"algorithm", "device", "sender_key", "session_id", "ciphertext"},
                "encrypted")
    if obj.get("algorithm") != "megolm":
        raise InvalidField("encrypted: algorithm: \"megolm\"")
    return {"algorithm": "megolm", "device": device_id(obj.get("device")),
            "sender_key": _b64(obj.get("sender_key"), KEY_BYTES, "encrypted: sender_key"),
            "session_id": _b64(obj.get("session_id"), KEY_BYTES, "encrypted: session_id"),
            "ciphertext": _ciphertext(obj.get("ciphertext"), "encrypted: ciphertext",
                                      max_chars)}

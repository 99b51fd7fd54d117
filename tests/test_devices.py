"""The device directory's rules, alone: public keys only, each signed by its device."""

from __future__ import annotations

from typing import Any

import pytest
import vodozemac

from chat import devices
from chat.errors import InvalidField


def device_frame(account: vodozemac.Account, user: str, device: str) -> dict[str, Any]:
    keys = {"curve25519": account.curve25519_key.to_base64(), "device": device,
            "ed25519": account.ed25519_key.to_base64(), "user": user}
    return {"type": "device_keys", "device": device, "curve25519": keys["curve25519"],
            "ed25519": keys["ed25519"],
            "signature": account.sign(devices.canonical(keys)).to_base64()}


def one_time_keys(account: vodozemac.Account, user: str, device: str, n: int,
                  fallback: bool = False) -> list[dict[str, Any]]:
    if fallback:
        account.generate_fallback_key()
        items = account.fallback_key.items()
    else:
        account.generate_one_time_keys(n)
        items = account.one_time_keys.items()
    out = []
    for key_id, key in items:
        signed: dict[str, Any] = {"device": device, "id": key_id, "key": key.to_base64(),
                                  "user": user}
        if fallback:
            signed["fallback"] = True
        out.append({"id": key_id, "key": key.to_base64(),
                    "signature": account.sign(devices.canonical(signed)).to_base64()})
    account.mark_keys_as_published()
    return out


def test_a_device_signed_by_its_own_key_is_accepted():
    account = vodozemac.Account()
    keys = devices.parse_device(device_frame(account, "Alice", "laptop"))
    devices.verify_device("Alice", keys)
    for key in one_time_keys(account, "Alice", "laptop", 3):
        devices.verify_one_time_key("Alice", keys, devices.parse_one_time_key(key))
    (fb,) = one_time_keys(account, "Alice", "laptop", 0, fallback=True)
    devices.verify_one_time_key("Alice", keys, devices.parse_one_time_key(fb, fallback=True))


def test_keys_cannot_be_moved_to_another_user_device_or_kind():
    account = vodozemac.Account()
    keys = devices.parse_device(device_frame(account, "alice", "laptop"))
    with pytest.raises(InvalidField, match="signature"):
        devices.verify_device("mallory", keys)  # the user's name is signed, case and all
    with pytest.raises(InvalidField, match="signature"):
        devices.verify_device("Alice", keys)
    other = devices.parse_device(device_frame(account, "alice", "phone"))
    with pytest.raises(InvalidField, match="signature"):
        devices.verify_device("alice", devices.DeviceKeys(
            "laptop", other.curve25519, other.ed25519, other.signature))
    (otk,) = one_time_keys(account, "alice", "laptop", 1)
    with pytest.raises(InvalidField, match="signature"):  # a one-time key is no fallback
        devices.verify_one_time_key("alice", keys,
                                    devices.parse_one_time_key(otk, fallback=True))
    stranger = vodozemac.Account()
    forged = devices.DeviceKeys("laptop", keys.curve25519, stranger.ed25519_key.to_base64(),
                                keys.signature)
    with pytest.raises(InvalidField, match="signature"):
        devices.verify_device("alice", forged)


@pytest.mark.parametrize("field, value", [
    ("curve25519", "A" * 42), ("curve25519", "A" * 44), ("curve25519", "A" * 42 + "=="),
    ("ed25519", "!" * 43), ("signature", "A" * 85), ("curve25519", 7),
    ("curve25519", "A" * 42 + "B"),  # not canonical: its last bits are not zero
])
def test_anything_but_a_public_key_or_signature_is_refused(field, value):
    frame = device_frame(vodozemac.Account(), "alice", "laptop")
    frame[field] = value
    with pytest.raises(InvalidField):
        devices.parse_device(frame)


def test_a_one_time_key_with_more_than_its_fields_is_refused():
    account = vodozemac.Account()
    (otk,) = one_time_keys(account, "alice", "laptop", 1)
    with pytest.raises(InvalidField, match="only id, key, signature"):
        devices.parse_one_time_key({**otk, "pickle": "secret"})


@pytest.mark.parametrize("bad", ["", "a" * 33, "with space", "dot.ted", None, 5])
def test_device_ids(bad):
    with pytest.raises(InvalidField):
        devices.device_id(bad)

"""Interactive device verification by short authentication strings (SAS), sans-IO.

Two devices that already share an Olm channel agree on a secret by an ephemeral
Curve25519 exchange (vodozemac's `Sas`), each shows 7 emoji (or 3 numbers) derived from
it, the users compare them out of band, and then each device proves with a MAC keyed by
that secret which Ed25519 key it holds. A man in the middle of the exchange ends up
with a different secret on each side: the codes differ, and the MACs fail.

The contents below travel as the `content` of Olm payloads (crypto.py wraps them):

    sas.start   {"txn":T,"method":"sas.v1"}
    sas.accept  {"txn":T,"commitment":H}   H = sha256(accepter's key + canonical(start))
    sas.key     {"txn":T,"key":K}          the starter's first, then the accepter's
    sas.mac     {"txn":T,"mac":{"ed25519:D":M},"keys":M2}
    sas.cancel  {"txn":T,"reason":R}

The commitment stops the accepter from choosing its key after seeing the starter's,
which would let it search for a key pair that yields matching codes.

One `Verification` is one attempt, owned by the thread that runs the crypto machine.
Every method returns the content to send next (or None); any failure raises
`SasError`, after which the attempt is over and the caller sends `cancel()`'s content.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

import vodozemac

from chat.devices import canonical

METHOD = "sas.v1"
SAS_TYPES = ("sas.start", "sas.accept", "sas.key", "sas.mac", "sas.cancel")


class SasError(Exception):
    """The verification failed or was cancelled; the message says why."""


@dataclass(frozen=True, slots=True)
class Party:
    username: str  # lower-case
    device: str
    ed25519: str  # the device's signing key, as this side knows it


@dataclass(frozen=True, slots=True)
class Codes:
    """What the users compare: 7 emoji (indices into the SAS emoji table) or 3 numbers."""
    emoji: tuple[int, ...]
    decimals: tuple[int, int, int]


def _sha256(data: str) -> str:
    return base64.b64encode(hashlib.sha256(data.encode()).digest()).decode().rstrip("=")


class Verification:
    """One SAS verification between `own` and `their`, from either side."""

    def __init__(self, txn: str, own: Party, their: Party, *, we_started: bool) -> None:
        self.txn = txn
        self.own, self.their = own, their
        self.we_started = we_started
        self.state = "new"
        self._sas = vodozemac.Sas()
        self._start: dict[str, Any] | None = None
        self._commitment: str | None = None
        self._their_key: str | None = None
        self._established: vodozemac.EstablishedSas | None = None
        self._confirmed = False
        self._their_mac: dict[str, Any] | None = None
        self.verified = False

    def __repr__(self) -> str:
        return f"Verification({self.txn!r}, {self.their.username}/{self.their.device}, " \
               f"{self.state})"

    # -- the starter's side ---------------------------------------------------------

    def start(self) -> dict[str, Any]:
        self._expect("new", starter=True)
        self._start = {"txn": self.txn, "method": METHOD}
        self.state = "started"
        return dict(self._start)

    def on_accept(self, content: dict[str, Any]) -> dict[str, Any]:
        self._expect("started", starter=True)
        commitment = content.get("commitment")
        if not isinstance(commitment, str):
            raise self._fail("an accept without a commitment")
        self._commitment = commitment
        self.state = "key_sent"
        return {"txn": self.txn, "key": self._sas.public_key.to_base64()}

    # -- the accepter's side --------------------------------------------------------

    def on_start(self, content: dict[str, Any]) -> dict[str, Any]:
        self._expect("new", starter=False)
        if content.get("method") != METHOD:
            raise self._fail(f"unknown method {str(content.get('method'))[:20]!r}")
        self._start = {"txn": self.txn, "method": METHOD}
        self.state = "accepted"
        own_key = self._sas.public_key.to_base64()
        return {"txn": self.txn, "commitment": _sha256(own_key + canonical(self._start).decode())}

    # -- both -----------------------------------------------------------------------

    def on_key(self, content: dict[str, Any]) -> dict[str, Any] | None:
        key = content.get("key")
        if not isinstance(key, str):
            raise self._fail("a key message without a key")
        if self.we_started:
            self._expect("key_sent", starter=True)
            assert self._start is not None and self._commitment is not None
            expected = _sha256(key + canonical(self._start).decode())
            if not hmac.compare_digest(expected, self._commitment):
                raise self._fail("the other device's key does not match its commitment")
            reply = None
        else:
            self._expect("accepted", starter=False)
            reply = {"txn": self.txn, "key": self._sas.public_key.to_base64()}
        try:
            self._established = self._sas.diffie_hellman(
                vodozemac.Curve25519PublicKey.from_base64(key))
        except ValueError:
            raise self._fail("the other device's key is not a key") from None
        self._their_key = key
        self.state = "keys"
        return reply

    def codes(self) -> Codes:
        """The codes to show, once the keys are exchanged."""
        if self._established is None:
            raise SasError("the keys are not exchanged yet")
        raw = self._established.bytes(self._info("CHAT_SAS_V1"))
        return Codes(tuple(raw.emoji_indices), tuple(raw.decimals))  # type: ignore[arg-type]

    def confirm(self) -> dict[str, Any]:
        """The user says the codes match: our MAC, to send. If the other side's MAC came
        already, it is checked now (so `verified` may become True)."""
        if self.state != "keys" or self._established is None:
            raise self._fail("confirmed before the keys were exchanged")
        self._confirmed = True
        key_id = f"ed25519:{self.own.device}"
        info = self._mac_info(self.own, self.their)
        mac = {key_id: self._established.calculate_mac(self.own.ed25519, info + key_id)}
        out = {"txn": self.txn, "mac": mac,
               "keys": self._established.calculate_mac(key_id, info + "KEY_IDS")}
        if self._their_mac is not None:
            self._check_mac()
        return out

    def on_mac(self, content: dict[str, Any]) -> None:
        if self.state != "keys":
            raise self._fail("a MAC before the keys were exchanged")
        self._their_mac = content
        if self._confirmed:
            self._check_mac()

    def cancel(self, reason: str) -> dict[str, Any]:
        self.state = "cancelled"
        return {"txn": self.txn, "reason": reason[:200]}

    # -- helpers --------------------------------------------------------------------

    def _check_mac(self) -> None:
        assert self._established is not None and self._their_mac is not None
        key_id = f"ed25519:{self.their.device}"
        info = self._mac_info(self.their, self.own)
        macs, keys = self._their_mac.get("mac"), self._their_mac.get("keys")
        if not isinstance(macs, dict) or set(macs) != {key_id} or not isinstance(keys, str):
            raise self._fail(f"the MAC must cover exactly {key_id}")
        try:
            self._established.verify_mac(key_id, info + "KEY_IDS", keys)
            # The key checked is the one this side stored for the device (trust on
            # first use): the verification vouches for that key, not for one sent now.
            self._established.verify_mac(self.their.ed25519, info + key_id, macs[key_id])
        except (ValueError, TypeError):
            raise self._fail("the MAC does not match: the codes or the keys differ") from None
        self.state = "done"
        self.verified = True

    def _info(self, label: str) -> str:
        starter, accepter = (self.own, self.their) if self.we_started else (self.their,
                                                                          self.own)
        own_key = self._sas.public_key.to_base64()
        starter_key, accepter_key = ((own_key, self._their_key) if self.we_started
                                     else (self._their_key, own_key))
        return (f"{label}|{starter.username}|{starter.device}|{starter_key}|"
                f"{accepter.username}|{accepter.device}|{accepter_key}|{self.txn}")

    def _mac_info(self, sender: Party, receiver: Party) -> str:
        return (f"CHAT_SAS_MAC_V1|{sender.username}|{sender.device}|"
                f"{receiver.username}|{receiver.device}|{self.txn}|")

    def _expect(self, state: str, *, starter: bool) -> None:
        if self.state != state or self.we_started != starter:
            raise self._fail(f"unexpected step in state {self.state}")

    def _fail(self, reason: str) -> SasError:
        self.state = "cancelled"
        return SasError(reason)

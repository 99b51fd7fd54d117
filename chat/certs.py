"""Development certificates: a throwaway local CA and a server certificate it signs.

Theory of operation:
- Everything is built and checked in memory first: keys, the CA, the server certificate,
  and a strict X.509 verification of the chain (cryptography's verifier, the same rules
  a browser-grade client applies). Nothing reaches the disk unless that check passes.
- The four files are written as a set. Without `force`, each is created with O_EXCL, so
  an existing file is never touched (and one that appears mid-run is not clobbered).
  With `force`, all four are first written to temporary files in the same directory and
  only then moved into place with os.replace, so a reader sees each file either old or new,
  never half written.
- Private keys are created with mode 0600 by os.open itself: there is no moment at which
  a key exists on disk with wider permissions.
- Once written, the files are read back and verified again, so what is on disk is what
  was checked.
These certificates are for development only: the CA key is unencrypted and the CA can
sign any name, so ca.key must never leave the machine that made it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

DEFAULT_OUT_DIR = Path("certs")

# Mozilla's Server Side TLS guidance recommends 90-day certificates: short enough that a
# leaked key stops mattering soon, and a dev setup regenerates them in one command.
DEFAULT_SERVER_DAYS = 90
# CA/Browser Forum ceiling for publicly trusted TLS certificates (398 days, minus a day of
# margin for clock skew); clients such as Apple's reject anything longer.
MAX_SERVER_DAYS = 397
# The dev CA lives one year: it is trusted by every client given ca.crt and can sign any
# name, so its lifetime bounds the damage of a leaked ca.key. It is regenerated together
# with the server certificate anyway, so a longer life would buy nothing. It is stretched
# to cover the server certificate when `days` asks for more, because a certificate that
# outlives its issuer would simply stop verifying when the CA expires.
CA_DAYS = 365
# Certificates start this far in the past so that a client whose clock runs a little
# behind the machine that made them does not reject them as "not yet valid". Lifetimes
# count from that earlier start, so a certificate never lives longer than it says.
CLOCK_SKEW = dt.timedelta(minutes=5)

# Always in the server certificate, so a local server works without any --host.
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")

# One DNS label (RFC 1123): letters, digits and inner hyphens, at most 63 characters.
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_MAX_DNS_NAME = 253

CA_CERT_NAME = "ca.crt"
CA_KEY_NAME = "ca.key"
SERVER_CERT_NAME = "server.crt"
SERVER_KEY_NAME = "server.key"

_KEY_MODE = 0o600
_CERT_MODE = 0o644  # certificates are public; clients need to read ca.crt
_DIR_MODE = 0o700


@dataclass(frozen=True)
class CertPaths:
    """Where generate_dev_certs put its four files."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, out_dir: Path) -> CertPaths:
        return cls(
            ca_cert=out_dir / CA_CERT_NAME,
            ca_key=out_dir / CA_KEY_NAME,
            server_cert=out_dir / SERVER_CERT_NAME,
            server_key=out_dir / SERVER_KEY_NAME,
        )

    def all(self) -> tuple[Path, Path, Path, Path]:
        return (self.ca_cert, self.ca_key, self.server_cert, self.server_key)


SanName = x509.DNSName | x509.IPAddress


def parse_host(host: str) -> SanName:
    """One --host value as a SAN entry: an IP address if it parses as one, else a DNS name."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):  # allow the URL form of IPv6, "[::1]"
        text = text[1:-1]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
            # A zone ("fe80::1%eth0") is local to one machine and cannot go in a certificate.
            raise ValueError(f"host {host!r}: an IPv6 zone cannot go in a certificate")
        return x509.IPAddress(ip)
    name = text.rstrip(".").lower()  # DNS is case-insensitive; the root dot is implied
    labels = name.split(".")
    if labels[0] == "*" and len(labels) > 2:
        labels = labels[1:]  # a wildcard may stand for the leftmost label only
    if (
        not name
        or len(name) > _MAX_DNS_NAME
        or not all(_LABEL.fullmatch(label) for label in labels)
    ):
        raise ValueError(
            f"host {host!r} is neither an IP address nor a valid DNS name "
            "(use the ASCII 'xn--' form for international names, and no port)"
        )
    return x509.DNSName(name)


def _san_names(hosts: Sequence[str]) -> list[SanName]:
    names: list[SanName] = []
    for host in (*DEFAULT_HOSTS, *hosts):
        name = parse_host(host)
        if name not in names:  # keeps first-seen order, so "localhost" stays first
            names.append(name)
    return names


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256: universally supported, fast, and as strong as a 3072-bit RSA key.
    return ec.generate_private_key(ec.SECP256R1())


def _make_ca(key: ec.EllipticCurvePrivateKey, start: dt.datetime, days: int) -> x509.Certificate:
    public = key.public_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "chat development"),
            # The serial-like suffix tells apart CAs made on different runs or machines.
            x509.NameAttribute(NameOID.COMMON_NAME, f"chat dev CA {secrets.token_hex(4)}"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(public)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        # path_length=0: this CA may sign leaf certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )


def _make_server_cert(
    key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    names: list[SanName],
    start: dt.datetime,
    days: int,
) -> x509.Certificate:
    public = key.public_key()
    dns_names = [n.value for n in names if isinstance(n, x509.DNSName)]
    # Clients match on the SAN alone; the CN is only there for humans reading the cert.
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])])
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            # ECDHE key exchange needs only signatures from an EC key; no keyEncipherment.
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def verify_server_cert(
    ca: x509.Certificate, leaf: x509.Certificate, names: Sequence[SanName]
) -> None:
    """Check `leaf` chains to `ca` for every name, under strict X.509 (RFC 5280 / CABF) rules.

    Raises cryptography.x509.verification.VerificationError on the first name that fails.
    """
    builder = PolicyBuilder().store(Store([ca]))
    for name in names:
        if isinstance(name, x509.DNSName) and name.value.startswith("*."):
            # A verifier checks a concrete host name; any one label stands in for "*".
            name = x509.DNSName("wildcard-check" + name.value[1:])
        builder.build_server_verifier(name).verify(leaf, [])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted, because the server must load its key unattended; the 0600 mode and the
    # private directory are the protection. PKCS#8 is what every TLS stack reads.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL fails on any existing file and on a symlink, so nothing is ever clobbered or
    # written through a link; the mode is applied at creation (the umask can only narrow it).
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    try:
        with open(fd, "wb", closefd=True) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)  # ours: O_EXCL guarantees we created it
        raise


def _write_set(files: list[tuple[Path, bytes, int]], *, force: bool) -> None:
    if not force:
        written: list[Path] = []
        try:
            for path, data, mode in files:
                _write_new(path, data, mode)
                written.append(path)
        except BaseException:
            for path in written:  # leave no half set behind
                path.unlink(missing_ok=True)
            raise
        return
    temps: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
            _write_new(tmp, data, mode)
            temps.append((tmp, path))
        # All four are on disk before the first replace, so a failure above leaves the old
        # set intact; the replaces themselves are atomic one file at a time.
        for tmp, path in temps:
            os.replace(tmp, path)
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)


def _existing(paths: CertPaths) -> list[Path]:
    # lexists: a dangling symlink still counts as "something is there".
    return [p for p in paths.all() if os.path.lexists(p)]


def generate_dev_certs(
    out_dir: Path,
    hosts: Sequence[str] = (),
    *,
    force: bool = False,
    days: int = DEFAULT_SERVER_DAYS,
) -> CertPaths:
    """Make a dev CA and a server certificate for localhost plus `hosts` in `out_dir`.

    Raises FileExistsError (naming the files) if any of the four exists and `force` is
    false, and ValueError for a bad `days` or host.
    """
    if not 1 <= days <= MAX_SERVER_DAYS:
        raise ValueError(f"days must be between 1 and {MAX_SERVER_DAYS}, not {days}")
    names = _san_names(hosts)
    out_dir = Path(out_dir)
    paths = CertPaths.in_dir(out_dir)
    if not force and (existing := _existing(paths)):
        raise FileExistsError(
            "refusing to overwrite existing " + ", ".join(str(p) for p in existing)
        )

    start = dt.datetime.now(dt.UTC) - CLOCK_SKEW
    ca_key = _new_key()
    ca = _make_ca(ca_key, start, max(CA_DAYS, days + 1))
    server_key = _new_key()
    leaf = _make_server_cert(server_key, ca, ca_key, names, start, days)
    verify_server_cert(ca, leaf, names)

    out_dir.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    _write_set(
        [
            (paths.ca_key, _key_pem(ca_key), _KEY_MODE),
            (paths.server_key, _key_pem(server_key), _KEY_MODE),
            (paths.ca_cert, ca.public_bytes(serialization.Encoding.PEM), _CERT_MODE),
            (paths.server_cert, leaf.public_bytes(serialization.Encoding.PEM), _CERT_MODE),
        ],
        force=force,
    )

    # Re-check what actually landed on disk, not just what was built in memory.
    verify_server_cert(
        x509.load_pem_x509_certificate(paths.ca_cert.read_bytes()),
        x509.load_pem_x509_certificate(paths.server_cert.read_bytes()),
        names,
    )
    return paths


def certificate_expiry(cert_path: Path) -> dt.datetime:
    """When the PEM certificate at `cert_path` stops being valid (timezone-aware, UTC)."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    return cert.not_valid_after_utc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m chat.certs",
        description="Make a development CA and a server certificate signed by it.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT_DIR,
        metavar="DIR",
        help=f"directory for the four files (default: {DEFAULT_OUT_DIR})",
    )
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="extra DNS name or IP address for the server certificate (repeatable); "
        "localhost, 127.0.0.1 and ::1 are always included",
    )
    parser.add_argument("--force", action="store_true", help="replace existing files")
    parser.add_argument(
        "--days",
        type=int,
        default=DEFAULT_SERVER_DAYS,
        metavar="N",
        help=f"server certificate lifetime in days (default {DEFAULT_SERVER_DAYS}, "
        f"at most {MAX_SERVER_DAYS})",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `python -m chat.certs` command; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        paths = generate_dev_certs(args.out, args.host, force=args.force, days=args.days)
    except FileExistsError as exc:
        print(f"error: {exc}; use --force to replace them", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"CA certificate:     {paths.ca_cert}  (give this to clients)")
    print(f"CA key:             {paths.ca_key}  (keep private)")
    expires = certificate_expiry(paths.server_cert)
    print(f"server certificate: {paths.server_cert}  (expires {expires:%Y-%m-%d %H:%M} UTC)")
    print(f"server key:         {paths.server_key}  (keep private)")
    print(f"server:  chat-server --certfile {paths.server_cert} --keyfile {paths.server_key}")
    print(f"clients: chat-client login --cafile {paths.ca_cert} --username NAME")
    print("         (and --server HOST:PORT on another machine; without --cafile, chat-client")
    print("         trusts only the development CA that chat-server makes in its data directory)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

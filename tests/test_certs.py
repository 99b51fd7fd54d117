"""Tests for chat.certs: the files, the certificates' contents, a real TLS handshake, the CLI."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from chat import certs, tls
from chat.certs import CertPaths, certificate_expiry, generate_dev_certs

REPO = Path(__file__).resolve().parent.parent
GEN_CERTS = REPO / "scripts" / "gen_certs.sh"

EXTRA_DNS = "chat.example.test"
EXTRA_IP = "192.0.2.7"  # TEST-NET-1: never a real host
IO_TIMEOUT = 10  # seconds; bounds every socket operation so a broken handshake fails, not hangs


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    """One generated set, shared by the read-only tests (key generation is the slow part)."""
    out = tmp_path_factory.mktemp("certs") / "out"
    return generate_dev_certs(out, [EXTRA_DNS, EXTRA_IP])


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def snapshot(paths: CertPaths) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in paths.all()}


# --- files ---------------------------------------------------------------------------------


def test_writes_four_files_where_it_says(made: CertPaths) -> None:
    out = made.ca_cert.parent
    assert made == CertPaths(
        ca_cert=out / "ca.crt",
        ca_key=out / "ca.key",
        server_cert=out / "server.crt",
        server_key=out / "server.key",
    )
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "ca.key", "server.crt", "server.key"]


def test_private_keys_are_0600_and_new_dir_is_0700(made: CertPaths) -> None:
    assert stat.S_IMODE(made.ca_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(made.server_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(made.ca_cert.parent.stat().st_mode) == 0o700


def test_keys_are_p256_and_match_their_certificates(made: CertPaths) -> None:
    for cert_path, key_path in [(made.ca_cert, made.ca_key), (made.server_cert, made.server_key)]:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(key.curve, ec.SECP256R1)
        assert load_cert(cert_path).public_key() == key.public_key()


# --- certificate contents ------------------------------------------------------------------


def test_ca_extensions(made: CertPaths) -> None:
    ca = load_cert(made.ca_cert)
    assert ca.subject == ca.issuer
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)


def test_server_extensions(made: CertPaths) -> None:
    ca = load_cert(made.ca_cert)
    leaf = load_cert(made.server_cert)
    assert leaf.issuer == ca.subject
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(leaf.public_key())
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert leaf.subject.rfc4514_string() == "CN=localhost"


def test_san_has_defaults_and_extra_hosts(made: CertPaths) -> None:
    san = load_cert(made.server_cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert san.value.get_values_for_type(x509.DNSName) == ["localhost", EXTRA_DNS]
    assert san.value.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address(EXTRA_IP),
    ]


def test_hosts_are_deduplicated_and_normalised(tmp_path: Path) -> None:
    paths = generate_dev_certs(
        tmp_path, ["LOCALHOST", "::1", "[::1]", "a.test.", "A.test", "10.1.2.3"]
    )
    san = load_cert(paths.server_cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert [str(n.value) for n in san.value] == [
        "localhost",
        "127.0.0.1",
        "::1",
        "a.test",
        "10.1.2.3",
    ]


@pytest.mark.parametrize("bad", ["", "host:7072", "-bad.test", "a..test", "*", "bücher.test"])
def test_bad_host_is_refused_before_anything_is_written(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError):
        generate_dev_certs(tmp_path / "out", [bad])
    assert not (tmp_path / "out").exists()


def test_server_lifetime_defaults_to_at_most_90_days(made: CertPaths) -> None:
    leaf = load_cert(made.server_cert)
    now = dt.datetime.now(dt.UTC)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= dt.timedelta(days=90)
    # Backdated a little for clock skew, but valid now.
    assert leaf.not_valid_before_utc < now < leaf.not_valid_after_utc
    # The CA must outlive the certificate it signed.
    assert load_cert(made.ca_cert).not_valid_after_utc >= leaf.not_valid_after_utc


def test_certificate_expiry_is_utc_aware(made: CertPaths) -> None:
    expiry = certificate_expiry(made.server_cert)
    assert expiry.tzinfo is not None and expiry.utcoffset() == dt.timedelta(0)
    assert expiry == load_cert(made.server_cert).not_valid_after_utc
    left = expiry - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=89) < left <= dt.timedelta(days=90)


@pytest.mark.parametrize("days", [0, -1, 398])
def test_days_out_of_range_is_refused(tmp_path: Path, days: int) -> None:
    with pytest.raises(ValueError, match="days"):
        generate_dev_certs(tmp_path, days=days)


def test_longest_allowed_lifetime_still_verifies(tmp_path: Path) -> None:
    paths = generate_dev_certs(tmp_path, days=397)
    leaf = load_cert(paths.server_cert)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(days=397)
    assert load_cert(paths.ca_cert).not_valid_after_utc > leaf.not_valid_after_utc


# --- strict verification -------------------------------------------------------------------


@pytest.mark.parametrize(
    "subject",
    [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
        x509.DNSName(EXTRA_DNS),
        x509.IPAddress(ipaddress.ip_address(EXTRA_IP)),
    ],
    ids=str,
)
def test_strict_verifier_accepts_every_name(made: CertPaths, subject: x509.GeneralName) -> None:
    verifier = (
        PolicyBuilder().store(Store([load_cert(made.ca_cert)])).build_server_verifier(subject)
    )
    chain = verifier.verify(load_cert(made.server_cert), [])
    assert chain[-1] == load_cert(made.ca_cert)


@pytest.mark.parametrize(
    "subject",
    [x509.DNSName("wrong.example"), x509.IPAddress(ipaddress.ip_address("10.9.8.7"))],
    ids=str,
)
def test_strict_verifier_rejects_other_names(made: CertPaths, subject: x509.GeneralName) -> None:
    verifier = (
        PolicyBuilder().store(Store([load_cert(made.ca_cert)])).build_server_verifier(subject)
    )
    with pytest.raises(VerificationError):
        verifier.verify(load_cert(made.server_cert), [])


def test_strict_verifier_rejects_another_ca(made: CertPaths, tmp_path: Path) -> None:
    other = generate_dev_certs(tmp_path)
    verifier = (
        PolicyBuilder()
        .store(Store([load_cert(other.ca_cert)]))
        .build_server_verifier(x509.DNSName("localhost"))
    )
    with pytest.raises(VerificationError):
        verifier.verify(load_cert(made.server_cert), [])


# --- overwriting ---------------------------------------------------------------------------


def test_refuses_to_overwrite_and_leaves_files_untouched(tmp_path: Path) -> None:
    paths = generate_dev_certs(tmp_path)
    before = snapshot(paths)
    with pytest.raises(FileExistsError) as info:
        generate_dev_certs(tmp_path)
    for p in paths.all():
        assert str(p) in str(info.value)
    assert snapshot(paths) == before


def test_one_existing_file_is_enough_to_refuse(tmp_path: Path) -> None:
    (tmp_path / "server.key").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match=r"server\.key"):
        generate_dev_certs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.key"]
    assert (tmp_path / "server.key").read_bytes() == b"precious"


def test_dangling_symlink_counts_as_existing(tmp_path: Path) -> None:
    (tmp_path / "ca.key").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError, match=r"ca\.key"):
        generate_dev_certs(tmp_path)
    assert not (tmp_path / "elsewhere").exists()


def test_force_replaces_everything(tmp_path: Path) -> None:
    paths = generate_dev_certs(tmp_path)
    before = snapshot(paths)
    again = generate_dev_certs(tmp_path, ["new.test"], force=True)
    assert again == paths
    after = snapshot(paths)
    assert all(after[p] != before[p] for p in paths.all())
    assert stat.S_IMODE(paths.ca_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(paths.server_key.stat().st_mode) == 0o600
    # No temporary files left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ca.crt",
        "ca.key",
        "server.crt",
        "server.key",
    ]
    certs.verify_server_cert(
        load_cert(paths.ca_cert), load_cert(paths.server_cert), [x509.DNSName("new.test")]
    )


# --- a real TLS handshake ------------------------------------------------------------------


def handshake(paths: CertPaths, server_hostname: str) -> None:
    """A TLS handshake over a socket pair with chat.tls's contexts; raises the client's error."""
    server_ctx = tls.server_context(paths.server_cert, paths.server_key)
    client_ctx = tls.client_context(paths.ca_cert)
    server_sock, client_sock = socket.socketpair()
    server_sock.settimeout(IO_TIMEOUT)
    client_sock.settimeout(IO_TIMEOUT)
    server_error: list[BaseException] = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(server_sock, server_side=True) as s:
                s.recv(1)  # reads the client's byte, proving the session works both ways
                s.sendall(b"!")
        except (OSError, ssl.SSLError) as exc:  # the client rejected us: expected sometimes
            server_error.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with client_ctx.wrap_socket(client_sock, server_hostname=server_hostname) as c:
            c.sendall(b"?")
            assert c.recv(1) == b"!"
    finally:
        client_sock.close()
        thread.join(IO_TIMEOUT)
        server_sock.close()
    assert not thread.is_alive()
    if server_error:
        raise AssertionError(f"server side failed: {server_error[0]!r}")


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1", "::1", EXTRA_DNS, EXTRA_IP])
def test_tls_handshake_succeeds_for_certificate_names(made: CertPaths, name: str) -> None:
    handshake(made, name)


@pytest.mark.parametrize("name", ["wrong.example", "10.9.8.7"])
def test_tls_handshake_fails_for_other_names(made: CertPaths, name: str) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(made, name)


# --- the command line ----------------------------------------------------------------------


def test_main_prints_paths_and_client_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "c"
    assert certs.main(["--out", str(out), "--host", EXTRA_DNS]) == 0
    printed = capsys.readouterr().out
    for name in ["ca.crt", "ca.key", "server.crt", "server.key"]:
        assert str(out / name) in printed
    assert f"--cafile {out / 'ca.crt'}" in printed

    assert certs.main(["--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--force" in err and str(out / "ca.key") in err

    assert certs.main(["--out", str(out), "--force", "--days", "30"]) == 0
    leaf = load_cert(out / "server.crt")
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(days=30)


def test_main_reports_bad_days(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert certs.main(["--out", str(tmp_path), "--days", "400"]) != 0
    assert "days" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(GEN_CERTS), *args],
        capture_output=True,
        text=True,
        timeout=120,  # generous: a machine without a usable venv bootstraps one first
        check=False,
    )


def test_gen_certs_script(tmp_path: Path) -> None:
    assert os.access(GEN_CERTS, os.X_OK), "scripts/gen_certs.sh must be executable"
    out = tmp_path / "script-out"
    first = run_script("--out", str(out), "--host", EXTRA_IP)
    assert first.returncode == 0, first.stderr
    paths = CertPaths.in_dir(out)
    assert all(p.is_file() for p in paths.all())
    assert stat.S_IMODE(paths.server_key.stat().st_mode) == 0o600
    before = snapshot(paths)

    second = run_script("--out", str(out))
    assert second.returncode != 0
    assert "--force" in second.stderr
    assert snapshot(paths) == before

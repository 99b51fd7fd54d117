"""TLS policy as a client sees it: a handshake matrix over real sockets, mTLS, reloads.

sslyze, if present (CHAT_SSLYZE_PYTHON names an interpreter that has it; scripts/tls_audit.sh
makes one), also grades the live server against Mozilla's profiles.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import ssl
import subprocess
import warnings

import pytest
from conftest import TIMEOUT, Client
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from chat import certs, tls

# The certificate is ECDSA, so only ECDSA-authenticated suites can be negotiated.
TLS12_OK = [c for c in tls.TLS12_CIPHERS.split(":") if "ECDSA" in c]
TLS12_BAD = ["ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA", "AES128-GCM-SHA256"]


def _handshake(server, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection((server.host, server.port), timeout=TIMEOUT)
    try:
        return ctx.wrap_socket(raw, server_hostname="localhost")
    except BaseException:
        raw.close()
        raise


def _client_ctx(server, *, versions=None, ciphers=None, groups=None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(server.cafile)
    if versions:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version, ctx.maximum_version = versions
    if ciphers:
        ctx.set_ciphers(ciphers + ":@SECLEVEL=0")
    if groups:
        lib = tls._libssl()
        assert lib is not None
        import ctypes

        ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
        assert lib.SSL_CTX_get_options(ptr) == int(ctx.options)
        assert lib.SSL_CTX_ctrl(ptr, tls._SSL_CTRL_SET_GROUPS_LIST, 0, groups) == 1
    return ctx


V12 = (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2)
V13 = (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_3)


@pytest.mark.parametrize("cipher", TLS12_OK)
def test_tls12_aead_ecdhe_suites_accepted(chat_server, cipher):
    with _handshake(chat_server, _client_ctx(chat_server, versions=V12, ciphers=cipher)) as s:
        assert s.version() == "TLSv1.2" and s.cipher()[0] == cipher
        assert s.compression() is None


@pytest.mark.parametrize("cipher", TLS12_BAD)
def test_tls12_cbc_and_static_suites_refused(chat_server, cipher):
    with pytest.raises(ssl.SSLError):
        _handshake(chat_server, _client_ctx(chat_server, versions=V12, ciphers=cipher))


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_old_versions_refused(chat_server, version):
    with pytest.raises(ssl.SSLError):
        _handshake(chat_server, _client_ctx(chat_server, versions=(version, version),
                                            ciphers="ALL"))


def test_tls13_preferred(chat_server):
    with _handshake(chat_server, tls.client_context(chat_server.cafile)) as s:
        assert s.version() == "TLSv1.3"


@pytest.mark.parametrize(("group", "ok"), [
    (b"X25519", True), (b"P-256", True), (b"P-384", True), (b"X448", False), (b"P-521", False),
])
def test_key_exchange_groups(chat_server, group, ok):
    ctx = _client_ctx(chat_server, groups=group)
    if ok:
        with _handshake(chat_server, ctx) as s:
            assert s.version() == "TLSv1.3"
    else:
        with pytest.raises(ssl.SSLError):
            _handshake(chat_server, ctx)


def test_modern_profile_is_tls13_only(server_factory):
    server = server_factory(tls_profile="modern")
    with pytest.raises(ssl.SSLError):
        _handshake(server, _client_ctx(server, versions=V12))
    with _handshake(server, _client_ctx(server, versions=V13)) as s:
        assert s.version() == "TLSv1.3"


def test_client_refuses_wrong_host_name(chat_server):
    raw = socket.create_connection((chat_server.host, chat_server.port), timeout=TIMEOUT)
    with pytest.raises(ssl.SSLCertVerificationError):
        tls.client_context(chat_server.cafile).wrap_socket(raw, server_hostname="example.org")
    raw.close()


def _client_cert(tmp_path, ca_paths: certs.CertPaths):
    ca_key = serialization.load_pem_private_key(ca_paths.ca_key.read_bytes(), None)
    ca = x509.load_pem_x509_certificate(ca_paths.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client")]))
        .issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "client.crt", tmp_path / "client.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return cert_path, key_path


def test_mutual_tls_required_when_configured(server_factory, cert_dir, tmp_path):
    server = server_factory(client_cafile=str(cert_dir.ca_cert))
    s = _handshake(server, tls.client_context(server.cafile))
    # TLS 1.3 reports a missing client certificate on the first read.
    with pytest.raises((ssl.SSLError, ConnectionError, EOFError)):
        f = s.makefile("rb")
        if not f.readline():
            raise EOFError
    cert, key = _client_cert(tmp_path, cert_dir)
    ctx = tls.client_context(server.cafile, certfile=cert, keyfile=key)
    with _handshake(server, ctx) as ok:
        assert ok.makefile("rb").readline().startswith(b'{"type":"hello"')


def test_sighup_reload_new_certificate_keeps_open_connections(server_factory, tmp_path):
    first = certs.generate_dev_certs(tmp_path / "a")
    server = server_factory(certfile=str(first.server_cert), keyfile=str(first.server_key))
    server.cafile = first.ca_cert
    old_client = server.user("alice")
    second = certs.generate_dev_certs(tmp_path / "b")
    for src, dst in ((second.server_cert, first.server_cert),
                     (second.server_key, first.server_key)):
        dst.write_bytes(src.read_bytes())
    server.server.reload_certificates()
    with pytest.raises(ssl.SSLCertVerificationError):
        Client(server.host, server.port, first.ca_cert)
    assert Client(server.host, server.port, second.ca_cert).hello["type"] == "hello"
    assert old_client.request({"type": "ping"})["type"] == "pong"


def test_warns_when_certificate_expires_soon(server_factory, tmp_path, caplog):
    short = certs.generate_dev_certs(tmp_path / "short", days=10)
    with caplog.at_level(logging.WARNING, logger="chat.server"):
        server_factory(certfile=str(short.server_cert), keyfile=str(short.server_key))
    assert any("expires" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(not os.environ.get("CHAT_SSLYZE_PYTHON"), reason="sslyze not installed")
@pytest.mark.parametrize("profile", ["intermediate", "modern"])
def test_sslyze_grades_mozilla_profiles(server_factory, profile):
    server = server_factory(tls_profile=profile)
    result = subprocess.run(
        [os.environ["CHAT_SSLYZE_PYTHON"], "-m", "sslyze", f"--mozilla_config={profile}",
         "--certinfo_ca_file", str(server.cafile), f"localhost:{server.port}"],
        capture_output=True, text=True, timeout=120,
    )
    assert "OK - Compliant" in result.stdout, result.stdout[-2000:]

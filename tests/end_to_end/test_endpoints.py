"""The endpoint strings README's "TLS, IPv6 and load balancers" shows, each against the
real twistd plugin: a device logs in and gets a frame ACKed, and the log names the
device's own address."""

from __future__ import annotations

import datetime
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from teltonika.wire import CODEC_8E, encode_avl_frame, encode_login, tcp_ack
from tests.end_to_end.process import Device, ServerProcess
from tests.helpers import IMEI, OTHER_IMEI, record

pytestmark = pytest.mark.slow


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.close()


def _serve(servers: list[ServerProcess], cwd: Path, endpoint: str, host: str) -> ServerProcess:
    server = ServerProcess(cwd, "--metrics", "off", endpoint=endpoint, host=host)
    servers.append(server)
    server.wait_listening()
    server.wait_for_log("File sink ready")
    return server


def _login_and_store(device: Device, imei: str = IMEI, prefix: bytes = b"") -> None:
    device.send(prefix + encode_login(imei))
    assert device.recv_exactly(1) == b"\x01"
    device.send(encode_avl_frame(CODEC_8E, [record(1)]))
    assert device.recv_exactly(4) == tcp_ack(1)
    device.close()


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A throwaway key and certificate for localhost (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "server.key", directory / "server.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def test_tls_endpoint(servers: list[ServerProcess], tmp_path: Path) -> None:
    """``ssl:PORT:privateKey=...:certKey=...``: a device that verifies the server's
    certificate logs in over TLS and its frame is ACKed."""
    key, cert = _self_signed(tmp_path)
    server = _serve(
        servers,
        tmp_path,
        f"ssl:{{port}}:privateKey={key}:certKey={cert}:interface=127.0.0.1",
        "127.0.0.1",
    )
    context = ssl.create_default_context(cafile=str(cert))
    _login_and_store(Device(server.port, tls=context))
    assert "logged in from 127.0.0.1:" in server.output()


def test_ipv6_endpoint(servers: list[ServerProcess], tmp_path: Path) -> None:
    """``tcp6:PORT`` (here bound to ``::1``): a device over IPv6 logs in, its frame is
    ACKed, and the log shows its IPv6 address in brackets."""
    server = _serve(servers, tmp_path, "tcp6:{port}:interface=\\:\\:1", "::1")
    _login_and_store(Device(server.port, host="::1"))
    assert "logged in from [::1]:" in server.output()


PROXY_V1 = b"PROXY TCP4 203.0.113.7 10.0.0.2 56324 5027\r\n"
PROXY_V2 = (
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c"
    + bytes([198, 51, 100, 9, 10, 0, 0, 2])
    + (40001).to_bytes(2, "big")
    + (5027).to_bytes(2, "big")
)


def test_proxy_protocol_endpoint(servers: list[ServerProcess], tmp_path: Path) -> None:
    """``haproxy:tcp:PORT``: behind a balancer speaking the PROXY protocol (v1 and v2
    headers), devices log in and are ACKed, and the log names each device's address from
    the header rather than the balancer's."""
    server = _serve(servers, tmp_path, "haproxy:tcp:{port}:interface=127.0.0.1", "127.0.0.1")
    _login_and_store(Device(server.port), IMEI, PROXY_V1)
    _login_and_store(Device(server.port), OTHER_IMEI, PROXY_V2)
    output = server.output()
    assert f"Device {IMEI} logged in from 203.0.113.7:56324" in output
    assert f"Device {OTHER_IMEI} logged in from 198.51.100.9:40001" in output
    assert "logged in from 127.0.0.1" not in output


def test_proxy_header_before_tls_is_not_understood_by_haproxy_ssl(
    servers: list[ServerProcess], tmp_path: Path
) -> None:
    """The limit README states: a balancer that passes TLS through sends the PROXY header
    in the clear, then the device's handshake; ``haproxy:ssl:...`` expects the header
    inside TLS, so that connection never logs in (terminate TLS at the balancer and use
    ``haproxy:tcp:...`` instead)."""
    key, cert = _self_signed(tmp_path)
    server = _serve(
        servers,
        tmp_path,
        f"haproxy:ssl:{{port}}:privateKey={key}:certKey={cert}:interface=127.0.0.1",
        "127.0.0.1",
    )
    context = ssl.create_default_context(cafile=str(cert))
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    raw.sendall(PROXY_V1)
    with pytest.raises((ssl.SSLError, OSError)):
        device = context.wrap_socket(raw, server_hostname="localhost")
        device.sendall(encode_login(IMEI))
        if device.recv(1) == b"":
            raise ConnectionResetError("closed without an answer")
    raw.close()
    assert "logged in" not in server.output()

"""``rediss+sentinel://`` against real processes: a redis-server master and a sentinel
that both listen on TLS only (``port 0``), with a throwaway CA and server certificate.

Neither process has a plain-text port, so every byte between our connection and them
(the question to the sentinel, the connection to the master it names) went over TLS.
The connection does not verify the certificates (README, "Redis through Sentinel", limits); this
test shows that the TLS path works end to end, not that it authenticates the server.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

from teltonika.redis.connect import SentinelAddress, lazy_connection, parse_redis_url
from tests.servers import (
    REPO,
    RedisServer,
    _wait_for,
    checkout_env,
    free_port,
    wait_for_port,
)

SERVICE = "teltonika-tls"
STREAM = "teltonika:tls-check"


def _write_certificates(directory: Path) -> dict[str, str]:
    """A CA and a server certificate for 127.0.0.1 signed by it (PEM files in
    *directory*): the file names redis-server's ``tls-*-file`` options take."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("teltonika test CA"))
        .issuer_name(name("teltonika test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(IPv4Address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = {
        "tls-ca-cert-file": directory / "ca.pem",
        "tls-cert-file": directory / "server.pem",
        "tls-key-file": directory / "server.key",
    }
    files["tls-ca-cert-file"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["tls-cert-file"].write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    files["tls-key-file"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(files["tls-key-file"], 0o600)
    return {option: str(path) for option, path in files.items()}


def _tls_cli(port: int, certificates: dict[str, str], *args: str) -> str:
    out = subprocess.run(
        ["redis-cli", "-p", str(port), "--tls", "--cacert", certificates["tls-ca-cert-file"],
         *args],
        check=True, capture_output=True, timeout=10,
    )  # fmt: skip
    return out.stdout.decode()


class TLSSentinel:
    """A TLS-only master and one TLS-only sentinel (quorum 1) monitoring it."""

    def __init__(self, directory: Path) -> None:
        self.certificates = _write_certificates(directory)
        tls = "".join(f"{option} {path}\n" for option, path in self.certificates.items())
        tls += "tls-auth-clients no\n"
        self.master_port = free_port()
        self.master = RedisServer(
            ["--port", "0", "--tls-port", str(self.master_port)],
            port=self.master_port,
            config=tls,
        )
        self.sentinel = RedisServer(config="", port=free_port())
        assert self.sentinel.config is not None
        with open(self.sentinel.config, "w") as file:
            file.write(
                f"port 0\ntls-port {self.sentinel.port}\ntls-replication yes\n{tls}"
                f"bind 127.0.0.1\ndir {self.sentinel.directory}\n"
                f"logfile {os.path.join(self.sentinel.directory, 'sentinel.log')}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.master_port} 1\n"
            )

    def start(self) -> TLSSentinel:
        self.master.start()
        assert self.sentinel.config is not None
        self.sentinel.process = subprocess.Popen(
            [self.sentinel.binary, self.sentinel.config, "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.sentinel.port)
        # the sentinel reached the master over TLS (its INFO reply gave it the role)
        _wait_for(
            lambda: "role-reported\nmaster" in self.ask_sentinel("SENTINEL", "MASTER", SERVICE),
            timeout=10,
        )
        return self

    def ask_sentinel(self, *args: str) -> str:
        return _tls_cli(self.sentinel.port, self.certificates, *args)

    @property
    def url(self) -> str:
        return f"rediss+sentinel://127.0.0.1:{self.sentinel.port}/{SERVICE}/0"

    def cleanup(self) -> None:
        self.sentinel.cleanup()
        self.master.cleanup()


@pytest.fixture
def tls_sentinel(tmp_path: Path) -> Iterator[TLSSentinel]:
    deployment = TLSSentinel(tmp_path)
    try:
        yield deployment.start()
    finally:
        deployment.cleanup()


@pytest_twisted.async_yield_fixture
async def tls_connection(tls_sentinel: TLSSentinel) -> AsyncIterator[Any]:
    address = parse_redis_url(tls_sentinel.url)
    assert isinstance(address, SentinelAddress) and address.tls
    connection = lazy_connection(address, reply_timeout=2.0)
    try:
        yield connection
    finally:
        await connection.disconnect()


@pytest.mark.timeout(20)
@pytest_twisted.ensureDeferred
async def test_stream_round_trip_through_a_tls_sentinel(
    tls_sentinel: TLSSentinel, tls_connection: Any
) -> None:
    """The sentinel is asked over TLS, names the master, the connection to the master is
    TLS, and an XADD is read back by XRANGE (and seen by redis-cli over TLS)."""
    # the lazy connection queues the command until its first connection is up
    entry_id = await tls_connection.execute_command(
        "XADD", STREAM, "*", "imei", "356307042441013", "payload", "tls"
    ).addTimeout(10, reactor)
    assert tls_connection.master() == ("127.0.0.1", tls_sentinel.master_port)
    entries = await tls_connection.execute_command("XRANGE", STREAM, "-", "+")
    assert entries == [[entry_id, ["imei", "356307042441013", "payload", "tls"]]]
    assert _tls_cli(tls_sentinel.master_port, tls_sentinel.certificates, "XLEN", STREAM) == "1\n"


@pytest.mark.timeout(20)
@pytest_twisted.ensureDeferred
async def test_teltonika_send_through_a_tls_sentinel(tls_sentinel: TLSSentinel) -> None:
    """``teltonika send --redis rediss+sentinel://...`` (a separate process) reaches the
    master over TLS: it finds no server registered for the IMEI there and says so
    (``device_not_connected``), which it can only learn from Redis."""
    env = checkout_env()
    out, err, code = await getProcessOutputAndValue(
        sys.executable,
        ["-m", "teltonika", "send", "--redis", tls_sentinel.url, "490154203237518", "getinfo"],
        env=env,
        path=str(REPO),
        reactor=reactor,
    )
    assert code == 1 and out == b"", err
    assert b"failed: device_not_connected" in err, err

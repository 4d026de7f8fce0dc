"""A Redis as a careful production runs it, for the tests: TLS only (a private CA), the
README's ACL user, the default user off. Certificates are made here with ``cryptography``."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from worker.cli.embedded import free_port

REPO = Path(__file__).resolve().parents[2]
#: The product's ACL user, as the README names it.
ACL_USER = "apsis-export"
#: Seconds a started redis-server has to answer.
START_TIMEOUT = 10.0


def readme_acl_line() -> str:
    """The README's ``ACL SETUSER`` line, so the tests grant exactly what it documents."""
    found = re.findall(r"^ACL SETUSER apsis-export .*$", (REPO / "README.md").read_text(), re.M)
    assert len(found) == 1, "the README documents one ACL SETUSER line for apsis-export"
    return found[0]


def acl_args(line: str, password: str) -> list[str]:
    """The ACL SETUSER line's arguments, with its password placeholder filled in."""
    return [f">{password}" if arg == ">PASSWORD" else arg for arg in line.split()[3:]]


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path


def _issue(
    directory: Path,
    stem: str,
    *,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    server: bool = False,
) -> tuple[Pem, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(f"apsis-test {stem}"))
        .issuer_name(issuer[0].subject if issuer else _name(f"apsis-test {stem}"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
    else:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), False)
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    pem = Pem(directory / f"{stem}.crt", directory / f"{stem}.key")
    pem.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(pem.key, 0o600)
    return pem, cert, key


@dataclass(frozen=True)
class Certificates:
    ca: Pem
    server: Pem
    client: Pem
    #: A CA that signed nothing here: Redis's certificate does not verify against it.
    other_ca: Pem


def make_certificates(directory: Path) -> Certificates:
    ca, ca_cert, ca_key = _issue(directory, "ca", issuer=None)
    server, _, _ = _issue(directory, "server", issuer=(ca_cert, ca_key), server=True)
    client, _, _ = _issue(directory, "client", issuer=(ca_cert, ca_key))
    other, _, _ = _issue(directory, "other-ca", issuer=None)
    return Certificates(ca=ca, server=server, client=client, other_ca=other)


class TlsAclRedis:
    """redis-server on a TLS port only, with the README's ACL user (and a ``test-admin`` user
    the tests flush with), the default user off. ``stop()`` ends it."""

    def __init__(
        self,
        directory: Path,
        certs: Certificates,
        *,
        auth_clients: str,
        extra: tuple[str, ...] | list[str] = (),
    ) -> None:
        """``extra``: ACL rules added after the README's line (another queue's keys)."""
        self._extra = list(extra)
        self.directory = directory
        self.certs = certs
        self.port = free_port()
        self.password = secrets.token_urlsafe(24)
        self.admin_password = secrets.token_urlsafe(24)
        args = [
            "redis-server",
            "--bind", "127.0.0.1",
            "--port", "0",
            "--tls-port", str(self.port),
            "--tls-cert-file", str(certs.server.cert),
            "--tls-key-file", str(certs.server.key),
            "--tls-ca-cert-file", str(certs.ca.cert),
            "--tls-auth-clients", auth_clients,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(directory),
            "--logfile", str(directory / f"redis-{self.port}.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            self._set_up_users()
        except BaseException:
            self.stop()
            raise

    def url(self, *, user: str = ACL_USER, password: str | None = None, query: bool = True) -> str:
        """rediss://user:password@127.0.0.1:port/0, with the CA in the query if ``query``."""
        secret = self.password if password is None else password
        tail = f"?ssl_cert_reqs=required&ssl_ca_certs={quote(str(self.certs.ca.cert))}"
        base = f"rediss://{quote(user)}:{quote(secret)}@127.0.0.1:{self.port}/0"
        return base + (tail if query else "")

    @property
    def admin_url(self) -> str:
        return self.url(user="test-admin", password=self.admin_password)

    def tls_kwargs(self) -> dict[str, Any]:
        return {
            "ssl_ca_certs": str(self.certs.ca.cert),
            "ssl_certfile": str(self.certs.client.cert),
            "ssl_keyfile": str(self.certs.client.key),
        }

    def _set_up_users(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        admin = redis.Redis(
            host="127.0.0.1", port=self.port, ssl=True, socket_timeout=5, **self.tls_kwargs()
        )
        try:
            while True:
                try:
                    admin.ping()
                    break
                except redis.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            admin.execute_command(
                "ACL",
                "SETUSER",
                ACL_USER,
                *acl_args(readme_acl_line(), self.password),
                *self._extra,
            )
            admin.execute_command(
                "ACL", "SETUSER", "test-admin", "on", f">{self.admin_password}", "~*", "&*", "+@all"
            )
            admin.execute_command("ACL", "SETUSER", "default", "off")
        finally:
            admin.close()

    def add_user(self, name: str, args: list[str]) -> str:
        """Another ACL user (ACL SETUSER name ...args); its URL, CA in the query."""
        password = secrets.token_urlsafe(24)
        admin = redis.Redis.from_url(self.admin_url)
        try:
            admin.execute_command("ACL", "SETUSER", name, "reset", *args, f">{password}")
        finally:
            admin.close()
        return self.url(user=name, password=password)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=START_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

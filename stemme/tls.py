"""TLS for the server: an operator's certificate, or a self-signed one made and cached for LAN demos.

Browsers give a page microphone access only in a secure context (https, or http on localhost), so a page served
to another machine of the LAN needs TLS. ``stemme serve --self-signed`` makes an ECDSA P-256 certificate for
localhost, the loopback addresses, this host's name and any ``--self-signed-host`` given, keeps it under
``$STEMME_HOME/tls/`` (key mode 0600) and reuses it until it nears expiry or a name is missing. Browsers warn
about it; production uses a certificate of the organisation's own CA (``--ssl-certfile``/``--ssl-keyfile``)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

VALID_DAYS = 365
RENEW_BEFORE_DAYS = 30


@dataclass(frozen=True)
class TlsFiles:
    certfile: Path
    keyfile: Path


def default_hosts() -> list[str]:
    """Names a LAN demo is reached by: localhost, loopback, and this machine's host name (no name lookup: that
    would be a DNS query, and Stemme makes none; other names come from ``--self-signed-host``)."""
    names = {"localhost", "127.0.0.1", "::1", socket.gethostname()}
    return sorted(n for n in names if n)


def _san(hosts: list[str]) -> list:
    from cryptography import x509

    out: list = []
    for h in hosts:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            out.append(x509.DNSName(h))
    return out


def _cert_names(path: Path) -> tuple[set[str], dt.datetime] | None:
    """The names a cached certificate covers and when it expires; None when it cannot be read."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return None
    names = {str(n) for n in san.get_values_for_type(x509.DNSName)}
    names |= {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    return names, cert.not_valid_after_utc


def _make(files: TlsFiles, hosts: list[str]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Stemme self-signed ({hosts[0]})")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(_san(hosts)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    files.keyfile.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(files.keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    files.certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def self_signed(home: Path, extra_hosts: list[str] | None = None) -> TlsFiles:
    """The cached self-signed certificate under ``home/tls``, made (again) when missing, expiring within
    RENEW_BEFORE_DAYS, or not covering every wanted name."""
    hosts = list(dict.fromkeys([*(extra_hosts or []), *default_hosts()]))
    files = TlsFiles(home / "tls" / "self-signed.crt", home / "tls" / "self-signed.key")
    cached = _cert_names(files.certfile) if files.keyfile.exists() else None
    soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=RENEW_BEFORE_DAYS)
    if cached is None or not set(hosts) <= cached[0] or cached[1] < soon:
        _make(files, hosts)
        logger.info("made a self-signed certificate for %s at %s", ", ".join(hosts), files.certfile)
    return files

"""The self-signed certificate for LAN demos: made once, cached, covering the names asked for, key kept private."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

from cryptography import x509

from stemme import tls


def _names(cert: Path) -> set[str]:
    c = x509.load_pem_x509_certificate(cert.read_bytes())
    san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(n) for n in san.get_values_for_type(x509.DNSName)} | {
        str(a) for a in san.get_values_for_type(x509.IPAddress)}


def test_self_signed_is_made_once_and_covers_the_names(tmp_path: Path) -> None:
    files = tls.self_signed(tmp_path, ["stemme.lan"])
    names = _names(files.certfile)
    assert {"stemme.lan", "localhost", "127.0.0.1", "::1"} <= names
    assert stat.S_IMODE(files.keyfile.stat().st_mode) == 0o600
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(files.certfile, files.keyfile)  # the pair matches and loads as a server context
    before = files.certfile.read_bytes()
    assert tls.self_signed(tmp_path, ["stemme.lan"]).certfile.read_bytes() == before  # cached
    tls.self_signed(tmp_path, ["other.lan"])  # a new name: made again
    assert "other.lan" in _names(files.certfile) and files.certfile.read_bytes() != before


def test_a_damaged_cache_is_replaced(tmp_path: Path) -> None:
    files = tls.self_signed(tmp_path)
    files.certfile.write_text("not a certificate")
    tls.self_signed(tmp_path)
    assert "localhost" in _names(files.certfile)

"""TLS in one place: the master's CA and server certificate, fingerprints, client contexts."""

from __future__ import annotations

import binascii
import datetime as dt
import functools
import hashlib
import ipaddress
import re
import ssl
from pathlib import Path
from typing import Any

__all__ = [
    "ca_fingerprint",
    "csr_names",
    "make_csr",
    "norm_name",
    "split_certs",
    "sign_csr",
    "single_cert_pem",
    "client_context",
    "issue_server_cert",
    "make_ca",
]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def make_ca(common_name: str = "zy master CA") -> tuple[bytes, bytes]:
    """A new self-signed CA; returns (cert PEM, key PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def issue_server_cert(ca_cert_pem: bytes, ca_key_pem: bytes, names: list[str]) -> tuple[bytes, bytes]:
    """A server certificate signed by the CA, valid for every DNS name or IP in ``names``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return _issue(ca_cert_pem, ca_key_pem, names, key.public_key()), key_pem


def _issue(ca_cert_pem: bytes, ca_key_pem: bytes, names: list[str], public_key: Any) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    sans = _sans(names)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return cert.public_bytes(serialization.Encoding.PEM)


_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.S)


def single_cert_pem(pem: bytes | str) -> bytes:
    """The one certificate in ``pem``, re-encoded. Refuses bundles, other blocks and trailing
    bytes (strict base64), so what is pinned is exactly what will be trusted. Standard library
    only: the agent must not need more to enroll."""
    data = pem.encode() if isinstance(pem, str) else pem
    blocks = _PEM_CERT.findall(data)
    if len(blocks) != 1:
        raise ValueError(f"expected exactly one certificate, got {len(blocks)}")
    if _PEM_CERT.sub(b"", data).strip():
        raise ValueError("unexpected data around the certificate")
    try:
        der = binascii.a2b_base64(b"".join(blocks[0].split()), strict_mode=True)
    except binascii.Error as exc:
        raise ValueError(f"certificate is not valid base64: {exc}") from None
    return ssl.DER_cert_to_PEM_cert(der).encode()


def _sans(names: list[str]) -> list[Any]:
    """subjectAltName entries: IP addresses as such, everything else as DNS names."""
    from cryptography import x509

    out: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def make_csr(names: list[str]) -> tuple[bytes, bytes]:
    """A new key and a certificate signing request for ``names`` (a proxy asks the master's CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    sans = _sans(names)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
           .add_extension(x509.SubjectAlternativeName(sans), critical=False)
           .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return csr.public_bytes(serialization.Encoding.PEM), key_pem


def norm_name(name: str) -> str:
    """A host name as certificates compare it: IP addresses in their canonical form, DNS names
    lower-case without a trailing dot."""
    try:
        return str(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        return name.lower().rstrip(".")


def csr_names(csr_pem: bytes) -> list[str]:
    """The hosts (subjectAltName) a CSR asks for, after checking its signature."""
    from cryptography import x509

    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise ValueError("the CSR is not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise ValueError("the CSR's signature does not verify")
    try:
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ValueError("the CSR names no host (subjectAltName)") from None
    return [str(n.value) for n in sans]


def sign_csr(ca_cert_pem: bytes, ca_key_pem: bytes, csr_pem: bytes,
             allowed: list[str] | None = None) -> bytes:
    """A server certificate for the names a CSR asks for, signed by the CA. With ``allowed``,
    a CSR asking for any other name is refused (ValueError naming them): the CA signs only
    what the admin let this requester have."""
    from cryptography import x509

    names = csr_names(csr_pem)
    if allowed is not None:
        permitted = {norm_name(n) for n in allowed}
        extra = [n for n in names if norm_name(n) not in permitted]
        if extra:
            raise ValueError(f"the CSR asks for {', '.join(extra)}, which this token does not allow "
                             f"(allowed: {', '.join(allowed) or 'none'})")
    return _issue(ca_cert_pem, ca_key_pem, names, x509.load_pem_x509_csr(csr_pem).public_key())


def split_certs(pem: bytes | str) -> list[bytes]:
    """Every certificate in a PEM bundle, each re-encoded strictly (see ``single_cert_pem``);
    anything else in the bundle is refused."""
    data = pem.encode() if isinstance(pem, str) else pem
    blocks = _PEM_CERT.findall(data)
    if not blocks:
        raise ValueError("expected a certificate, got none")
    if _PEM_CERT.sub(b"", data).strip():
        raise ValueError("unexpected data around the certificates")
    return [single_cert_pem(b"-----BEGIN CERTIFICATE-----" + b + b"-----END CERTIFICATE-----") for b in blocks]


def ca_fingerprint(ca_pem: bytes | str) -> str:
    """``sha256:<hex>`` of the one certificate's DER bytes: what a join token pins."""
    der = ssl.PEM_cert_to_DER_cert(single_cert_pem(ca_pem).decode())  # strict, see above
    return "sha256:" + hashlib.sha256(der).hexdigest()


@functools.lru_cache(maxsize=8)
def shared_client_context(ca_pem: bytes, http2: bool = True) -> ssl.SSLContext:
    """One context per pinned CA, reused by every reconnect (and by every agent of a swarm):
    building one parses the CA and costs far more than the connection it serves."""
    return client_context(ca_pem, http2=http2)


def client_context(ca: Path | str | bytes | None, http2: bool = True) -> ssl.SSLContext:
    """A verifying client context trusting only ``ca`` (a path or PEM bytes); system CAs if None."""
    if ca is None:
        ctx = ssl.create_default_context()
    elif isinstance(ca, bytes):
        ctx = ssl.create_default_context(cadata=ca.decode())
    else:
        ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["h2", "http/1.1"] if http2 else ["http/1.1"])
    return ctx

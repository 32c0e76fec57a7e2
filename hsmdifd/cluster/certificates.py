"""The cluster CA, derived from the cluster secret, and the certificates it issues.

Every device computes the same CA key from the secret (HKDF-SHA256, info "hsmdif cluster
ca v1") and the same CA certificate (fixed fields, RFC 6979 signature); see tls.py for
the scheme and its reasons.
"""

from __future__ import annotations

import datetime
import hashlib

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_NAME = "hsmdif cluster CA"
URI_PREFIX = "hsmdif:node:"
_CA_INFO = b"hsmdif cluster ca v1"
# The P-256 group order: the CA scalar is reduced into [1, n - 1].
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
# Fixed so that every device builds the same CA certificate but for its signature.
_CA_NOT_BEFORE = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)
_CA_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)
_CERT_LIFETIME = datetime.timedelta(days=3650)
_RENEW_BEFORE = datetime.timedelta(days=365)
# A device whose clock runs behind still accepts a fresh certificate of another.
_CLOCK_SKEW = datetime.timedelta(days=2)


def ca_private_key(secret: bytes) -> ec.EllipticCurvePrivateKey:
    """The cluster CA's key: the same on every device holding `secret`."""
    if not secret:
        raise ValueError("the cluster secret is empty")
    # 384 bits reduced modulo a 256-bit order: the bias is below 2^-128.
    okm = HKDF(algorithm=hashes.SHA256(), length=48, salt=None, info=_CA_INFO).derive(secret)
    scalar = int.from_bytes(okm, "big") % (_P256_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


def ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    public = key.public_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    serial = int.from_bytes(hashlib.sha256(public_der(public)).digest()[:16], "big") >> 1
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(serial or 1)
        .not_valid_before(_CA_NOT_BEFORE)
        .not_valid_after(_CA_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(ca=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        # RFC 6979: the same bytes on every device, and from one start to the next.
        .sign(key, hashes.SHA256(), ecdsa_deterministic=True)
    )


def public_der(public: ec.EllipticCurvePublicKey) -> bytes:
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def device_certificate(
    node_id: str,
    dns_name: str,
    public: ec.EllipticCurvePublicKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + _CERT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(ca=False),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(dns_name),
                    x509.UniformResourceIdentifier(URI_PREFIX + node_id),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def is_current(
    cert: x509.Certificate,
    node_id: str,
    public: ec.EllipticCurvePublicKey,
    ca_cert: x509.Certificate,
) -> bool:
    """Whether `cert` is for `public` and `node_id`, signed by `ca_cert`, not near its end."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    if public_der(public) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        return False
    now = datetime.datetime.now(datetime.timezone.utc)
    return common_name(cert) == node_id and cert.not_valid_after_utc - now > _RENEW_BEFORE


def common_name(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else None
    return value if isinstance(value, str) else None


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates; a device signs its TLS handshakes."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )

"""A throwaway certificate authority for labs and tests (the ``cryptography`` package):
a CA, server certificates for IP addresses, client certificates for names. Every key is
written mode 0600; nothing here is meant to outlive the lab that made it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertPaths", "LabCA"]

VALIDITY = datetime.timedelta(days=2)  # a lab lives hours


@dataclass(frozen=True)
class CertPaths:
    cert: str
    key: str


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


class LabCA:
    """A CA under ``directory`` (``ca.pem``, ``ca.key``); :meth:`issue` signs leaf
    certificates beside it."""

    def __init__(self, directory: str | os.PathLike[str], name: str = "lb lab CA") -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.ca_path = str(self.dir / "ca.pem")
        (self.dir / "ca.pem").write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        _write_key(self.dir / "ca.key", self.key)

    def issue(self, name: str, ips: list[str] = (), server: bool = False) -> CertPaths:  # type: ignore[assignment]
        """``name``.pem / ``name``.key: CN ``name``, valid for ``ips`` (subject alternative
        names); a client certificate, or with ``server`` a server (and client) one."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        # a server certificate may serve as a client one too (etcd's gateway dials etcd with it)
        usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if server \
            else [ExtendedKeyUsageOID.CLIENT_AUTH]
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
             .issuer_name(self.cert.subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage(usage), critical=False))
        if ips:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(a)) for a in ips]),
                                critical=False)
        cert = b.sign(self.key, hashes.SHA256())
        paths = CertPaths(str(self.dir / f"{name}.pem"), str(self.dir / f"{name}.key"))
        Path(paths.cert).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(Path(paths.key), key)
        return paths

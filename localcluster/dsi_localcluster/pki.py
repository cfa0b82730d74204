"""Certificates, service-account signing keys and the admin kubeconfig.

One self-signed CA signs the API server's serving certificate and an admin client
certificate in group system:masters. The service-account key pair lets the API server issue
tokens (TokenRequest, projected volumes), which ServiceAccount impersonation and in-cluster
clients rely on.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
from collections.abc import Sequence
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = dt.timedelta(days=3650)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _issue(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate | None,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    is_ca: bool = False,
    server_sans: list[str] | None = None,
    client: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject if ca_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=True,
                key_cert_sign=False,
                crl_sign=False,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [ExtendedKeyUsageOID.SERVER_AUTH]
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if server_sans:
        names: list[x509.GeneralName] = []
        for san in server_sans:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(san)))
            except ValueError:
                names.append(x509.DNSName(san))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def service_ip(cidr: str) -> str:
    """The first address of the service range: the `kubernetes` Service's ClusterIP."""
    net = ipaddress.ip_network(cidr, strict=False)
    return str(net.network_address + 1)


def generate(pki_dir: Path, service_cidr: str, host: str, extra_ips: Sequence[str] = ()) -> None:
    """Write ca, apiserver serving, admin client and service-account keys into pki_dir;
    ``extra_ips`` are further addresses the API server is reached at (the pods' gateway)."""
    pki_dir.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca = _issue(_name("dsi-localcluster-ca"), ca_key, None, ca_key, is_ca=True)
    files: dict[str, bytes] = {"ca.crt": _pem_cert(ca), "ca.key": _pem_key(ca_key)}

    sans = [
        host,
        *extra_ips,
        "localhost",
        service_ip(service_cidr),
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ]
    api_key = _key()
    files["apiserver.crt"] = _pem_cert(
        _issue(_name("kube-apiserver"), api_key, ca, ca_key, server_sans=sans)
    )
    files["apiserver.key"] = _pem_key(api_key)

    admin_key = _key()
    files["admin.crt"] = _pem_cert(
        _issue(_name("dsi-admin", "system:masters"), admin_key, ca, ca_key, client=True)
    )
    files["admin.key"] = _pem_key(admin_key)

    sa_key = _key()
    files["sa.key"] = _pem_key(sa_key)
    files["sa.pub"] = sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    for name, data in files.items():
        path = pki_dir / name
        path.write_bytes(data)
        path.chmod(0o600)


def kubeconfig(pki_dir: Path, server: str, name: str = "dsi-local") -> str:
    """An admin kubeconfig (system:masters) with the certificates embedded."""

    def b64(fname: str) -> str:
        return base64.b64encode((pki_dir / fname).read_bytes()).decode()

    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": name,
                "cluster": {"server": server, "certificate-authority-data": b64("ca.crt")},
            }
        ],
        "users": [
            {
                "name": f"{name}-admin",
                "user": {
                    "client-certificate-data": b64("admin.crt"),
                    "client-key-data": b64("admin.key"),
                },
            }
        ],
        "contexts": [
            {
                "name": name,
                "context": {"cluster": name, "user": f"{name}-admin", "namespace": "default"},
            }
        ],
        "current-context": name,
        "preferences": {},
    }
    return yaml.safe_dump(doc, sort_keys=False)

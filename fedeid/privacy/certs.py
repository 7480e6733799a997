"""Transport security for a deployment: a CA, the SuperLink's TLS certificate, SuperNode keys.

``fedeid certs --out certs/ --nodes 3`` writes::

    certs/ca.crt, ca.key                 the federation's certificate authority (keep ca.key offline)
    certs/server.pem, server.key         the SuperLink's certificate (signed by the CA) and key
    certs/supernode-<i>, supernode-<i>.pub   one ECDSA P-384 key pair per hospital, OpenSSH format

The SuperLink is started with ``--ssl-ca-certfile ca.crt --ssl-certfile server.pem
--ssl-keyfile server.key``; each SuperNode with ``--root-certificates ca.crt`` and, for
SuperNode authentication, ``--auth-supernode-private-key supernode-<i>``; its ``.pub`` is
registered once with ``flwr supernode register supernode-<i>.pub <connection>``. Flower
accepts NIST curves only for SuperNode keys (Ed25519 is refused), hence P-384.

``fedeid deploy`` (:mod:`fedeid.federated.perimeter`) builds a whole deployment on these: the
same files, handed out per party, plus the Fleet-only proxy, the start scripts and site configs.

Private keys are written with mode 0600. Everything is produced with the ``cryptography``
package; no ``openssl`` binary is needed.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedeid.io import InputError, atomic_write_bytes

DEFAULT_HOSTS: tuple[str, ...] = ("127.0.0.1", "::1", "localhost")


@dataclass
class CertBundle:
    """Paths of everything :func:`create_certificates` wrote."""

    out_dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: list[Path] = field(default_factory=list)  # private keys (OpenSSH)

    @property
    def node_public_keys(self) -> list[Path]:
        return [p.with_name(p.name + ".pub") for p in self.node_keys]

    def to_dict(self) -> dict[str, object]:
        return {
            "ca_cert": str(self.ca_cert),
            "server_cert": str(self.server_cert),
            "server_key": str(self.server_key),
            "supernode_private_keys": [str(p) for p in self.node_keys],
            "supernode_public_keys": [str(p) for p in self.node_public_keys],
        }


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _write_private(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data, private=True)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(hosts: tuple[str, ...] | list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_ca(common_name: str = "fedeid federation CA", days: int = 3650
            ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedeid")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                          crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                     hosts: tuple[str, ...] | list[str] = DEFAULT_HOSTS, days: int = 825
                     ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate for the SuperLink whose SAN lists ``hosts`` (IPs and DNS names)."""
    if not hosts:
        raise ValueError("the SuperLink certificate needs at least one host name or IP")
    key = ec.generate_private_key(ec.SECP384R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0]),
                                 x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedeid")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=True, key_cert_sign=False,
                          crl_sign=False, encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_supernode_key(path: str | os.PathLike[str], comment: str = "") -> tuple[Path, Path]:
    """Write an ECDSA P-384 key pair in OpenSSH format: ``path`` (private, 0600) and ``path.pub``."""
    priv_path = Path(path)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(priv_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if comment:
        pub += b" " + comment.encode()
    pub_path = priv_path.with_name(priv_path.name + ".pub")
    atomic_write_bytes(pub_path, pub + b"\n")
    return priv_path, pub_path


def create_certificates(out_dir: str | os.PathLike[str], n_nodes: int = 3,
                        hosts: tuple[str, ...] | list[str] = DEFAULT_HOSTS,
                        node_names: list[str] | None = None, overwrite: bool = False) -> CertBundle:
    """Create the CA, the SuperLink certificate and one SuperNode key pair per hospital."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if n_nodes < 0:
        raise ValueError("--nodes must be >= 0")
    names = node_names or [f"supernode-{i}" for i in range(n_nodes)]
    bundle = CertBundle(out, out / "ca.crt", out / "ca.key", out / "server.pem", out / "server.key",
                        [out / n for n in names])
    existing = [p for p in (bundle.ca_cert, bundle.ca_key, bundle.server_cert, bundle.server_key,
                            *bundle.node_keys) if p.exists()]
    if existing and not overwrite:
        raise InputError(existing[0], "already exists (use --force to replace the whole set)")
    ca_key, ca_cert = make_ca()
    srv_key, srv_cert = make_server_cert(ca_key, ca_cert, list(hosts))
    _write_private(bundle.ca_key, _pem_key(ca_key))
    atomic_write_bytes(bundle.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(bundle.server_key, _pem_key(srv_key))
    atomic_write_bytes(bundle.server_cert, srv_cert.public_bytes(serialization.Encoding.PEM))
    for path, name in zip(bundle.node_keys, names):
        make_supernode_key(path, comment=name)
    return bundle

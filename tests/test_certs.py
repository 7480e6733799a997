"""`fedeid certs`: a CA, a SuperLink certificate valid for loopback, P-384 OpenSSH SuperNode keys."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedeid.io import InputError
from fedeid.privacy.certs import create_certificates


def test_certificates_chain_and_keys(tmp_path):
    b = create_certificates(tmp_path / "certs", n_nodes=2, hosts=["127.0.0.1", "localhost", "link.example"])
    ca = x509.load_pem_x509_certificate(b.ca_cert.read_bytes())
    srv = x509.load_pem_x509_certificate(b.server_cert.read_bytes())
    # the server certificate is signed by the CA and names the loopback address
    srv.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not srv.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert {"localhost", "link.example"} <= set(san.get_values_for_type(x509.DNSName))
    # the server key matches the certificate
    key = serialization.load_pem_private_key(b.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == srv.public_key().public_numbers()
    # SuperNode keys: ECDSA on a NIST curve, OpenSSH format (what flower-supernode loads)
    assert len(b.node_keys) == 2
    for priv_path, pub_path in zip(b.node_keys, b.node_public_keys):
        priv = serialization.load_ssh_private_key(priv_path.read_bytes(), None)
        pub = serialization.load_ssh_public_key(pub_path.read_bytes())
        assert isinstance(priv, ec.EllipticCurvePrivateKey) and isinstance(priv.curve, ec.SECP384R1)
        assert priv.public_key().public_numbers() == pub.public_numbers()
        assert stat.S_IMODE(priv_path.stat().st_mode) == 0o600
    for p in (b.ca_key, b.server_key):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600


def test_refuses_to_overwrite(tmp_path):
    create_certificates(tmp_path, n_nodes=1)
    with pytest.raises(InputError):
        create_certificates(tmp_path, n_nodes=1)
    create_certificates(tmp_path, n_nodes=1, overwrite=True)


def test_cli_certs(tmp_path, capsys):
    from fedeid.federated.commands import certs_command
    import argparse

    ns = argparse.Namespace(out=str(tmp_path / "c"), nodes=3, host=["127.0.0.1", "localhost"], force=False)
    assert certs_command(ns) == 0
    assert len(list((tmp_path / "c").glob("supernode-*.pub"))) == 3
    assert "flower-superlink" in capsys.readouterr().out

"""Certificates for the QUIC bridge: a private CA, node certificates, client certificates.

QUIC needs TLS 1.3, and the nodes of a cluster verify each other against one CA of
their own (docs/PROTOCOL.md, "QUIC bridge").  ``write_ca_and_node_cert`` makes it::

    DIR/ca.pem, DIR/ca.key          the CA (kept: a second run adds nodes to it)
    DIR/NAME.pem, DIR/NAME.key      one per node: serverAuth + clientAuth, SANs = hosts

and ``write_client_cert`` a client's (clientAuth only: it can call agents, never act as
a peer).  Keys are ECDSA P-256 (the cheapest handshake in pure-Python TLS), written
with mode 0600; leaves are valid LEAF_VALID_DAYS, the CA CA_VALID_DAYS.

The same with openssl, for a CA kept elsewhere (a node needs its ``NAME.pem`` and
``NAME.key`` and ``ca.pem``)::

    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \\
        -subj /CN=synthesis-ca -keyout ca.key -out ca.pem
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=n1 \\
        -keyout n1.key -out n1.csr
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\nextendedKeyUsage=serverAuth,clientAuth\\n' > n1.ext
    openssl x509 -req -in n1.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 365 \\
        -extfile n1.ext -out n1.pem
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import sys
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALID_DAYS = 3650
LEAF_VALID_DAYS = 365
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
ORGANIZATION = "synthesis"
NODE_UNIT = "node"
CLIENT_UNIT = "client"
# A name becomes a file name: no path separators, no leading dot.
_NAME = re.compile(r"[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,127}")


class CertsError(ValueError):
    """A name or directory that certificates cannot be written for."""


def write_ca_and_node_cert(directory: str | os.PathLike, node_names: Sequence[str],
                           hosts: Sequence[str] = DEFAULT_HOSTS) -> list[Path]:
    """Write (or reuse) the CA in ``directory`` and a certificate per node name,
    valid for ``hosts`` (IP addresses or DNS names).  Returns the files written."""
    root = Path(directory)
    written = _ensure_ca(root)
    ca_cert, ca_key = load_ca(root)
    for name in node_names:
        written += _write_leaf(root, _checked(name), ca_cert, ca_key, NODE_UNIT, hosts,
                               [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    return written


def write_client_cert(directory: str | os.PathLike, name: str) -> list[Path]:
    """Write a client certificate ``name`` signed by the CA in ``directory`` (made
    if missing).  A client with one is named by it (its principal) instead of by
    its address; it is never taken for a peer."""
    root = Path(directory)
    written = _ensure_ca(root)
    ca_cert, ca_key = load_ca(root)
    return written + _write_leaf(root, _checked(name), ca_cert, ca_key, CLIENT_UNIT, (),
                                 [ExtendedKeyUsageOID.CLIENT_AUTH])


def load_ca(directory: str | os.PathLike) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    root = Path(directory)
    cert = x509.load_pem_x509_certificate((root / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((root / "ca.key").read_bytes(), password=None)
    return cert, key


def _checked(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == "ca":
        raise CertsError(f"a certificate name is 1..128 of [A-Za-z0-9._:-], not starting "
                         f"with '.', and not 'ca'; got {name!r}")
    return name


def _ensure_ca(root: Path) -> list[Path]:
    """Make the CA unless both its files exist (then it is reused)."""
    cert_path, key_path = root / "ca.pem", root / "ca.key"
    if cert_path.exists() and key_path.exists():
        return []
    if cert_path.exists() or key_path.exists():
        raise CertsError(f"{root} has only one of ca.pem and ca.key; remove it or add the other")
    root.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                      x509.NameAttribute(NameOID.COMMON_NAME, "synthesis-ca")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (_builder(name, name, key.public_key(), CA_VALID_DAYS)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    _write_private(key_path, _key_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return [cert_path, key_path]


def _write_leaf(root: Path, name: str, ca_cert: x509.Certificate, ca_key, unit: str,
                hosts: Sequence[str], usages: list) -> list[Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (_builder(subject, ca_cert.subject, key.public_key(), LEAF_VALID_DAYS)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(_key_usage(cert_sign=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca_key.public_key()), critical=False))
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [_general_name(host) for host in hosts]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = root / f"{name}.pem", root / f"{name}.key"
    _write_private(key_path, _key_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return [cert_path, key_path]


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks a little apart
            .not_valid_after(now + datetime.timedelta(days=days)))


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not cert_sign, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False,
                         decipher_only=False)


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    """Write a key readable by its owner only, atomically: never a moment at a
    wider mode, never half a file."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a file left from before
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def certs_main(argv: Sequence[str] | None = None) -> int:
    """``synthesis-ctl certs DIR [NAMES...] [--host H]... [--client NAME]...``"""
    parser = argparse.ArgumentParser(
        prog="synthesis-ctl certs",
        description="Write a CA (kept if DIR has one) and node certificates for the "
                    "QUIC bridge, and client certificates.")
    parser.add_argument("directory")
    parser.add_argument("names", nargs="*", help="node names (one certificate each)")
    parser.add_argument("--host", action="append", dest="hosts",
                        help="an IP address or DNS name the node certificates are valid "
                             f"for (repeat; default: {' '.join(DEFAULT_HOSTS)})")
    parser.add_argument("--client", action="append", default=[],
                        help="also write a client certificate with this name (repeat)")
    args = parser.parse_args(argv)
    try:
        written = write_ca_and_node_cert(args.directory, args.names,
                                         args.hosts or DEFAULT_HOSTS)
        for name in args.client:
            written += write_client_cert(args.directory, name)
    except (CertsError, OSError) as exc:
        print(f"synthesis-ctl certs: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0

"""Deployment on Flower's deployment runtime: TLS material, SuperNode keys, command lines.

Pure functions: they write key/certificate files and return command lines and config text;
they start no process (``hfedmoe.deploy_cli`` does, thinly). Facts they rely on (flwr 1.41):

* TLS is server-side: the SuperLink serves one HTTPS port (Fleet, Control and Runtime APIs)
  with ``--ssl-ca-certfile --ssl-certfile --ssl-keyfile``; SuperNodes and the ``flwr`` CLI
  verify it with the CA certificate (``--root-certificates`` / ``root-certificates``). The
  SuperLink's own ServerApp runner connects to ``127.0.0.1:<port>`` with the same CA, so the
  server certificate must name 127.0.0.1 and localhost besides any public host.
* SuperNode authentication (``--enable-supernode-auth``): each SuperNode signs with a NIST EC
  private key in OpenSSH format (``--auth-supernode-private-key``); the SuperLink accepts only
  public keys registered with ``flwr supernode register <key.pub> <connection>`` (OpenSSH
  public key file).

A deployment directory holds, by convention (:class:`Layout`)::

    certs/ca.pem  certs/ca.key  certs/server.pem  certs/server.key
    keys/node-<i>  keys/node-<i>.pub        # one P-384 key pair per SuperNode
    superlink/state.db                        # SuperLink state (--database)
    flwr_home/config.toml                     # FLWR_HOME for `flwr run` / `flwr supernode`

Which file goes where on two machines: docs/deployment.md.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOCAL_HOSTS = ("127.0.0.1", "localhost")  # the SuperLink's own runner connects to these
CONNECTION_NAME = "hfedmoe"                # the connection `flwr run . hfedmoe` uses
SUPERLINK_PORT = 9093                      # default HTTPS port of the SuperLink
SUPERNODE_RUNTIME_PORT = 9094              # default Runtime API port of SuperNode 0 (+ id)
CERT_DAYS = 365


@dataclass(frozen=True)
class Layout:
    """Where the files of one deployment directory live."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "certs" / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "certs" / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "certs" / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "certs" / "server.key"

    def node_key(self, node: int) -> Path:
        """The private key of SuperNode ``node`` (OpenSSH format, mode 0600)."""
        return self.root / "keys" / f"node-{node}"

    def node_public_key(self, node: int) -> Path:
        return self.root / "keys" / f"node-{node}.pub"

    def public_keys(self) -> list[Path]:
        """Every ``keys/node-<i>.pub`` present, in node order."""
        found = (self.root / "keys").glob("node-*.pub")
        return sorted(found, key=lambda p: int(p.name[len("node-"):-len(".pub")]))

    @property
    def database(self) -> Path:
        return self.root / "superlink" / "state.db"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr_home"


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable by the owner only (created 0600, never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_certificates(directory: Path, hosts: Sequence[str] = (), days: int = CERT_DAYS,
                      now: datetime.datetime | None = None) -> Layout:
    """Create a local CA and a server certificate signed by it, for testing and small setups.

    The server certificate names 127.0.0.1, localhost and every entry of ``hosts`` (IP
    addresses or DNS names a SuperNode will dial). Overwrites existing files. Keys: EC P-384.
    """
    layout = Layout(Path(directory))
    now = now or datetime.datetime.now(datetime.timezone.utc)
    valid_from, valid_to = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hfedmoe local CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(valid_from).not_valid_after(valid_to)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    names = list(dict.fromkeys([*LOCAL_HOSTS, *(h.strip() for h in hosts if h.strip())]))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[-1])]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from).not_valid_after(valid_to)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(layout.ca_key, _pem_key(ca_key))
    _write_private(layout.server_key, _pem_key(server_key))
    _write_public(layout.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_public(layout.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    return layout


def make_node_keys(directory: Path, count: int, first: int = 0) -> list[tuple[Path, Path]]:
    """Create P-384 key pairs ``keys/node-<i>`` (private, OpenSSH) and ``keys/node-<i>.pub``
    (OpenSSH public key, what ``flwr supernode register`` takes) for i in first..first+count-1.
    Returns ``[(private, public), ...]``; overwrites existing files of those nodes."""
    if count < 1 or first < 0:
        raise ValueError(f"node keys: count {count} must be >= 1 and first {first} >= 0")
    layout, pairs = Layout(Path(directory)), []
    for node in range(first, first + count):
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH)
        _write_private(layout.node_key(node), private)
        _write_public(layout.node_public_key(node), public + f" hfedmoe-node-{node}\n".encode())
        pairs.append((layout.node_key(node), layout.node_public_key(node)))
    return pairs


def superlink_command(layout: Layout, host: str = "127.0.0.1", port: int = SUPERLINK_PORT,
                      executable: str = "flower-superlink") -> list[str]:
    """``flower-superlink`` with TLS, SuperNode authentication and a state database.

    ``host``: the interface to listen on (``0.0.0.0`` to accept other machines)."""
    return [executable,
            "--ssl-ca-certfile", str(layout.ca_cert.resolve()),
            "--ssl-certfile", str(layout.server_cert.resolve()),
            "--ssl-keyfile", str(layout.server_key.resolve()),
            "--enable-supernode-auth",
            "--database", str(layout.database.resolve()),
            "--isolation", "subprocess",
            "--disable-runtime-dependency-installation",
            "--host", host, "--port", str(port)]


def dial_address(listen_host: str, port: int) -> str:
    """Where a client on the SuperLink's machine dials a SuperLink listening on
    ``listen_host`` (a wildcard address means: on loopback)."""
    host = "127.0.0.1" if listen_host in ("", "0.0.0.0", "::", "[::]") else listen_host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def node_config(partition_id: int, num_partitions: int, budget: str | int | None) -> str:
    """The ``--node-config`` string the ClientApp reads (``partition-id``, ``budget``).

    ``budget`` is any budget spec (``4``, ``"50%"``, ``"phone"``, ...; docs/configuration.md)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition id {partition_id}: expected 0 <= id < {num_partitions} "
                         "(num-partitions)")
    parts = [f"partition-id={partition_id}", f"num-partitions={num_partitions}"]
    if budget is not None and str(budget).strip():
        text = str(budget).strip()
        parts.append(f"budget={text}" if text.isdigit() else f"budget={json.dumps(text)}")
    return " ".join(parts)


def supernode_command(superlink: str, root_certificates: Path, private_key: Path | None,
                      partition_id: int, num_partitions: int, budget: str | int | None,
                      runtime_port: int, executable: str = "flower-supernode",
                      max_wait_seconds: float | None = None) -> list[str]:
    """``flower-supernode`` dialling ``superlink`` (``host:port``) over TLS, signing with
    ``private_key`` (None: no authentication, refused by an auth-enabled SuperLink), serving
    its ClientApp processes on ``127.0.0.1:runtime_port`` (one port per SuperNode on a
    machine). ``max_wait_seconds`` bounds reconnection attempts (None: retry forever)."""
    command = [executable, "--superlink", superlink,
               "--root-certificates", str(Path(root_certificates).resolve())]
    if private_key is not None:
        command += ["--auth-supernode-private-key", str(Path(private_key).resolve())]
    command += ["--node-config", node_config(partition_id, num_partitions, budget),
                "--isolation", "subprocess",
                "--host", "127.0.0.1", "--port", str(runtime_port)]
    if max_wait_seconds is not None:
        command += ["--max-wait-time", str(max_wait_seconds)]
    return command


def connection_toml(address: str, root_certificates: Path,
                    name: str = CONNECTION_NAME) -> str:
    """``$FLWR_HOME/config.toml`` text with one TLS connection ``name`` (the default) to the
    SuperLink at ``address`` (``host:port``), verified with ``root_certificates``."""
    cert = json.dumps(str(Path(root_certificates).resolve()))
    return (f'[superlink]\ndefault = {json.dumps(name)}\n\n'
            f'[superlink.{name}]\naddress = {json.dumps(address)}\n'
            f'root-certificates = {cert}\n')


def register_command(public_key: Path, connection: str = CONNECTION_NAME,
                     executable: str = "flwr") -> list[str]:
    """``flwr supernode register`` of one public key with the SuperLink of ``connection``
    (run with ``FLWR_HOME`` holding that connection; prints JSON with the new node id)."""
    return [executable, "supernode", "register", str(Path(public_key).resolve()), connection,
            "--format", "json"]


def list_nodes_command(connection: str = CONNECTION_NAME,
                       executable: str = "flwr") -> list[str]:
    """``flwr supernode list`` as JSON (node ids and status, e.g. ``online``)."""
    return [executable, "supernode", "list", connection, "--format", "json"]

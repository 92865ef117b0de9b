"""Deployment material checked by independent readers: a real TLS handshake, the key loaders
Flower uses, Flower's own node-config and connection parsers."""

import socket
import ssl
import stat
import threading
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.cli.flower_config import parse_superlink_connection
from flwr.common.config import parse_config_args

from hfedmoe import deploy


def _handshake(layout: deploy.Layout, ca: Path, host: str) -> str:
    """TLS handshake on loopback with the server certificate; "ok" or the verify error."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(layout.server_cert, layout.server_key)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                with server_ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        client_ctx = ssl.create_default_context(cafile=str(ca))
        try:
            with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                    client_ctx.wrap_socket(raw, server_hostname=host):
                return "ok"
        except ssl.SSLCertVerificationError as exc:
            return exc.verify_message
        finally:
            server.join(timeout=10)


def test_server_certificate_verifies_only_against_its_ca_and_names(tmp_path):
    layout = deploy.make_certificates(tmp_path / "a", hosts=["10.1.2.3", "link.example"])
    other = deploy.make_certificates(tmp_path / "b")
    for host in ("127.0.0.1", "localhost", "10.1.2.3", "link.example"):
        assert _handshake(layout, layout.ca_cert, host) == "ok", host
    assert _handshake(layout, other.ca_cert, "127.0.0.1") != "ok"  # another CA: refused
    assert "mismatch" in _handshake(layout, layout.ca_cert, "other.example")
    for key in (layout.ca_key, layout.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_node_keys_are_p384_openssh_pairs(tmp_path):
    pairs = deploy.make_node_keys(tmp_path, 2, first=3)
    assert [p.name for p, _ in pairs] == ["node-3", "node-4"]
    for private, public in pairs:
        key = load_ssh_private_key(private.read_bytes(), None)  # what flower-supernode does
        pub = load_ssh_public_key(public.read_bytes())          # what `flwr supernode register` does
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert key.public_key().public_numbers() == pub.public_numbers()
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert deploy.Layout(tmp_path).public_keys() == [pub for _, pub in pairs]
    with pytest.raises(ValueError):
        deploy.make_node_keys(tmp_path, 0)


@pytest.mark.parametrize("budget, expected", [
    (4, 4), ("4", 4), ("50%", "50%"), ("mem=4GiB:speed=0.5", "mem=4GiB:speed=0.5"),
    ("phone", "phone"), (None, None), ("", None),
])
def test_node_config_reads_back_through_flowers_parser(budget, expected):
    parsed = parse_config_args([deploy.node_config(1, 3, budget)])
    assert parsed.pop("partition-id") == 1 and parsed.pop("num-partitions") == 3
    assert parsed.get("budget") == expected and len(parsed) == (expected is not None)


def test_node_config_rejects_a_partition_outside_the_federation():
    with pytest.raises(ValueError, match="partition id 3"):
        deploy.node_config(3, 3, 4)


def test_commands_keep_tls_and_authentication_on(tmp_path):
    layout = deploy.Layout(tmp_path)
    link = deploy.superlink_command(layout, port=9100)
    assert "--insecure" not in link and "--enable-supernode-auth" in link
    for flag, path in (("--ssl-ca-certfile", layout.ca_cert),
                       ("--ssl-certfile", layout.server_cert),
                       ("--ssl-keyfile", layout.server_key), ("--database", layout.database)):
        assert link[link.index(flag) + 1] == str(path.resolve())
    node = deploy.supernode_command("10.0.0.1:9100", layout.ca_cert, layout.node_key(1), 1, 2,
                                    "50%", runtime_port=9200)
    assert "--insecure" not in node
    assert node[node.index("--root-certificates") + 1] == str(layout.ca_cert.resolve())
    assert node[node.index("--auth-supernode-private-key") + 1] == str(layout.node_key(1).resolve())
    assert node[node.index("--port") + 1] == "9200" and node[node.index("--superlink") + 1] == \
        "10.0.0.1:9100"


def test_connection_entry_is_what_flwr_reads(tmp_path):
    ca = tmp_path / "dir with space" / "ca.pem"
    table = tomllib.loads(deploy.connection_toml("127.0.0.1:9100", ca))
    assert table["superlink"]["default"] == deploy.CONNECTION_NAME
    connection = parse_superlink_connection(table["superlink"][deploy.CONNECTION_NAME],
                                            deploy.CONNECTION_NAME)
    assert connection.address == "127.0.0.1:9100" and not connection.insecure
    assert connection.root_certificates == str(ca.resolve())


@pytest.mark.parametrize("host, expected", [
    ("0.0.0.0", "127.0.0.1:9093"), ("::", "127.0.0.1:9093"), ("127.0.0.1", "127.0.0.1:9093"),
    ("10.0.0.5", "10.0.0.5:9093"), ("::1", "[::1]:9093"), ("link.example", "link.example:9093"),
])
def test_the_operator_dials_the_superlink_where_it_listens(host, expected):
    assert deploy.dial_address(host, 9093) == expected


def test_the_app_bundle_holds_the_code_not_the_results(tmp_path):
    """`flwr run .` bundles the app with Flower's own builder (10 MiB limit). A results folder
    full of run outputs (what `make results` leaves; results/.gitignore, which Flower does not
    read, keeps them out of git) must not go in, nor docs or tests; the app's code must."""
    import io
    import shutil
    import subprocess
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    root = Path(__file__).resolve().parents[2]
    app = tmp_path / "app"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True,
                             check=True).stdout.decode().split("\0")
    for name in filter(None, tracked):
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, app / name)
    outputs = app / "results" / "bbc-0.5" / "hfedmoe" / "seed-0"
    outputs.mkdir(parents=True, exist_ok=True)
    (outputs / "metrics.jsonl").write_bytes(b"{}\n" * (4 * 2**20))  # 12 MiB of run records
    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))).namelist()
    assert "src/hfedmoe/federation/server_app.py" in names
    assert "src/hfedmoe/defaults.toml" in names and "pyproject.toml" in names
    assert not [n for n in names if n.split("/")[0] in ("results", "docs", "tests", "tools")]

"""hfedmoe on Flower's deployment runtime: a real SuperLink (TLS, SuperNode authentication) and
two real SuperNodes on 127.0.0.1, started with `hfedmoe deploy ...`, a 2-round `flwr run`, and
the two ways in that must fail: an unregistered key and a plain-text SuperNode."""

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hfedmoe import deploy
from hfedmoe.deploy_cli import child_env, online_nodes, wait_for_online
from hfedmoe.processes import start, stop, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
HFEDMOE = str(BIN / "hfedmoe")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _hfedmoe(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([HFEDMOE, "deploy", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes naming ``text`` (Flower's carry our cert paths)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in line and state != "Z":
            found.append(line)
    return found


def _plain_http_refused(port: int) -> bool:
    """A plain-text HTTP request to the SuperLink port gets no HTTP answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        try:
            reply = conn.recv(64)
        except (ConnectionResetError, TimeoutError):
            return True
    return not reply.startswith(b"HTTP/")


@pytest.mark.slow
def test_flwr_run_on_tls_superlink_with_authenticated_supernodes(tmp_path):
    layout = deploy.Layout(tmp_path / "deploy")
    link_port, *node_ports = _free_ports(6)
    env = child_env(tmp_path / "home")
    assert _hfedmoe("certs", "--dir", str(layout.root), env=env).returncode == 0
    # three key pairs; node-2's public key is never registered
    assert _hfedmoe("keys", "--dir", str(layout.root), "--nodes", "3", env=env).returncode == 0
    logs, processes = tmp_path / "logs", []
    try:
        processes.append(start([HFEDMOE, "deploy", "superlink", "--dir", str(layout.root),
                                "--port", str(link_port)], logs / "superlink.log", env))
        wait_for_port("127.0.0.1", link_port, 60, processes[0])
        assert _plain_http_refused(link_port)

        registered = _hfedmoe("register", "--dir", str(layout.root),
                              str(layout.node_public_key(0)), str(layout.node_public_key(1)),
                              env=env)
        assert registered.returncode == 0, registered.stderr
        assert registered.stdout.count("node id") == 2
        address = f"127.0.0.1:{link_port}"
        for node, budget in ((0, "2"), (1, "4")):  # the run config below says 8 for everyone
            processes.append(start(
                [HFEDMOE, "deploy", "supernode", "--dir", str(layout.root), "--superlink",
                 address, "--partition-id", str(node), "--num-partitions", "2",
                 "--budget", budget, "--runtime-port", str(node_ports[node])],
                logs / f"supernode-{node}.log", env))
        # the two that must not get in, run alongside
        rogue = start([HFEDMOE, "deploy", "supernode", "--dir", str(layout.root), "--superlink",
                       address, "--partition-id", "0", "--num-partitions", "2",
                       "--key", str(layout.node_key(2)), "--runtime-port", str(node_ports[2])],
                      logs / "rogue.log", env)
        keyless = start(deploy.supernode_command(address, layout.ca_cert, None, 1, 2, 4,
                                                 node_ports[3], str(BIN / "flower-supernode"),
                                                 max_wait_seconds=10),
                        logs / "keyless.log", child_env(tmp_path / "keyless_home"))
        plain = start(_plain_supernode(address, node_ports[4]), logs / "plain.log",
                      child_env(tmp_path / "plain_home"))
        processes += [rogue, keyless, plain]

        for refused in ("rogue", "keyless", "plain"):  # each exits by itself, none gets an ID
            process = {"rogue": rogue, "keyless": keyless, "plain": plain}[refused]
            assert process.wait(timeout=120) != 0, refused
            text = (logs / f"{refused}.log").read_text()
            assert "could not establish a connection" in text and "SuperNode ID:" not in text
        assert "Failed to activate SuperNode" in (logs / "rogue.log").read_text()
        wait_for_online(layout, 2, 120)
        assert online_nodes(layout) == 2  # the registered two, and nobody else
        assert "activate-node HTTP/1.1\" 412" in (logs / "superlink.log").read_text()

        out = tmp_path / "out"
        overrides = (f'model.name="tiny:qwen2_moe" num-server-rounds=2 data.num-clients=2 '
                     f'data.max-examples=400 budget.experts="8" train.local-steps=2 '
                     f'model.max-length=64 simulation.client-cpus=1 out="{out}"')
        run = subprocess.run(
            [str(BIN / "flwr"), "run", ".", deploy.CONNECTION_NAME, "--run-config", overrides,
             "--stream"],
            cwd=ROOT, env=child_env(layout.flwr_home), capture_output=True, text=True,
            timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["rounds"] == 2
        assert sorted(c["client_id"] for c in summary["clients"]) == [0, 1]
        rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        trained = [r for r in rounds if r["round"] >= 1]
        assert len(trained) == 2
        for record in trained:
            budgets = {c["client_id"]: c["budget_experts"] for c in record["clients"]}
            assert budgets == {0: 2, 1: 4}  # from each SuperNode's node config, not the run's 8
    finally:
        stop(processes)
    assert _processes_mentioning(str(tmp_path)) == []



def _wait_for_text(path: Path, text: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return True
        time.sleep(0.5)
    return False


@pytest.mark.slow
def test_without_auth_or_tls_the_refused_supernodes_get_in(tmp_path):
    """Control for the test above: the same key-less TLS SuperNode is admitted by a TLS
    SuperLink without --enable-supernode-auth, and the same plain-text SuperNode by an
    --insecure SuperLink; so the refusals there come from authentication and TLS.
    (A SuperNode presenting an unregistered key is refused even without the flag.)"""
    layout = deploy.make_certificates(tmp_path / "deploy")
    tls_port, plain_port, *node_ports = _free_ports(4)
    tls_link = deploy.superlink_command(layout, port=tls_port,
                                        executable=str(BIN / "flower-superlink"))
    tls_link.remove("--enable-supernode-auth")
    tls_link[tls_link.index("--database") + 1] = str(tmp_path / "tls.db")
    plain_link = [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                  "--port", str(plain_port), "--disable-runtime-dependency-installation"]
    logs, processes = tmp_path / "logs", []
    try:
        processes.append(start(tls_link, logs / "tls-link.log", child_env(tmp_path / "h1")))
        processes.append(start(plain_link, logs / "plain-link.log", child_env(tmp_path / "h2")))
        wait_for_port("127.0.0.1", tls_port, 60, processes[0])
        wait_for_port("127.0.0.1", plain_port, 60, processes[1])
        processes.append(start(
            deploy.supernode_command(f"127.0.0.1:{tls_port}", layout.ca_cert, None, 0, 2, 2,
                                     node_ports[0], str(BIN / "flower-supernode"),
                                     max_wait_seconds=10),
            logs / "keyless.log", child_env(tmp_path / "h3")))
        processes.append(start(_plain_supernode(f"127.0.0.1:{plain_port}", node_ports[1]),
                               logs / "plain.log", child_env(tmp_path / "h4")))
        assert _wait_for_text(logs / "keyless.log", "SuperNode ID:", 120)
        assert _wait_for_text(logs / "plain.log", "SuperNode ID:", 120)
        assert all(p.poll() is None for p in processes)
    finally:
        stop(processes)
    assert _processes_mentioning(str(tmp_path)) == []


def _plain_supernode(address: str, runtime_port: int) -> list[str]:
    return [str(BIN / "flower-supernode"), "--insecure", "--superlink", address,
            "--node-config", deploy.node_config(1, 2, 4), "--port", str(runtime_port),
            "--max-wait-time", "10"]


def _free_port_run(length: int) -> int:
    """A port p with p..p+length-1 all free on 127.0.0.1 (``deploy local`` uses a run)."""
    for _ in range(50):
        first = _free_ports(1)[0]
        if first + length > 65535:
            continue
        try:
            held = []
            for port in range(first, first + length):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError("no run of free ports")


@pytest.mark.slow
def test_deploy_local_brings_up_a_federation_and_stops_it_on_ctrl_c(tmp_path):
    directory, port = tmp_path / "local", _free_port_run(3)
    demo = start([HFEDMOE, "deploy", "local", "--dir", str(directory), "--nodes", "2",
                  "--budgets", "2,4", "--port", str(port)], tmp_path / "local.log",
                 child_env(tmp_path / "home"))
    try:
        assert _wait_for_text(tmp_path / "local.log", "Ctrl-C stops everything", 240), \
            (tmp_path / "local.log").read_text()[-2000:]
        layout = deploy.Layout(directory)
        assert online_nodes(layout) == 2
        assert "flwr run . hfedmoe" in (tmp_path / "local.log").read_text()
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=90) == 0
        assert _processes_mentioning(str(tmp_path)) == []  # it stopped its own children
    finally:
        stop([demo])


@pytest.mark.parametrize("args, fragment", [
    (["superlink"], "hfedmoe deploy certs"),                      # no certificates yet
    (["supernode", "--partition-id", "0", "--num-partitions", "2"], "hfedmoe deploy certs"),
    (["register"], "hfedmoe deploy superlink"),                   # no connection yet
    (["keys", "--nodes", "0"], "--nodes 0"),
    (["local", "--nodes", "0"], "--nodes 0"),
])
def test_deploy_bad_input_exits_2_with_one_line(tmp_path, args, fragment):
    result = _hfedmoe(*args, "--dir", str(tmp_path / "d"), env=child_env(tmp_path / "home"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert fragment in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_deploy_supernode_rejects_a_partition_outside_the_federation(tmp_path):
    env = child_env(tmp_path / "home")
    directory = str(tmp_path / "d")
    assert _hfedmoe("certs", "--dir", directory, env=env).returncode == 0
    assert _hfedmoe("keys", "--dir", directory, "--nodes", "3", env=env).returncode == 0
    result = _hfedmoe("supernode", "--dir", directory, "--partition-id", "2",
                      "--num-partitions", "2", env=env)
    assert result.returncode == 2 and "partition id 2" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

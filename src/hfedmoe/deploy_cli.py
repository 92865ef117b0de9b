"""``hfedmoe deploy ...``: the thin process layer over :mod:`hfedmoe.deploy`.

``certs``, ``keys`` and ``register`` write files or call ``flwr``; ``superlink`` and
``supernode`` replace this process with the Flower process (Ctrl-C / SIGTERM reach it
directly); ``local`` starts a SuperLink and N SuperNodes on loopback for a demo and stops them
all on Ctrl-C. Step by step: docs/deployment.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from hfedmoe import deploy
from hfedmoe.config import ConfigError
from hfedmoe.processes import start, stop, wait_for_port

BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr of this venv


def add_deploy_parser(commands) -> None:
    """The ``deploy`` command and its subcommands, on the top-level subparsers."""
    dep = commands.add_parser(
        "deploy", help="run on Flower's deployment runtime (TLS, SuperNode authentication)",
        description="Start a SuperLink and SuperNodes as separate processes with TLS and "
                    "SuperNode authentication, then `flwr run` hfedmoe against them. "
                    "Step by step: docs/deployment.md.")
    steps = dep.add_subparsers(dest="deploy", required=True)
    certs = steps.add_parser("certs", help="make a local CA and a server certificate")
    certs.add_argument("--hosts", default="", metavar="H1,H2",
                       help="extra names/IPs of the SuperLink machine (127.0.0.1 and localhost "
                            "are always included)")
    keys = steps.add_parser("keys", help="make P-384 SuperNode key pairs keys/node-<i>[.pub]")
    keys.add_argument("--nodes", type=int, required=True, metavar="N")
    keys.add_argument("--first", type=int, default=0, metavar="I", help="first node id")
    link = steps.add_parser("superlink", help="start the SuperLink (TLS + SuperNode auth)")
    link.add_argument("--host", default="127.0.0.1",
                      help="interface to listen on (0.0.0.0: all; default 127.0.0.1)")
    link.add_argument("--port", type=int, default=deploy.SUPERLINK_PORT)
    reg = steps.add_parser("register", help="register SuperNode public keys with the SuperLink")
    reg.add_argument("public_keys", nargs="*", metavar="KEY.pub",
                     help="public key files (default: every DIR/keys/node-*.pub)")
    node = steps.add_parser("supernode", help="start one SuperNode (one client)")
    node.add_argument("--partition-id", type=int, required=True, metavar="I")
    node.add_argument("--num-partitions", type=int, required=True, metavar="N",
                      help="number of clients; the run's data.num-clients must equal it")
    node.add_argument("--budget", default="", metavar="B",
                      help="this client's budget (e.g. 4, 50%%, phone); default: the run's "
                           "budget.experts entry for this client")
    node.add_argument("--key", metavar="FILE", help="private key (default DIR/keys/node-<I>)")
    node.add_argument("--runtime-port", type=int, metavar="P",
                      help=f"local port for its ClientApps (default {deploy.SUPERNODE_RUNTIME_PORT}"
                           " + I)")
    local = steps.add_parser("local", help="SuperLink + N SuperNodes on loopback (demo)")
    local.add_argument("--nodes", type=int, default=2, metavar="N")
    local.add_argument("--budgets", default="", metavar="B1,B2,...",
                       help="per-node budgets, cycled (default: the run's budget.experts)")
    local.add_argument("--port", type=int, default=deploy.SUPERLINK_PORT,
                       help=f"SuperLink port (default {deploy.SUPERLINK_PORT}); SuperNode i "
                            "serves its ClientApps on port+1+i")
    for step in (certs, keys, link, reg, node, local):
        step.add_argument("--dir", required=True, type=Path, metavar="DIR",
                          help="deployment directory (certs/, keys/, superlink/, flwr_home/)")
    for step in (reg, node):
        step.add_argument("--superlink", metavar="HOST:PORT",
                          help=f"SuperLink address (default 127.0.0.1:{deploy.SUPERLINK_PORT})")


def run_deploy(args: argparse.Namespace) -> int:
    """Run one ``deploy`` subcommand; bad input raises ConfigError (exit 2 in the caller)."""
    layout = deploy.Layout(args.dir.resolve())
    if args.deploy == "certs":
        deploy.make_certificates(layout.root, args.hosts.split(","))
        print(f"CA {layout.ca_cert} (give it to every SuperNode and flwr user); "
              f"server certificate {layout.server_cert}")
        return 0
    if args.deploy == "keys":
        if args.nodes < 1 or args.first < 0:
            raise ConfigError(f"--nodes {args.nodes} must be >= 1 and --first >= 0")
        for private, public in deploy.make_node_keys(layout.root, args.nodes, args.first):
            print(f"{private} (stays on its SuperNode)  {public} (register it)")
        return 0
    if args.deploy == "register":
        keys = [Path(k) for k in args.public_keys] or layout.public_keys()
        for key, node_id in zip(keys, register_keys(layout, keys, args.superlink)):
            print(f"registered {key.name}: node id {node_id}")
        return 0
    if args.deploy == "superlink":
        _require(layout.ca_cert, layout.server_cert, layout.server_key, hint="deploy certs")
        write_connection(layout, deploy.dial_address(args.host, args.port))
        layout.database.parent.mkdir(parents=True, exist_ok=True)
        _exec(deploy.superlink_command(layout, args.host, args.port, _tool("flower-superlink")),
              layout.flwr_home)
    if args.deploy == "supernode":
        key = Path(args.key) if args.key else layout.node_key(args.partition_id)
        _require(layout.ca_cert, hint="deploy certs (or copy ca.pem)")
        _require(key, hint="deploy keys (or copy its key)")
        _exec(_supernode_command(layout, args.superlink, key, args.partition_id,
                                 args.num_partitions, args.budget, args.runtime_port),
              layout.root / f"supernode-{args.partition_id}")
    assert args.deploy == "local", args.deploy
    return run_local(layout, args.nodes, args.budgets, args.port)


def _supernode_command(layout: deploy.Layout, superlink: str | None, key: Path | None,
                       partition_id: int, num_partitions: int, budget: str,
                       runtime_port: int | None) -> list[str]:
    try:
        return deploy.supernode_command(
            superlink or f"127.0.0.1:{deploy.SUPERLINK_PORT}", layout.ca_cert, key,
            partition_id, num_partitions, budget,
            runtime_port or deploy.SUPERNODE_RUNTIME_PORT + partition_id,
            _tool("flower-supernode"))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def run_local(layout: deploy.Layout, nodes: int, budgets: str, port: int) -> int:
    """Certificates and keys (if missing), a SuperLink on ``port``, registered keys and
    ``nodes`` SuperNodes (ClientApp ports port+1..port+nodes) on loopback; print the
    ``flwr run`` command; stop everything on Ctrl-C / SIGTERM."""
    if nodes < 1:
        raise ConfigError(f"--nodes {nodes}: expected an integer >= 1")
    cycle = [b.strip() for b in budgets.split(",")] if budgets.strip() else [""]
    if not layout.ca_cert.exists():
        deploy.make_certificates(layout.root)
    for i in range(nodes):
        if not layout.node_key(i).exists():
            deploy.make_node_keys(layout.root, 1, first=i)
    for sig in (signal.SIGINT, signal.SIGTERM):  # also when started with SIGINT ignored
        signal.signal(sig, _interrupt)
    processes: list[subprocess.Popen] = []
    try:
        _start_local(layout, nodes, cycle, port, processes)
        print(f"SuperLink on 127.0.0.1:{port} with {nodes} SuperNodes online (logs in "
              f"{layout.root / 'logs'}).\nRun from the project directory:\n"
              f"  FLWR_HOME={layout.flwr_home} flwr run . {deploy.CONNECTION_NAME} --stream "
              f"--run-config 'data.num-clients={nodes} out=\"{layout.root / 'out'}\"'\n"
              "Ctrl-C stops everything.", flush=True)
        while all(p.poll() is None for p in processes):
            time.sleep(1)
        print("hfedmoe: a Flower process exited; stopping the rest", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not stop the stop
            signal.signal(sig, signal.SIG_IGN)
        stop(processes)


def _start_local(layout: deploy.Layout, nodes: int, cycle: list[str], port: int,
                 processes: list[subprocess.Popen]) -> None:
    """Start the SuperLink and the SuperNodes, appending each to ``processes`` at once."""
    logs = layout.root / "logs"
    layout.database.parent.mkdir(parents=True, exist_ok=True)
    write_connection(layout, f"127.0.0.1:{port}")
    processes.append(start(deploy.superlink_command(layout, "127.0.0.1", port,
                                                    _tool("flower-superlink")),
                           logs / "superlink.log", child_env(layout.flwr_home)))
    wait_for_port("127.0.0.1", port, 60, processes[0])
    register_keys(layout, [layout.node_public_key(i) for i in range(nodes)], None,
                  already_ok=True)
    for i in range(nodes):
        command = _supernode_command(layout, f"127.0.0.1:{port}", layout.node_key(i), i, nodes,
                                     cycle[i % len(cycle)], port + 1 + i)
        processes.append(start(command, logs / f"supernode-{i}.log",
                               child_env(layout.root / f"supernode-{i}")))
    wait_for_online(layout, nodes, 120)


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


# --- Flower processes and files ----------------------------------------------------------

def _tool(name: str) -> str:
    return str(BIN / name) if (BIN / name).exists() else name


def _require(*paths: Path, hint: str) -> None:
    for path in paths:
        if not path.exists():
            raise ConfigError(f"{path} does not exist; run `hfedmoe {hint}` first")


def child_env(flwr_home: Path) -> dict[str, str]:
    """This environment, offline and quiet, with its own FLWR_HOME and this venv on PATH
    (the SuperLink starts ``flower-superexec`` by name)."""
    from hfedmoe.runner import OFFLINE_ENV

    env = {**OFFLINE_ENV, **os.environ}
    flwr_home.mkdir(parents=True, exist_ok=True)
    env.update(FLWR_HOME=str(flwr_home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    return env


def write_connection(layout: deploy.Layout, address: str) -> Path:
    """Write ``DIR/flwr_home/config.toml`` with the TLS connection ``hfedmoe`` to ``address``."""
    layout.flwr_home.mkdir(parents=True, exist_ok=True)
    path = layout.flwr_home / "config.toml"
    path.write_text(deploy.connection_toml(address, layout.ca_cert))
    return path


def register_keys(layout: deploy.Layout, keys: Sequence[Path], superlink: str | None,
                  already_ok: bool = False) -> list[int | None]:
    """Register each public key with ``flwr supernode register``; returns the node ids
    (None for a key the SuperLink already knew, accepted only if ``already_ok``)."""
    if superlink:
        write_connection(layout, superlink)
    _require(layout.flwr_home / "config.toml", hint="deploy superlink (or pass --superlink)")
    if not keys:
        raise ConfigError(f"no public keys to register in {layout.root / 'keys'}")
    ids: list[int | None] = []
    for key in keys:
        _require(key, hint="deploy keys")
        try:
            done = subprocess.run(deploy.register_command(key, executable=_tool("flwr")),
                                  capture_output=True, text=True, timeout=60,
                                  env=child_env(layout.flwr_home))
        except subprocess.TimeoutExpired:
            raise ConfigError(f"registering {key}: no answer from the SuperLink in 60 s") from None
        reply = _last_json(done.stdout)
        if reply.get("success"):
            ids.append(int(reply["node-id"]))
        elif already_ok and "already" in json.dumps(reply).lower():
            ids.append(None)
        else:
            reason = (reply.get("error-message") or done.stderr or "no reply").strip()
            raise ConfigError(f"registering {key} failed: {reason.splitlines()[-1]}")
    return ids


def _last_json(text: str) -> dict:
    """The JSON object ``flwr ... --format json`` printed (pretty-printed, maybe after logs)."""
    start = text.find("{")
    while start >= 0:
        try:
            return json.JSONDecoder().raw_decode(text, start)[0]
        except ValueError:
            start = text.find("{", start + 1)
    return {}


def online_nodes(layout: deploy.Layout) -> int:
    """How many SuperNodes the SuperLink lists as online (0 when it cannot be asked)."""
    try:
        done = subprocess.run(deploy.list_nodes_command(executable=_tool("flwr")),
                              capture_output=True, text=True, timeout=60,
                              env=child_env(layout.flwr_home))
    except subprocess.TimeoutExpired:
        return 0
    return sum(n.get("status") == "online" for n in _last_json(done.stdout).get("nodes", []))


def wait_for_online(layout: deploy.Layout, count: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while online_nodes(layout) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} SuperNodes online after {seconds:.0f} s")
        time.sleep(1)


def _exec(command: list[str], flwr_home: Path) -> None:
    """Replace this process with ``command`` (signals then reach Flower directly)."""
    env = child_env(flwr_home)
    print(" ".join(command), flush=True)
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:
        raise ConfigError(f"cannot start {command[0]}: {exc.strerror}") from None

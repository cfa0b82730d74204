"""Pod networking of the process-backed nodes: one network namespace and IP per pod.

A Linux bridge on the host holds the gateway address; each pod gets a veth pair whose host
end joins the bridge and whose other end becomes ``eth0`` in the pod's namespace. Pods reach
each other and the host (ip_forward stays off: nothing leaves the machine).

The pod range is 198.18.0.0/16 (RFC 2544, set aside for benchmark networks): it cannot
clash with the host's own private networks, and no traffic to a private range is made.

Needs root and iproute2 (``ip``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

POD_CIDR = "198.18.0.0/16"
BRIDGE = "dsi-br0"
NETNS_PREFIX = "dsi-"
VETH_PREFIX = "dsiv"
NETNS_ETC = Path("/etc/netns")
# Inside a pod, resolver lookups of names not in its hosts file must fail at once: the
# host's nameserver is unreachable from a pod (no forwarding), and each lookup of an
# unknown name would otherwise wait for a timeout (Ray looked up names for 20 s at start).
RESOLV_CONF = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS`` and return the result (raises with ip's message when check)."""
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out


@dataclass(frozen=True)
class PodNet:
    """A pod's network: its namespace name, IP and the host end of its veth."""

    netns: str
    ip: str
    host_veth: str


def netns_name(uid: str) -> str:
    """The namespace name of a pod (also the directory name under /etc/netns)."""
    return NETNS_PREFIX + uid.replace("-", "")[:12]


def kill_netns_processes(netns: str) -> None:
    """SIGKILL every process in the namespace: those that left a container's process group
    still live in it."""
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
    for pid in out.stdout.split():
        subprocess.run(["kill", "-9", pid], capture_output=True)


def netns_dir(netns: str) -> Path:
    """/etc/netns/<netns>: ``ip netns exec`` bind-mounts its hosts and resolv.conf."""
    return NETNS_ETC / netns


def gateway(cidr: str = POD_CIDR) -> str:
    """The bridge's host address: the pods' default gateway, and where they reach the host."""
    return str(ipaddress.ip_network(cidr).network_address + 1)


class Network:
    """The bridge, the IP allocations (persisted under state_dir) and the pod namespaces."""

    def __init__(self, state_dir: Path, cidr: str = POD_CIDR, bridge: str = BRIDGE) -> None:
        self.state_dir = state_dir
        self.net = ipaddress.ip_network(cidr)
        self.bridge = bridge
        self.gateway = gateway(cidr)
        self.alloc_file = state_dir / "pod-ips.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, str]]:
        # Several node agents allocate from one range: a file lock keeps IPs unique.
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / "pod-ips.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            table: dict[str, str] = {}
            if self.alloc_file.exists():
                table = json.loads(self.alloc_file.read_text() or "{}")
            yield table
            self.alloc_file.write_text(json.dumps(table, indent=1, sort_keys=True))

    def ensure_bridge(self) -> str:
        """Create the bridge with the gateway address if missing; return the gateway."""
        # The node agents start together and share one bridge: without the lock two of them
        # both see it missing and the second "ip link add" fails (File exists).
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / "bridge.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if ip("link", "show", self.bridge, check=False).returncode != 0:
                ip("link", "add", self.bridge, "type", "bridge")
            addr = f"{self.gateway}/{self.net.prefixlen}"
            if addr not in ip("-o", "addr", "show", "dev", self.bridge).stdout:
                ip("addr", "add", addr, "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
        return self.gateway

    def _allocate(self, uid: str) -> str:
        with self._locked() as table:
            if uid in table:
                return table[uid]
            used = set(table.values()) | {self.gateway}
            for host in self.net.hosts():
                if str(host) not in used:
                    table[uid] = str(host)
                    return str(host)
        raise RuntimeError(f"pod range {self.net} is exhausted")

    def get(self, uid: str) -> PodNet | None:
        """The pod's network if it was created (and not deleted)."""
        name = netns_name(uid)
        if not Path("/var/run/netns", name).exists():
            return None
        with self._locked() as table:
            addr = table.get(uid)
        return PodNet(name, addr, _veth(uid)) if addr else None

    def create(self, uid: str) -> PodNet:
        """The pod's namespace, veth and IP; idempotent per uid."""
        existing = self.get(uid)
        if existing is not None:
            return existing
        self.ensure_bridge()
        name, host_end, addr = netns_name(uid), _veth(uid), self._allocate(uid)
        self._teardown(uid)  # leftovers of a half-made namespace
        peer = host_end + "p"
        ip("netns", "add", name)
        ip("link", "add", host_end, "type", "veth", "peer", "name", peer)
        ip("link", "set", host_end, "master", self.bridge, "up")
        ip("link", "set", peer, "netns", name)
        ip("-n", name, "link", "set", peer, "name", "eth0")
        ip("-n", name, "addr", "add", f"{addr}/{self.net.prefixlen}", "dev", "eth0")
        ip("-n", name, "link", "set", "eth0", "up")
        ip("-n", name, "link", "set", "lo", "up")
        # With a default route Ray's node-IP detection (a UDP "connect" to a public
        # address, nothing sent) picks eth0; without it Ray would fall back to 127.0.0.1.
        ip("-n", name, "route", "add", "default", "via", self.gateway)
        etc = netns_dir(name)
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(RESOLV_CONF)
        return PodNet(name, addr, host_end)

    def _teardown(self, uid: str) -> None:
        name = netns_name(uid)
        ip("netns", "del", name, check=False)
        ip("link", "del", _veth(uid), check=False)
        _rmtree(netns_dir(name))

    def delete(self, uid: str) -> None:
        """Remove the pod's namespace, veth and /etc/netns entry; free its IP."""
        self._teardown(uid)
        with self._locked() as table:
            table.pop(uid, None)

    def delete_recorded(self) -> list[str]:
        """Remove the namespaces of every pod allocated in this state dir (one cluster's)."""
        with self._locked() as table:
            uids = list(table)
        for uid in uids:
            self.delete(uid)
        return [f"netns {netns_name(u)}" for u in uids]

    def cleanup_all(self) -> list[str]:
        """Remove every pod namespace, veth, the bridge and all allocations."""
        removed = []
        for name in ip("netns", "list", check=False).stdout.split("\n"):
            name = name.split(" ")[0]
            if name.startswith(NETNS_PREFIX):
                ip("netns", "del", name, check=False)
                _rmtree(netns_dir(name))
                removed.append(f"netns {name}")
        for line in ip("-o", "link", "show", check=False).stdout.splitlines():
            dev = line.split(": ")[1].split("@")[0] if ": " in line else ""
            if dev.startswith(VETH_PREFIX):
                ip("link", "del", dev, check=False)
                removed.append(f"veth {dev}")
        if ip("link", "show", self.bridge, check=False).returncode == 0:
            ip("link", "del", self.bridge, check=False)
            removed.append(f"bridge {self.bridge}")
        if NETNS_ETC.is_dir():
            for d in NETNS_ETC.glob(NETNS_PREFIX + "*"):
                _rmtree(d)
        self.alloc_file.unlink(missing_ok=True)
        return removed


def _veth(uid: str) -> str:
    # Interface names are limited to 15 characters; the peer adds "p".
    return VETH_PREFIX + hashlib.sha1(uid.encode()).hexdigest()[:9]


def _rmtree(path: Path) -> None:
    if not path.is_dir():
        return
    for child in path.iterdir():
        child.unlink(missing_ok=True)
    path.rmdir()

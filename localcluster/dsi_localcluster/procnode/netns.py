"""Pod networking for process-backed nodes: one network namespace per pod on a host bridge.

Layout: a Linux bridge (`dsi-br0`) on the host holds the gateway, the first address of
the pod CIDR. Each pod gets a named network namespace (`dsi-<uid[:12]>`, so `ip netns
exec` works on it) and a veth pair whose host end (`dsiv<hash>`) is enslaved to the
bridge and whose pod end is `eth0` with the pod IP. `lo` is brought up (a new namespace
starts with it down) and the default route points at the gateway: Ray picks its node IP
by connecting a UDP socket to a public address, which needs a route; nothing leaves the
host since ip_forward stays 0 and nothing here touches iptables/nft.

Pods reach each other over the bridge (layer 2) and the host reaches them through the
bridge's address. IPs are allocated from a JSON file under `state_dir`, guarded by an
fcntl lock, so a restarted kubelet keeps its pods' IPs and never hands one out twice.

Needs root and the Debian package iproute2 (`ip`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# RFC 2544 benchmarking range: traffic to private ranges (10/8, 172.16/12, 192.168/16) is
# flagged on these machines, and this range collides with nothing real.
POD_CIDR = "198.18.0.0/16"
BRIDGE = "dsi-br0"
# Prefix of every netns (`<prefix>-...`) and host veth (`<prefix>v...`) this module makes;
# tests use another prefix so they never touch a running cluster's pods.
PREFIX = "dsi"
NETNS_RUN_DIR = Path("/var/run/netns")
NETNS_ETC_DIR = Path("/etc/netns")
_SYS_NET = Path("/sys/class/net")
_IFNAMSIZ = 15  # Linux interface names are at most 15 characters
# Pods cannot reach the host's resolver (no forwarding): point them at their own
# loopback so an unknown name fails at once instead of after glibc's 5 s timeouts.
_DEFAULT_RESOLV = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"


class NetworkError(RuntimeError):
    """An `ip` command failed."""


@dataclass(frozen=True)
class PodNet:
    """The network of one pod."""

    netns: str  # named network namespace, e.g. "dsi-<first 12 chars of pod uid>"
    ip: str  # pod IP on eth0
    host_veth: str  # host end of the pod's veth pair, enslaved to the bridge


def netns_name(pod_uid: str, prefix: str = PREFIX) -> str:
    """The named network namespace of a pod."""
    return f"{prefix}-{pod_uid[:12]}"


def veth_name(pod_uid: str, prefix: str = PREFIX) -> str:
    """The host end of a pod's veth pair (a hash of the uid, to fit 15 characters)."""
    digest = hashlib.sha1(pod_uid.encode()).hexdigest()
    return f"{prefix}v{digest}"[:_IFNAMSIZ]


def netns_etc_dir(netns: str) -> Path:
    """/etc/netns/<netns>: `ip netns exec` bind-mounts each file there over /etc/<file>."""
    return NETNS_ETC_DIR / netns


def netns_hosts_path(netns: str) -> Path:
    """/etc/netns/<netns>/hosts: the pod's /etc/hosts (bind-mounted by `ip netns exec`)."""
    return netns_etc_dir(netns) / "hosts"


def write_netns_file(netns: str, name: str, content: str) -> Path:
    """Write /etc/netns/<netns>/<name> (e.g. "hosts", "resolv.conf") in place.

    In place, not write-and-rename: a running container has the file's inode
    bind-mounted over /etc/<name>, and a rename would leave it seeing the old file.
    The file must exist before a container starts for it to be mounted at all.
    """
    path = netns_etc_dir(netns) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as f:
        f.seek(0)
        f.truncate()
        f.write(content)
    return path


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip <args>`; raise NetworkError with its stderr when it fails and check is set."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def _link_exists(name: str) -> bool:
    """Whether a network interface of that name exists in the host namespace."""
    return (_SYS_NET / name).exists()


def list_netns(prefix: str = PREFIX) -> list[str]:
    """Named network namespaces that this module would have made (`<prefix>-*`)."""
    if not NETNS_RUN_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_RUN_DIR.iterdir() if p.name.startswith(f"{prefix}-"))


def list_veths(prefix: str = PREFIX) -> list[str]:
    """Host interfaces that this module would have made as pod veth ends (`<prefix>v*`)."""
    return sorted(p.name for p in _SYS_NET.iterdir() if p.name.startswith(f"{prefix}v"))


class Network:
    """Pod networks on one host bridge, with IP allocations persisted under state_dir."""

    def __init__(
        self, state_dir: Path, cidr: str = POD_CIDR, bridge: str = BRIDGE, prefix: str = PREFIX
    ) -> None:
        if len(bridge) > _IFNAMSIZ or len(prefix) > 3:
            raise ValueError("bridge name must be <= 15 chars and prefix <= 3 chars")
        self.state_dir = Path(state_dir)
        self.cidr = ipaddress.ip_network(cidr)
        self.bridge = bridge
        self.prefix = prefix
        self.gateway = str(next(self.cidr.hosts()))
        self._alloc_path = self.state_dir / "ipam.json"
        self._lock_path = self.state_dir / "ipam.lock"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Hold the allocation lock; yield the allocations and save them on success."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a", encoding="utf-8") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = self._load()
                yield state
                self._save(state)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _load(self) -> dict[str, Any]:
        """The allocation file: {"last": ip, "pods": {uid: {"ip", "netns", "host_veth"}}}."""
        try:
            data: dict[str, Any] = json.loads(self._alloc_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            data = {}
        data.setdefault("pods", {})
        data.setdefault("last", self.gateway)
        return data

    def _save(self, state: dict[str, Any]) -> None:
        """Write the allocations atomically (a crash mid-write must not lose them all)."""
        tmp = self._alloc_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self._alloc_path)

    def _next_free_ip(self, state: dict[str, Any]) -> str:
        """The first free address after the last one handed out (round robin, like
        host-local IPAM, so a deleted pod's IP is not reused at once by the next pod)."""
        used = {p["ip"] for p in state["pods"].values()} | {self.gateway}
        hosts = [str(h) for h in self.cidr.hosts()]
        last = state["last"]
        start = hosts.index(last) + 1 if last in hosts else 0
        for ip in hosts[start:] + hosts[:start]:
            if ip not in used:
                return ip
        raise NetworkError(f"no free pod IP left in {self.cidr}")

    def ensure_bridge(self) -> str:
        """Create the bridge if missing, give the host the gateway address; return it."""
        if not _link_exists(self.bridge):
            _ip("link", "add", "name", self.bridge, "type", "bridge")
        addr = f"{self.gateway}/{self.cidr.prefixlen}"
        _ip("addr", "replace", addr, "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        return self.gateway

    def create(self, pod_uid: str) -> PodNet:
        """The pod's network: netns + veth on the bridge + a unique IP + routes.

        Idempotent per uid: a second call returns the same PodNet and repairs whatever
        part is missing (e.g. after a reboot the allocation survives but the netns not).
        """
        with self._locked() as state:
            self.ensure_bridge()
            entry = state["pods"].get(pod_uid)
            if entry is None:
                ip = self._next_free_ip(state)
                entry = {
                    "ip": ip,
                    "netns": netns_name(pod_uid, self.prefix),
                    "host_veth": veth_name(pod_uid, self.prefix),
                }
                state["pods"][pod_uid] = entry
                state["last"] = ip
            net = PodNet(entry["netns"], entry["ip"], entry["host_veth"])
            self._plumb(net)
        return net

    def _plumb(self, net: PodNet) -> None:
        """Make the netns, veth, addresses and routes of `net` exist (each step idempotent)."""
        if not (NETNS_RUN_DIR / net.netns).exists():
            _ip("netns", "add", net.netns)
        if not _link_exists(net.host_veth):
            # An eth0 left in the netns without its host end would block the new pair.
            _ip("-n", net.netns, "link", "del", "eth0", check=False)
            # The peer is created directly inside the netns: the host has its own eth0.
            _ip(
                "link",
                "add",
                net.host_veth,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                net.netns,
            )
        _ip("link", "set", net.host_veth, "master", self.bridge, "up")
        ns = ("-n", net.netns)
        _ip(*ns, "addr", "replace", f"{net.ip}/{self.cidr.prefixlen}", "dev", "eth0")
        _ip(*ns, "link", "set", "eth0", "up")
        _ip(*ns, "link", "set", "lo", "up")
        _ip(*ns, "route", "replace", "default", "via", self.gateway, "dev", "eth0")
        etc = netns_etc_dir(net.netns)
        etc.mkdir(parents=True, exist_ok=True)
        # Defaults so a container started before the kubelet writes its own files still
        # gets a sane /etc/hosts and a resolver that fails fast (see _DEFAULT_RESOLV).
        if not (etc / "hosts").exists():
            write_netns_file(net.netns, "hosts", f"127.0.0.1\tlocalhost\n{net.ip}\t{net.netns}\n")
        if not (etc / "resolv.conf").exists():
            write_netns_file(net.netns, "resolv.conf", _DEFAULT_RESOLV)

    def get(self, pod_uid: str) -> PodNet | None:
        """The pod's allocated network, or None when it has none."""
        with self._locked() as state:
            entry = state["pods"].get(pod_uid)
        return None if entry is None else PodNet(entry["netns"], entry["ip"], entry["host_veth"])

    def delete(self, pod_uid: str) -> None:
        """Remove the pod's veth, netns and /etc/netns dir and free its IP; idempotent.

        Processes still inside the netns keep it alive (unnamed) until they exit: kill
        them first (PodSandbox.destroy).
        """
        with self._locked() as state:
            entry = state["pods"].pop(pod_uid, None)
            netns = entry["netns"] if entry else netns_name(pod_uid, self.prefix)
            veth = entry["host_veth"] if entry else veth_name(pod_uid, self.prefix)
            # Deleting one end of a veth pair deletes both.
            if _link_exists(veth):
                _ip("link", "del", veth, check=False)
            if (NETNS_RUN_DIR / netns).exists():
                _ip("netns", "del", netns)
            shutil.rmtree(netns_etc_dir(netns), ignore_errors=True)

    def cleanup_all(self) -> list[str]:
        """Remove every `<prefix>-*` netns, `<prefix>v*` veth, the bridge and all
        allocations; return what was removed. For `down` and for `up` after a crash."""
        removed: list[str] = []
        with self._locked() as state:
            for veth in list_veths(self.prefix):
                if _ip("link", "del", veth, check=False).returncode == 0:
                    removed.append(veth)
            for ns in list_netns(self.prefix):
                if _ip("netns", "del", ns, check=False).returncode == 0:
                    removed.append(ns)
            if NETNS_ETC_DIR.is_dir():
                for etc in NETNS_ETC_DIR.glob(f"{self.prefix}-*"):
                    shutil.rmtree(etc, ignore_errors=True)
            if _link_exists(self.bridge):
                _ip("link", "del", self.bridge, check=False)
                removed.append(self.bridge)
            state["pods"].clear()
            state["last"] = self.gateway
        return removed

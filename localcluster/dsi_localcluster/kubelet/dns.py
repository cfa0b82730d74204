"""Cluster DNS for process-backed pods and the host, as hosts files.

There is no kube-proxy and no DNS server: Service names resolve through hosts files.
- headless Services -> every endpoint address (ready ones, or all with
  ``publishNotReadyAddresses``), also ``<hostname>.<svc>.<ns>.svc.cluster.local``;
- ClusterIP Services -> the address of one ready endpoint (the first, in a stable order);
  a Service whose port differs from its targetPort therefore does not work here;
- only addresses inside the pod range: kwok pods have fake IPs that nothing answers on.

Each pod's file (``/etc/netns/<netns>/hosts``, bind-mounted over /etc/hosts by ``ip netns
exec``) also has short names for the pod's own namespace and the pod's hostname. The host
gets the fully qualified names in a marked block of its /etc/hosts.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .netns import POD_CIDR

DOMAIN = "cluster.local"
HOST_HOSTS = Path("/etc/hosts")
BEGIN, END = "# BEGIN dsi-localcluster", "# END dsi-localcluster"

#: (namespace, service name) -> addresses, plus per-endpoint hostnames.
Table = dict[tuple[str, str], list[str]]


def _in_range(addr: str, cidr: str = POD_CIDR) -> bool:
    try:
        return ipaddress.ip_address(addr) in ipaddress.ip_network(cidr)
    except ValueError:
        return False


def _slice_addresses(sl: dict[str, Any], all_addresses: bool) -> list[tuple[str, str | None]]:
    out = []
    for ep in sl.get("endpoints") or []:
        ready = (ep.get("conditions") or {}).get("ready") is not False
        if not (ready or all_addresses):
            continue
        for addr in ep.get("addresses") or []:
            if _in_range(addr):
                out.append((addr, ep.get("hostname")))
    return out


def table(services: Iterable[dict[str, Any]], slices: Iterable[dict[str, Any]]) -> Table:
    """Service (and endpoint hostname) names -> addresses, from raw API objects."""
    by_svc: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for sl in slices:
        meta = sl["metadata"]
        svc = (meta.get("labels") or {}).get("kubernetes.io/service-name")
        if svc:
            by_svc.setdefault((meta["namespace"], svc), []).append(sl)
    out: Table = {}
    for svc in services:
        ns, name = svc["metadata"]["namespace"], svc["metadata"]["name"]
        spec = svc.get("spec") or {}
        headless = spec.get("clusterIP") == "None"
        everyone = bool(spec.get("publishNotReadyAddresses"))
        pairs = sorted(
            {p for sl in by_svc.get((ns, name), []) for p in _slice_addresses(sl, everyone)},
            key=lambda p: (p[0], p[1] or ""),
        )
        addrs = sorted({a for a, _ in pairs})
        if not addrs:
            continue
        out[(ns, name)] = addrs if headless else addrs[:1]
        for addr, hostname in pairs:
            if headless and hostname:
                out[(ns, f"{hostname}.{name}")] = [addr]
    return out


def _names(ns: str, name: str, own_ns: str | None) -> list[str]:
    names = [f"{name}.{ns}.svc.{DOMAIN}", f"{name}.{ns}.svc", f"{name}.{ns}"]
    if ns == own_ns:
        names.append(name)
    return names


def render(tab: Table, own_ns: str | None = None, own: tuple[str, str] | None = None) -> str:
    """A hosts file; own_ns adds short names, own = (ip, hostname) the pod itself."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    if own:
        lines.append(f"{own[0]}\t{own[1]}")
    for (ns, name), addrs in sorted(tab.items()):
        for addr in addrs:
            lines.append(f"{addr}\t{' '.join(_names(ns, name, own_ns))}")
    return "\n".join(lines) + "\n"


def write_in_place(path: Path, text: str) -> bool:
    """Rewrite path's content in place when it changed; True when written.

    In place, not by rename: the pod sees this file through a bind mount of its inode, and a
    rename would leave the pod looking at the old inode forever.
    """
    try:
        if path.read_text() == text:
            return False
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)
    return True


def host_block(tab: Table) -> str:
    """The marked block of fully qualified names for the host's /etc/hosts."""
    body = render(tab).splitlines()[2:]  # no localhost lines: the host has its own
    return "\n".join([BEGIN, *body, END]) + "\n"


def splice(current: str, block: str) -> str:
    """current /etc/hosts with its dsi block replaced by block ("" removes it)."""
    lines = current.splitlines(keepends=True)
    out, inside = [], False
    for line in lines:
        if line.strip() == BEGIN:
            inside = True
        elif line.strip() == END and inside:
            inside = False
        elif not inside:
            out.append(line)
    text = "".join(out)
    if text and not text.endswith("\n"):
        text += "\n"
    return text + block


def update_host(block: str, path: Path = HOST_HOSTS) -> bool:
    """Put block into the host's hosts file (in place); "" removes it."""
    return write_in_place(path, splice(path.read_text(), block))

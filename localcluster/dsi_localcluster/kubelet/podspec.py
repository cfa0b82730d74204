"""What a kubelet derives from a pod spec, as pure functions of plain dicts.

Environment (values, ``$(VAR)`` expansion, fieldRef, resourceFieldRef, ConfigMap and Secret
keys, envFrom), the argv, the volumes to mount, and the restart backoff. Nothing here does
I/O: ConfigMaps and Secrets come in through a ``Lookup`` callable.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsi_localcluster.kubelet.images import Entrypoint, repository

#: (kind, namespace, name) -> the object's data (Secrets already decoded), or None.
Lookup = Callable[[str, str, str], dict[str, str] | None]

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_FIELD_KEY = re.compile(r"^metadata\.(labels|annotations)\['([^']+)'\]$")
_SUFFIX: dict[str, float] = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "k": 10**3,
    "M": 10**6,
}
_SUFFIX |= {"G": 10**9, "T": 10**12, "m": 1e-3}


class PodSpecError(ValueError):
    """The pod cannot start as specified (the kubelet's CreateContainerConfigError)."""


def quantity(q: str | int | float) -> float:
    """A Kubernetes quantity ("500m", "2Gi", "1") as a number."""
    s = str(q)
    for suffix in sorted(_SUFFIX, key=len, reverse=True):
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * _SUFFIX[suffix]
    return float(s)


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: known vars replaced, unknown kept, ``$$`` -> ``$``."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR.sub(sub, text)


def _field(pod: dict[str, Any], path: str) -> str:
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
    m = _FIELD_KEY.match(path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP"),
        "status.hostIP": status.get("hostIP"),
        "status.podIPs": ",".join(i["ip"] for i in status.get("podIPs") or []),
        "status.hostIPs": ",".join(i["ip"] for i in status.get("hostIPs") or []),
    }
    if path not in simple:
        raise PodSpecError(f"env fieldRef {path!r} is not supported")
    return str(simple[path] or "")


def _resource(container: dict[str, Any], ref: dict[str, Any], node: dict[str, str]) -> str:
    kind, _, res = ref["resource"].partition(".")
    values = (container.get("resources") or {}).get(kind) or {}
    if res not in values and kind == "limits":
        values = node  # unset limits are the node's allocatable, as the kubelet does
    raw = values.get(res, "0")
    # The API server defaults an unset divisor to "0", which means 1.
    divisor = quantity(ref.get("divisor") or "1") or 1.0
    return str(math.ceil(quantity(raw) / divisor))


def _key_ref(kind: str, ns: str, ref: dict[str, Any], lookup: Lookup) -> str | None:
    data = lookup(kind, ns, ref["name"])
    if data is not None and ref["key"] in data:
        return data[ref["key"]]
    if ref.get("optional"):
        return None
    what = "not found" if data is None else f"has no key {ref['key']!r}"
    raise PodSpecError(f"{kind} {ns}/{ref['name']} {what}")


def _value_from(
    pod: dict[str, Any],
    c: dict[str, Any],
    src: dict[str, Any],
    lookup: Lookup,
    node: dict[str, str],
) -> str | None:
    ns = pod["metadata"]["namespace"]
    if "fieldRef" in src:
        return _field(pod, src["fieldRef"]["fieldPath"])
    if "resourceFieldRef" in src:
        return _resource(c, src["resourceFieldRef"], node)
    if "configMapKeyRef" in src:
        return _key_ref("ConfigMap", ns, src["configMapKeyRef"], lookup)
    if "secretKeyRef" in src:
        return _key_ref("Secret", ns, src["secretKeyRef"], lookup)
    raise PodSpecError(f"unsupported valueFrom {sorted(src)}")


def _env_from(pod: dict[str, Any], c: dict[str, Any], lookup: Lookup) -> dict[str, str]:
    out: dict[str, str] = {}
    ns = pod["metadata"]["namespace"]
    for src in c.get("envFrom") or []:
        kind, ref = (
            ("ConfigMap", src.get("configMapRef"))
            if "configMapRef" in src
            else (
                "Secret",
                src.get("secretRef"),
            )
        )
        assert ref is not None
        data = lookup(kind, ns, ref["name"])
        if data is None:
            if ref.get("optional"):
                continue
            raise PodSpecError(f"envFrom: {kind} {ns}/{ref['name']} not found")
        out.update({src.get("prefix", "") + k: v for k, v in data.items()})
    return out


def container_env(
    pod: dict[str, Any],
    c: dict[str, Any],
    lookup: Lookup,
    node_allocatable: dict[str, str],
    base: dict[str, str],
) -> dict[str, str]:
    """The container's environment: base (the "image's"), envFrom, then env in order."""
    env = dict(base)
    env.setdefault("PATH", BASE_PATH)
    env["HOSTNAME"] = pod["metadata"]["name"]
    env.update(_env_from(pod, c, lookup))
    for var in c.get("env") or []:
        if "valueFrom" in var:
            value = _value_from(pod, c, var["valueFrom"], lookup, node_allocatable)
            if value is not None:
                env[var["name"]] = value
        else:
            env[var["name"]] = expand(var.get("value", ""), env)
    return env


def argv(
    c: dict[str, Any], env: dict[str, str], images: Mapping[str, Entrypoint] | None = None
) -> list[str]:
    """command + args with ``$(VAR)`` expansion, as a kubelet runs them: with no command, the
    image's ENTRYPOINT (from ``images``, by repository) with ``args``, or else its CMD. An
    image not in ``images`` has no entrypoint: then ``args`` alone are the command."""
    cmd = [expand(a, env) for a in c.get("command") or []]
    args = [expand(a, env) for a in c.get("args") or []]
    if cmd:
        return cmd + args
    image = (images or {}).get(repository(str(c.get("image", ""))))
    if image is not None:
        return [*image.entrypoint, *(args if "args" in c else image.cmd)]
    if not args:
        raise PodSpecError(f"container {c['name']!r} has no command (no image entrypoint)")
    return args


@dataclass(frozen=True)
class MountSpec:
    """One volume mount: where on the host, where in the pod, and how."""

    source: Path
    target: str
    tmpfs_bytes: int | None = None
    read_only: bool = False
    files: tuple[tuple[str, str], ...] = ()  # (relative path, content) to write first


def mounts(
    pod: dict[str, Any], c: dict[str, Any], pod_dir: Path, lookup: Lookup
) -> list[MountSpec]:
    """The container's volume mounts; emptyDir, configMap, secret and hostPath volumes."""
    volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
    ns = pod["metadata"]["namespace"]
    out = []
    for vm in c.get("volumeMounts") or []:
        vol = volumes.get(vm["name"])
        if vol is None:
            raise PodSpecError(f"volumeMount {vm['name']!r} names no volume")
        ro = bool(vm.get("readOnly"))
        src = pod_dir / "volumes" / vm["name"]
        if "emptyDir" in vol:
            ed = vol["emptyDir"] or {}
            size = None
            if ed.get("medium") == "Memory":
                size = int(quantity(ed.get("sizeLimit") or "64Mi"))
            out.append(MountSpec(src, vm["mountPath"], size, ro))
        elif "hostPath" in vol:
            out.append(MountSpec(Path(vol["hostPath"]["path"]), vm["mountPath"], None, ro))
        elif "configMap" in vol or "secret" in vol:
            out.append(_data_volume(vol, ns, src, vm["mountPath"], lookup))
        elif "projected" in vol:
            files = _projected(pod, vol["projected"], lookup)
            out.append(MountSpec(src, vm["mountPath"], None, True, files))
        else:
            kinds = sorted(set(vol) - {"name"})
            raise PodSpecError(f"volume {vm['name']!r}: {kinds} not supported on process nodes")
    return out


def _data_volume(vol: dict[str, Any], ns: str, src: Path, target: str, lookup: Lookup) -> MountSpec:
    kind, ref = ("ConfigMap", vol["configMap"]) if "configMap" in vol else ("Secret", vol["secret"])
    name = ref.get("name") or ref.get("secretName")
    data = lookup(kind, ns, name) or {}
    if not data and not ref.get("optional"):
        raise PodSpecError(f"volume {vol['name']!r}: {kind} {ns}/{name} not found")
    items = ref.get("items") or [{"key": k, "path": k} for k in data]
    files = tuple((i["path"], data[i["key"]]) for i in items if i["key"] in data)
    return MountSpec(src, target, None, True, files)


def _projected(
    pod: dict[str, Any], proj: dict[str, Any], lookup: Lookup
) -> tuple[tuple[str, str], ...]:
    # The service account volume every pod gets: a token, the cluster CA, the namespace.
    ns = pod["metadata"]["namespace"]
    files: list[tuple[str, str]] = []
    for src in proj.get("sources") or []:
        if "serviceAccountToken" in src:
            sa = pod["spec"].get("serviceAccountName") or "default"
            token = (lookup("ServiceAccountToken", ns, sa) or {}).get("token", "")
            files.append((src["serviceAccountToken"]["path"], token))
        elif "configMap" in src or "secret" in src:
            kind = "ConfigMap" if "configMap" in src else "Secret"
            ref = src.get("configMap") or src.get("secret") or {}
            data = lookup(kind, ns, ref["name"]) or {}
            items = ref.get("items") or [{"key": k, "path": k} for k in data]
            files += [(i["path"], data[i["key"]]) for i in items if i["key"] in data]
        elif "downwardAPI" in src:
            for item in src["downwardAPI"].get("items") or []:
                if "fieldRef" in item:
                    files.append((item["path"], _field(pod, item["fieldRef"]["fieldPath"])))
    return tuple(files)


def decode_secret(data: dict[str, str] | None) -> dict[str, str] | None:
    """A Secret's base64 data as text."""
    if data is None:
        return None
    return {k: base64.b64decode(v).decode(errors="replace") for k, v in data.items()}


def backoff_seconds(restarts: int, base: float = 10.0, cap: float = 300.0) -> float:
    """CrashLoopBackOff delay before restart number ``restarts + 1`` (10 s doubling, 300 s)."""
    if restarts <= 0:
        return 0.0
    return float(min(cap, base * 2 ** (restarts - 1)))


def should_restart(policy: str, exit_code: int) -> bool:
    """Whether a container that exited with exit_code is restarted under restartPolicy."""
    return policy == "Always" or (policy == "OnFailure" and exit_code != 0)

"""One pod on a process-backed node, from sandbox to deletion (one thread per pod)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from . import dns, podspec, probes, runtime
from .images import Entrypoint
from .netns import Network, PodNet, kill_netns_processes, netns_dir
from .state import ContainerRecord, pod_status, stamp_transitions, terminated

log = logging.getLogger("dsi-kubelet")
TICK = 0.5


class PodHost(Protocol):
    """What a pod worker uses of its node agent (:class:`.agent.NodeAgent`, which runs the
    workers: naming the protocol here keeps this module from importing the agent back)."""

    state_dir: Path
    host_ip: str
    core: Any
    network: Network
    dns_table: dns.Table
    #: The project's images' entrypoints, by repository (:mod:`.images`).
    images: Mapping[str, Entrypoint]

    def env_for(self, pod: dict[str, Any], c: dict[str, Any], net: PodNet) -> dict[str, str]:
        """The container's environment."""

    def lookup(self, kind: str, namespace: str, name: str) -> dict[str, str] | None:
        """ConfigMap or Secret data; None when missing."""

    def confirm_deleted(self, pod: dict[str, Any]) -> None:
        """Delete the pod object with grace 0."""

    def forget(self, uid: str) -> None:
        """The worker of this pod finished."""


class PodWorker(threading.Thread):
    """Runs one pod's containers and reports its status, like the kubelet's pod worker."""

    def __init__(self, agent: PodHost, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['name']}", daemon=True)
        self.agent = agent
        self.pod = pod
        self.uid: str = meta["uid"]
        self.name: str = meta["name"]
        self.namespace: str = meta["namespace"]
        self.dir: Path = agent.state_dir / "pods" / self.uid
        self.deleting = threading.Event()
        self.gone = threading.Event()  # the object is gone from the API (force-deleted)
        self.records = [
            ContainerRecord(c, init=True) for c in pod["spec"].get("initContainers") or []
        ]
        self.records += [ContainerRecord(c) for c in pod["spec"]["containers"]]
        self.procs: dict[str, runtime.Container] = {}
        self.net: PodNet | None = None
        self.start_time = time.time()
        self.inits_done = not any(r.init for r in self.records)
        self.failed = False
        self.last_status: dict[str, Any] | None = None

    # -- helpers ---------------------------------------------------------------------------

    @property
    def policy(self) -> str:
        """spec.restartPolicy."""
        return str(self.pod["spec"].get("restartPolicy") or "Always")

    def log_path(self, rec: ContainerRecord) -> Path:
        """The log file of the container's current run (one file per restart)."""
        return self.dir / "logs" / f"{rec.name}.{rec.restart_count}.log"

    def update(self, pod: dict[str, Any]) -> None:
        """A newer version of the pod object arrived from the watch."""
        self.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            self.deleting.set()

    def report(self) -> None:
        """Patch the pod's status when it changed."""
        assert self.net is not None
        st = pod_status(
            self.records,
            self.net.ip,
            self.agent.host_ip,
            self.start_time,
            self.inits_done,
            self.failed,
            self.policy,
        )
        st = stamp_transitions(st, self.last_status, time.time())
        if st == self.last_status or self.gone.is_set():
            return
        try:
            self.agent.core.patch_namespaced_pod_status(self.name, self.namespace, {"status": st})
            self.last_status = st
        except Exception as e:  # noqa: BLE001 - the pod may be gone; the next tick retries
            log.debug("status of %s: %s", self.name, e)

    # -- lifecycle ------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self.net = self.agent.network.create(self.uid)
            self.write_hosts()
            while not self.deleting.is_set() and not self.gone.is_set():
                self.tick()
                self.report()
                time.sleep(TICK)
        except Exception:
            log.exception("pod %s/%s failed", self.namespace, self.name)
        finally:
            self.teardown()

    def write_hosts(self) -> None:
        """The pod's hosts file (kept current afterwards by the agent's DNS loop)."""
        assert self.net is not None
        text = dns.render(self.agent.dns_table, self.namespace, (self.net.ip, self.name))
        dns.write_in_place(netns_dir(self.net.netns) / "hosts", text)

    def tick(self) -> None:
        """Start, probe and restart containers; init containers first, in order."""
        now = time.time()
        if not self.inits_done:
            self.tick_init(now)
            return
        if self.failed:
            return
        for rec in self.records:
            if not rec.init:
                self.tick_container(rec, now)

    def tick_init(self, now: float) -> None:
        rec = next((r for r in self.records if r.init and r.terminated is None), None)
        if rec is None:
            self.inits_done = True
        elif rec.running:
            self.poll(rec, now)
        elif now >= rec.next_start:
            self.start_container(rec)

    def poll(self, rec: ContainerRecord, now: float) -> int | None:
        """Notice an exit; decide restart (with backoff) or final termination."""
        proc = self.procs.get(rec.name)
        if proc is None or not rec.running:
            return None
        code = proc.exit_code()
        if code is None:
            return None
        rec.running = False
        term = terminated(code, rec.started_at, now)
        policy = _init_policy(self.policy) if rec.init else self.policy
        restart = podspec.should_restart(policy, code)
        if rec.init and code == 0:
            rec.terminated = term
            return code
        if restart:
            rec.last_terminated = term
            rec.waiting_reason = "CrashLoopBackOff"
            rec.next_start = now + podspec.backoff_seconds(rec.restart_count + 1)
            rec.restart_count += 1
        else:
            rec.terminated = term
            if rec.init:
                self.failed = True
        return code

    def tick_container(self, rec: ContainerRecord, now: float) -> None:
        self.poll(rec, now)
        if rec.terminated is not None:
            return
        if not rec.running:
            if now >= rec.next_start:
                self.start_container(rec)
            return
        self.probe(rec, now)

    def start_container(self, rec: ContainerRecord) -> None:
        """Resolve env, argv and mounts, and start the container (errors -> waiting)."""
        assert self.net is not None
        c = rec.spec
        try:
            env = self.agent.env_for(self.pod, c, self.net)
            argv = podspec.argv(c, env, self.agent.images)
            mounts = podspec.mounts(self.pod, c, self.dir, self.agent.lookup)
        except podspec.PodSpecError as e:
            rec.waiting_reason, rec.waiting_message = "CreateContainerConfigError", str(e)
            rec.next_start = time.time() + 5
            return
        proc = runtime.start(
            self.net.netns, self.name, self.dir, rec.name, argv, env,
            c.get("workingDir"), mounts, self.log_path(rec),
        )  # fmt: skip
        self.procs[rec.name] = proc
        rec.pid, rec.started_at, rec.running, rec.env = proc.pid, proc.started_at, True, env
        rec.waiting_reason, rec.waiting_message = "", ""
        for kind in ("readiness", "liveness", "startup"):
            spec = c.get(f"{kind}Probe")
            setattr(rec, kind, probes.ProbeState(spec, proc.started_at) if spec else None)

    def probe(self, rec: ContainerRecord, now: float) -> None:
        assert self.net is not None
        proc = self.procs[rec.name]
        ports = {p["name"]: p["containerPort"] for p in rec.spec.get("ports") or [] if "name" in p}
        order = (
            [rec.startup] if rec.startup and not rec.startup.ok else [rec.liveness, rec.readiness]
        )
        for st in order:
            if st is None or not st.due(now):
                continue
            ok, msg = probes.run(st.probe, proc, rec.env, self.net.ip, ports)
            st.record(ok, msg)
        for st in (rec.liveness, rec.startup):
            if st is not None and st.failed() and (st is rec.liveness or not st.ok):
                log.info("%s/%s: probe failed (%s): restarting", self.name, rec.name, st.message)
                runtime.stop(proc, float(self.pod["spec"].get("terminationGracePeriodSeconds", 30)))
                return

    def teardown(self) -> None:
        """Stop every container (the grace period when deleting), free the sandbox."""
        grace = float(self.pod["metadata"].get("deletionGracePeriodSeconds") or 0)
        if self.gone.is_set():
            grace = 0.0
        for proc in self.procs.values():
            runtime.stop(proc, grace)
        if self.net is not None:
            runtime.kill_recorded(self.dir, self.net.netns)
            kill_netns_processes(self.net.netns)
            self.agent.network.delete(self.uid)
        if keep := os.environ.get(runtime.KEEP_LOGS_ENV):
            meta = self.pod["metadata"]
            dest = Path(keep) / f"{meta['namespace']}_{meta['name']}_{self.uid[:8]}"
            try:
                runtime.keep_logs(self.dir, dest)
            except OSError as e:
                log.warning("could not keep the logs of %s: %s", meta["name"], e)
        runtime.unmount_all(self.dir)
        if self.deleting.is_set() and not self.gone.is_set():
            self.agent.confirm_deleted(self.pod)
        self.agent.forget(self.uid)


def _init_policy(policy: str) -> str:
    # Init containers of an Always pod are retried on failure, never on success.
    return "OnFailure" if policy == "Always" else policy

"""A builder for DeepSpeedInference objects, shared by unit, integration and e2e tests and
bench scripts (after LeaderWorkerSet's ``test/wrappers``): start from a minimal valid
resource, change what the test is about, and read the spec or the whole object.

    DSIWrapper("demo").tp(2).replicas(2).restart_policy(maxRestarts=2).spec()
    DSIWrapper("x").on_simulated_gpus().tp(4).obj()
"""

from __future__ import annotations

import copy
from typing import Any

from dsi_operator.api.labels import API_VERSION, KIND

#: Fast restart settings so tests do not wait on production grace periods.
FAST_RESTART_POLICY: dict[str, Any] = {
    "maxRestarts": 5,
    "windowSeconds": 600,
    "backoff": {"initialSeconds": 1, "maxSeconds": 2},
    "quietPeriodSeconds": 600,
    "terminatingGraceSeconds": 3,
    "nodeNotReadyGraceSeconds": 3,
    "formationTimeoutSeconds": 600,
}


def merge(into: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """Merge ``changes`` into ``into`` recursively (dicts merge, anything else replaces)."""
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            merge(into[k], v)
        else:
            into[k] = copy.deepcopy(v)
    return into


class DSIWrapper:
    """A DeepSpeedInference under construction; every setter returns the wrapper."""

    def __init__(self, name: str = "demo", namespace: str | None = None) -> None:
        self._obj: dict[str, Any] = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": name},
            "spec": {"model": {"name": "tiny/llama"}, "tensorParallelSize": 1, "replicas": 1},
        }
        if namespace is not None:
            self._obj["metadata"]["namespace"] = namespace

    def model(self, name: str, dtype: str | None = None) -> DSIWrapper:
        """The hub model id (and dtype)."""
        self._obj["spec"]["model"] = {"name": name, **({"dtype": dtype} if dtype else {})}
        return self

    def tp(self, n: int) -> DSIWrapper:
        """tensorParallelSize."""
        self._obj["spec"]["tensorParallelSize"] = n
        return self

    def replicas(self, n: int) -> DSIWrapper:
        """Number of TP groups."""
        self._obj["spec"]["replicas"] = n
        return self

    def gpus(self, n: int) -> DSIWrapper:
        """GPUs per rank (0: CPU ranks)."""
        return self.set(resources={"gpus": n})

    def restart_policy(self, **fields: Any) -> DSIWrapper:
        """restartPolicy fields, camelCase (merged)."""
        return self.set(restartPolicy=fields)

    def set(self, **spec: Any) -> DSIWrapper:
        """Any spec fields, camelCase; dicts are merged into what is there."""
        merge(self._obj["spec"], spec)
        return self

    def replace(self, **spec: Any) -> DSIWrapper:
        """Spec fields, camelCase, each replacing what is there whole."""
        self._obj["spec"].update(copy.deepcopy(spec))
        return self

    def on_simulated_gpus(self) -> DSIWrapper:
        """What the kwok GPU nodes of the local cluster run: small requests, an image that is
        never pulled, fast restarts."""
        return self.model("hf-internal-testing/tiny-random-LlamaForCausalLM", "bfloat16").set(
            image="registry.invalid/dsi-worker:test",
            resources={"gpus": 1, "cpu": "100m", "memory": "128Mi"},
            gpu={"sharedMemorySize": "64Mi"},
            head={"resources": {"cpu": "100m", "memory": "128Mi"}},
            restartPolicy=FAST_RESTART_POLICY,
        )

    def spec(self) -> dict[str, Any]:
        """A copy of the spec."""
        spec: dict[str, Any] = copy.deepcopy(self._obj["spec"])
        return spec

    def obj(self) -> dict[str, Any]:
        """A copy of the whole object."""
        return copy.deepcopy(self._obj)

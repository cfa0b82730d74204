"""operator -> KubeRay -> Ray -> DeepSpeed -> HTTP, for real, and whole-group restarts.

Every pod here is a real process tree on a process-backed node: the Ray head, the Ray
workers and the DeepSpeed TP=2 groups over gloo. Assertions are on HTTP answers, pod UIDs,
the resource's status and Events, never on logs.
"""

from __future__ import annotations

import time
from typing import Any

from dsi_localcluster import faults
from dsi_localcluster.wait import events, wait_for
from e2e_stack import MAX_TOKENS, PROMPT, Stack, background_load, group_restarts, post


def restart_events(stack: Stack) -> list[str]:
    """The resource's GroupRestart Events."""
    return [e for e in events(stack.kube.core, stack.namespace, stack.name) if "GroupRestart" in e]


def assert_group_restarted(
    stack: Stack,
    hit: int,
    before: dict[int, set[str]],
    restarts_before: dict[int, int],
    total_before: int,
) -> None:
    """Exactly the hit group restarted once, with new pods; the other kept its pods."""
    stack.wait_ready(since_restarts=total_before)
    after = group_restarts(stack)
    for g, n in restarts_before.items():
        want = n + 1 if g == hit else n
        assert after[g] == want, f"group {g}: restarts {after[g]}, want {want}\n{stack.dump()}"
        uids = stack.uids(g)
        if g == hit:
            assert uids and not uids & before[g], f"group {g} kept pods\n{stack.dump()}"
        else:
            assert uids == before[g], f"group {g} was touched\n{stack.dump()}"


def snapshot(stack: Stack) -> tuple[dict[int, set[str]], dict[int, int], int]:
    """Pod UIDs per group, restarts per group, GroupRestart Events so far."""
    return {g: stack.uids(g) for g in (0, 1)}, group_restarts(stack), len(restart_events(stack))


def test_ready_and_serves_the_unsharded_models_tokens(
    stack: Stack, reference_tokens: list[int]
) -> None:
    out = stack.kubectl("get", "dsi", "-n", stack.namespace).stdout
    row = out.splitlines()[1].split()
    assert row[:3] == [stack.name, "Ready", "2/2"], out

    got = stack.generate()
    assert got["token_ids"] == reference_tokens
    assert len(got["token_ids"]) == MAX_TOKENS

    model = stack.dsi()["status"].get("servedModel") or "dsi-tiny-llama"
    comp = post(
        f"{stack.endpoint}/v1/completions",
        {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0},
    )
    assert comp["choices"][0]["text"] == got["text"]
    assert comp["usage"]["completion_tokens"] == MAX_TOKENS

    chat = post(
        f"{stack.endpoint}/v1/chat/completions",
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["usage"]["completion_tokens"] >= 1

    # Both groups serve: concurrent requests spread over them (least-in-flight).
    with background_load(stack) as a, background_load(stack) as b:
        wait_for(lambda: (a.ok_groups() | b.ok_groups()) >= {0, 1}, 60, "both groups answer")


def _fault_cycle(stack: Stack, hit: int, inject: Any, reference: list[int]) -> None:
    before, restarts_before, events_before = snapshot(stack)
    total_before = stack.restarts_total()
    other = 1 - hit
    with background_load(stack) as load:
        time.sleep(2)
        inject()
        assert_group_restarted(stack, hit, before, restarts_before, total_before)
        # Ready means formed: the hit group answers right away (the ingress polls group
        # state every few seconds), not after re-forming behind a Ready it already claimed.
        ready_at = time.monotonic()
        wait_for(
            lambda: load.answered(hit, since=ready_at),
            20,
            f"group {hit} answers once Ready ({load.summary()})",
        )
    assert other in load.ok_groups(), f"group {other} did not answer: {load.summary()}"
    # The other group took the traffic: the ingress retries a request that hit the dying
    # group, so next to nothing fails (bench_e2e measures the exact share).
    assert load.ok_share() >= 0.95, (
        f"too many failures while group {hit} restarted: {load.summary()}"
    )
    wait_for(lambda: len(restart_events(stack)) > events_before, 30, "GroupRestart Event")
    assert len(restart_events(stack)) == events_before + 1, restart_events(stack)
    assert stack.wait_answers()["token_ids"] == reference
    print(f"\n[e2e] group {hit} restarted; load during it: {load.summary()}")


def test_rank_process_killed_restarts_only_its_group(
    stack: Stack, reference_tokens: list[int]
) -> None:
    pod = stack.pods()[(0, 1)]

    def kill() -> None:
        faults.kill_container_process(stack.kube.api, stack.namespace, pod.metadata.name)

    _fault_cycle(stack, 0, kill, reference_tokens)


def test_rank_pod_deleted_restarts_only_its_group(
    stack: Stack, reference_tokens: list[int]
) -> None:
    pod = stack.pods()[(1, 0)]

    def delete() -> None:
        stack.kube.core.delete_namespaced_pod(pod.metadata.name, stack.namespace)

    _fault_cycle(stack, 1, delete, reference_tokens)


def _groups_on(stack: Stack, node: str) -> set[int]:
    return {g for (g, _), p in stack.pods().items() if p.spec.node_name == node}


def _head_node(stack: Stack) -> str:
    pods = stack.kube.core.list_namespaced_pod(
        stack.namespace, label_selector=f"deepspeed.ai/inference={stack.name},ray.io/node-type=head"
    ).items
    return str(pods[0].spec.node_name)


def test_process_node_lost_restarts_the_groups_it_held(
    stack: Stack, reference_tokens: list[int]
) -> None:
    head = _head_node(stack)
    candidates = sorted({p.spec.node_name for p in stack.pods().values()} - {head})
    assert candidates, f"every rank shares the head's node\n{stack.dump()}"
    # Prefer a node holding one group only: then the other group must keep answering.
    node = min(candidates, key=lambda n: len(_groups_on(stack, n)))
    hit = _groups_on(stack, node)
    before, restarts_before, _ = snapshot(stack)
    total_before = stack.restarts_total()
    try:
        with background_load(stack) as load:
            faults.lose_process_node(node)
            stack.wait_ready(since_restarts=total_before + len(hit) - 1)
        after = group_restarts(stack)
        for g in (0, 1):
            assert after[g] == restarts_before[g] + (g in hit), f"group {g}\n{stack.dump()}"
            assert (stack.uids(g) == before[g]) == (g not in hit), f"group {g}\n{stack.dump()}"
        assert all(p.spec.node_name != node for p in stack.pods().values())
        for g in {0, 1} - hit:
            assert g in load.ok_groups(), f"group {g} did not answer: {load.summary()}"
        assert stack.wait_answers()["token_ids"] == reference_tokens
        print(f"\n[e2e] node {node} lost (groups {sorted(hit)}); load: {load.summary()}")
    finally:
        faults.restore_process_node(node)

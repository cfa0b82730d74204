"""The Ray head's pod lost, for real: every group re-forms under a new head and serving
comes back with the unsharded model's tokens. It runs last on the shared stack (after the
scaling module, so at TP 1): it restarts every group.
"""

from __future__ import annotations

from e2e_stack import Stack, group_restarts


def test_head_pod_lost_every_group_reforms_under_a_new_head(
    stack: Stack, reference_tokens: list[int]
) -> None:
    # Without GCS fault tolerance the Ray cluster dies with its head: KubeRay starts a new
    # head and redeploys the app, the workers' raylets exit (their containers restart) and
    # the operator restarts every group. Serving stops until then; this proves it recovers.
    restarts_before, total_before = group_restarts(stack), stack.restarts_total()
    head = stack.kube.core.list_namespaced_pod(
        stack.namespace, label_selector=f"deepspeed.ai/inference={stack.name},ray.io/node-type=head"
    ).items[0]
    stack.kube.core.delete_namespaced_pod(head.metadata.name, stack.namespace)
    # Both groups restarted (at least once each: the Ray cluster they formed in is gone).
    stack.wait_ready(since_restarts=total_before + 1)
    assert stack.wait_answers(timeout=300)["token_ids"] == reference_tokens
    after = group_restarts(stack)
    assert all(after[g] > restarts_before[g] for g in (0, 1)), stack.dump()
    print(f"\n[e2e] head lost; restarts per group {restarts_before} -> {after}")

#!/usr/bin/env bash
# End-to-end run of the DeepSpeedInference operator on kind, for machines with Docker.
#
# What it does:
#   1. creates a kind cluster (or reuses it),
#   2. builds the operator and worker images from ./Dockerfile and loads them into kind,
#   3. installs KubeRay with its Helm chart and this repository's chart,
#   4. applies a small CPU-only DeepSpeedInference (TP=2, no GPU needed),
#   5. waits for phase Ready and calls /v1/completions through a port-forward.
#
# CI does not run this script (the CI machines have no Docker engine); it is for users.
# Needs: docker, kind, kubectl, helm, curl. Internet access from the cluster (the worker
# pods download the model from the Hugging Face hub).
#
# Knobs (environment variables):
#   CLUSTER=dsi-e2e            kind cluster name
#   KEEP=0                     1 keeps the cluster (and port-forward) after success
#   SKIP_BUILD=0               1 uses images already loaded into kind
#   MODEL=TinyLlama/TinyLlama-1.1B-Chat-v1.0   a Llama-style hub model AutoTP can shard
#   TP=2                       ranks per group (the model's KV heads must divide by it)
#   DTYPE=bfloat16             CPU workers support float32 and bfloat16, not float16
#   KUBERAY_VERSION=1.6.2      kuberay-operator chart version
#   RANK_CPU=1 RANK_MEMORY=4Gi per rank pod (TP of them), plus a 1 CPU / 2Gi head pod
#   TIMEOUT=45m                how long to wait for phase Ready (model download + load)
#
# The worker image is large (CUDA + torch): building it and `kind load`-ing it takes a while
# and several GB of disk. Give Docker at least 4 CPUs and 12 GB of memory.
set -euo pipefail

CLUSTER="${CLUSTER:-dsi-e2e}"
KEEP="${KEEP:-0}"
SKIP_BUILD="${SKIP_BUILD:-0}"
MODEL="${MODEL:-TinyLlama/TinyLlama-1.1B-Chat-v1.0}"
TP="${TP:-2}"
DTYPE="${DTYPE:-bfloat16}"
KUBERAY_VERSION="${KUBERAY_VERSION:-1.6.2}"
TIMEOUT="${TIMEOUT:-45m}"
RANK_CPU="${RANK_CPU:-1}"
RANK_MEMORY="${RANK_MEMORY:-4Gi}"
NAME=tiny
NS=dsi-e2e
OPERATOR_NS=dsi-system

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${ROOT}"
VERSION="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' operator/dsi_operator/_version.py)"
REGISTRY=ghcr.io/deepspeed-inference-operator
OPERATOR_IMAGE="${REGISTRY}/operator:${VERSION}"
WORKER_IMAGE="${REGISTRY}/worker:${VERSION}"

log() { printf '\n==> %s\n' "$*" >&2; }

for tool in docker kind kubectl helm curl; do
    command -v "${tool}" >/dev/null || { echo "missing tool: ${tool}" >&2; exit 2; }
done

PF_PID=""
cleanup() {
    local rc=$?
    if [[ -n "${PF_PID}" ]]; then kill "${PF_PID}" 2>/dev/null || true; fi
    if [[ ${rc} -ne 0 ]]; then
        log "FAILED (exit ${rc}); state for debugging:"
        kubectl get dsi,rayservice,raycluster,pods -n "${NS}" -o wide || true
        kubectl describe dsi -n "${NS}" "${NAME}" || true
        kubectl logs -n "${OPERATOR_NS}" deploy/dsi-operator --tail=100 || true
    fi
    if [[ "${KEEP}" != "1" && ${rc} -eq 0 ]]; then
        log "deleting kind cluster ${CLUSTER} (KEEP=1 keeps it)"
        kind delete cluster --name "${CLUSTER}"
    fi
}
trap cleanup EXIT

log "kind cluster ${CLUSTER}"
if ! kind get clusters | grep -qx "${CLUSTER}"; then
    kind create cluster --name "${CLUSTER}" --wait 120s
fi
kubectl config use-context "kind-${CLUSTER}"

if [[ "${SKIP_BUILD}" != "1" ]]; then
    log "building images ${OPERATOR_IMAGE} and ${WORKER_IMAGE}"
    docker build --target operator -t "${OPERATOR_IMAGE}" .
    docker build --target worker -t "${WORKER_IMAGE}" .
    kind load docker-image --name "${CLUSTER}" "${OPERATOR_IMAGE}" "${WORKER_IMAGE}"
fi

log "installing KubeRay ${KUBERAY_VERSION}"
helm repo add kuberay https://ray-project.github.io/kuberay-helm/ >/dev/null 2>&1 || true
helm repo update kuberay >/dev/null
helm upgrade --install kuberay-operator kuberay/kuberay-operator \
    --version "${KUBERAY_VERSION}" --namespace kuberay-system --create-namespace --wait

log "installing the dsi-operator chart"
helm upgrade --install dsi-operator charts/dsi-operator \
    --namespace "${OPERATOR_NS}" --create-namespace \
    --set image.repository="${REGISTRY}/operator" --set image.tag="${VERSION}" \
    --set image.pullPolicy=IfNotPresent --wait --timeout 5m
kubectl -n "${OPERATOR_NS}" rollout status deploy/dsi-operator --timeout=120s

log "applying DeepSpeedInference ${NS}/${NAME} (${MODEL}, TP=${TP}, CPU)"
kubectl create namespace "${NS}" --dry-run=client -o yaml | kubectl apply -f -
kubectl apply -f - <<EOF
apiVersion: deepspeed.ai/v1alpha1
kind: DeepSpeedInference
metadata:
  name: ${NAME}
  namespace: ${NS}
spec:
  model:
    name: ${MODEL}
    dtype: ${DTYPE}
    servedModelName: tiny
  tensorParallelSize: ${TP}
  replicas: 1
  image: ${WORKER_IMAGE}
  imagePullPolicy: IfNotPresent
  # kind nodes have no GPUs: CPU-only ranks, no GPU node selector.
  resources:
    gpus: 0
    cpu: "${RANK_CPU}"
    memory: ${RANK_MEMORY}
  gpu:
    nodeSelector: {}
    sharedMemorySize: 1Gi
  head:
    resources:
      cpu: "1"
      memory: 2Gi
  serve:
    maxNewTokens: 32
  restartPolicy:
    formationTimeoutSeconds: 2400
EOF

log "waiting up to ${TIMEOUT} for phase Ready"
kubectl get dsi -n "${NS}"
kubectl wait -n "${NS}" "dsi/${NAME}" --for=jsonpath='{.status.phase}'=Ready --timeout="${TIMEOUT}"
kubectl get dsi -n "${NS}"

log "calling the endpoint through a port-forward"
kubectl -n "${NS}" port-forward "svc/${NAME}-serve-svc" 8000:8000 >/dev/null 2>&1 &
PF_PID=$!
for _ in $(seq 1 30); do
    curl -fsS http://127.0.0.1:8000/v1/models >/dev/null 2>&1 && break
    sleep 1
done
curl -fsS http://127.0.0.1:8000/v1/models
echo
curl -fsS http://127.0.0.1:8000/v1/completions \
    -H 'Content-Type: application/json' \
    -d '{"model": "tiny", "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}'
echo

log "killing one rank to see a whole-group restart"
kubectl delete pod -n "${NS}" -l "deepspeed.ai/inference=${NAME},deepspeed.ai/group=0,deepspeed.ai/rank=1" --wait=false
kubectl wait -n "${NS}" "dsi/${NAME}" --for=jsonpath='{.status.restarts}'=1 --timeout=5m
kubectl get events -n "${NS}" --field-selector reason=GroupRestart
kubectl wait -n "${NS}" "dsi/${NAME}" --for=jsonpath='{.status.phase}'=Ready --timeout="${TIMEOUT}"

log "OK: end-to-end flow passed"

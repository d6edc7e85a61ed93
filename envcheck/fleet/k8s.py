"""`envcheck fleet k8s`: the DaemonSet / Job manifests (package data, envcheck/data/k8s)
rendered for an image and a namespace, and the fleet table collected from the smoke pods' logs
through the kubernetes client (nodes whose pod is pending, failed or silent are rows with that
status).
"""

from __future__ import annotations

from importlib import resources

import yaml

from envcheck.errors import UnreadableInput
from envcheck.fleet.aggregate import NodeResult, from_report, parse_report

MANIFESTS = resources.files("envcheck") / "data" / "k8s"
KINDS = {"daemonset": "daemonset.yaml", "job": "job.yaml"}
SELECTOR = "app.kubernetes.io/name=envcheck-gpu-smoke"
GPU_NODES = "nvidia.com/gpu.present=true"
CONTAINER = "gpu-smoke"


class KubernetesError(UnreadableInput):
    """No kubeconfig / cluster, or the API refused (one line, with the fix)."""


def render(kind: str, image: str, namespace: str, nodes: int = 1,
           runtime_class: str | None = None) -> str:
    """The manifest for `kind` with image, namespace, (Job) completions and an optional
    runtimeClassName set; YAML text ready for `kubectl apply -f -`."""
    docs = list(yaml.safe_load_all((MANIFESTS / KINDS[kind]).read_text()))
    for doc in docs:
        doc["metadata"]["namespace"] = namespace
        pod = doc["spec"]["template"]["spec"]
        for container in pod["containers"]:
            container["image"] = image
        if runtime_class:
            pod["runtimeClassName"] = runtime_class
        if doc["kind"] == "Job":
            doc["spec"]["completions"] = doc["spec"]["parallelism"] = nodes
    namespace_doc = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
    return yaml.safe_dump_all([namespace_doc, *docs], sort_keys=False)


def core_api():
    """A CoreV1Api from the kubeconfig (or the in-cluster service account)."""
    try:
        from kubernetes import client, config
    except ImportError:
        raise KubernetesError("the kubernetes client is not installed: pip install "
                              "'envcheck[k8s]'") from None
    try:
        config.load_kube_config()
    except Exception:  # noqa: BLE001 — any kubeconfig problem: try in-cluster next
        try:
            config.load_incluster_config()
        except config.ConfigException as error:
            raise KubernetesError(f"no Kubernetes configuration ({error}): set KUBECONFIG or "
                                  "run inside the cluster") from None
    return client.CoreV1Api()


def collect(api, namespace: str) -> list[NodeResult]:
    """One row per smoke pod (by node), plus GPU nodes that have no smoke pod at all."""
    from kubernetes.client.exceptions import ApiException

    try:
        pods = api.list_namespaced_pod(namespace, label_selector=SELECTOR).items
    except ApiException as error:
        raise KubernetesError(f"cannot list pods in {namespace}: {error.status} "
                              f"{error.reason}: check the namespace and your RBAC") from None
    rows = {}
    for pod in pods:
        row = pod_row(api, pod, namespace)
        if row.node not in rows or rows[row.node].status != "reported":
            rows[row.node] = row  # the newest report wins over a stale failed pod
    try:
        nodes = api.list_node(label_selector=GPU_NODES).items
    except ApiException:
        nodes = []  # listing nodes needs a ClusterRole; the pods alone still make the table
    for node in nodes:
        rows.setdefault(node.metadata.name, NodeResult(
            node.metadata.name, "no-report", detail="no envcheck pod on this GPU node "
                                                    "(DaemonSet not scheduled here?)"))
    return list(rows.values())


def pod_row(api, pod, namespace: str) -> NodeResult:
    from kubernetes.client.exceptions import ApiException

    node = pod.spec.node_name or f"(unscheduled) {pod.metadata.name}"
    waiting = _waiting_reason(pod)
    if pod.status.phase == "Pending" or not pod.spec.node_name:
        return NodeResult(node, "pending", detail=waiting or _condition_message(pod))
    try:
        logs = api.read_namespaced_pod_log(pod.metadata.name, namespace, container=CONTAINER)
    except ApiException as error:
        return NodeResult(node, "no-report", detail=f"logs unreadable: {error.reason}")
    report = parse_report(logs)
    if report is not None:
        return from_report(node, report)
    last = next((line for line in reversed(logs.splitlines()) if line.strip()), "")
    return NodeResult(node, "no-report",
                      detail=waiting or f"pod {pod.status.phase}: {last[:200] or 'no output'}")


def _waiting_reason(pod) -> str:
    for status in pod.status.container_statuses or []:
        waiting = status.state and status.state.waiting
        if waiting and waiting.reason:
            return f"{waiting.reason}: {waiting.message or ''}".strip(": ")
    return ""


def _condition_message(pod) -> str:
    for condition in pod.status.conditions or []:
        if condition.status != "True" and condition.message:
            return f"{condition.reason}: {condition.message}"
    return f"pod {pod.status.phase}"

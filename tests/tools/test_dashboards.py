"""The Grafana dashboards shipped in the chart (charts/dsi-operator/dashboards/).

Every metric a dashboard queries must be one the operator or the worker really exposes: the
names are taken from the PromQL of every panel and variable, and checked against the text
``/metrics`` serves (``generate_latest`` of the same registries). The chart must ship the
JSON unchanged in a ConfigMap the Grafana sidecar picks up, and only when asked to.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from test_chart import CHART, by_kind, helm_exe, one, render

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = CHART / "dashboards"
DOC = ROOT / "docs" / "observability.md"
# Which /metrics each dashboard reads: the operator's Deployment or the worker's ingress.
SOURCES = {"dsi-operator.json": "operator", "dsi-worker.json": "worker"}

# PromQL words that look like metric names: aggregations, functions taken without "(" after
# a space ("sum by (x) (...)"), grouping modifiers, set operators and keywords.
_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "inf",
    "nan",
}
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


@pytest.fixture(scope="module")
def helm() -> str:
    return helm_exe()


def load(name: str) -> dict[str, Any]:
    """One dashboard file, parsed."""
    data: dict[str, Any] = json.loads((DASHBOARDS / name).read_text(encoding="utf-8"))
    return data


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    out: list[dict[str, Any]] = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def queries(dash: dict[str, Any]) -> list[str]:
    """The PromQL of every panel target and every query variable (label_values(expr, label)
    contributes its expr)."""
    exprs = [t["expr"] for p in panels(dash) for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.+),\s*\w+\)", q.strip())
        assert m, f"variable {var['name']}: only label_values(<expr>, <label>) is expected: {q}"
        exprs.append(m.group(1))
    return exprs


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions (followed by
    "("), keywords, label matchers, grouping label lists, durations or strings."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings may hold anything
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range durations ($__rate_interval, 5m)
    text = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text
    )  # grouping label lists
    names = set()
    for m in _IDENT.finditer(text):
        word = m.group(0)
        rest = text[m.end() :].lstrip()
        if rest.startswith("(") or word.lower() in _KEYWORDS:
            continue
        if m.start() > 0 and (text[m.start() - 1].isdigit() or text[m.start() - 1] in "$."):
            continue  # 1e3, $variable, 0.99
        names.add(word)
    return names


def exposed(text: str) -> set[str]:
    """The sample names a Prometheus scraping ``text`` can query, from its # TYPE lines.

    Read from the TYPE lines, not from samples: labelled metrics have no sample until
    their first observation, yet they are part of what the endpoint serves."""
    suffixes = {
        "counter": ("",),  # the TYPE line of a counter already names it ..._total
        "gauge": ("",),
        "untyped": ("",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"),
    }
    names = set()
    for m in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.M):
        names.update(m.group(1) + s for s in suffixes.get(m.group(2), ("",)))
    return names


def operator_metrics() -> set[str]:
    """What the operator's /metrics (prometheus_client's default registry) serves."""
    import dsi_operator.runtime.metrics  # noqa: F401  (registers the operator's metrics)

    return exposed(generate_latest(REGISTRY).decode())


def worker_metrics() -> set[str]:
    """What the worker ingress's GET /metrics serves: its Metrics registry."""
    from dsi_worker.metrics import Metrics

    m = Metrics()
    m.track_inflight({0: 0, 1: 0})
    registry: CollectorRegistry = m.registry
    return exposed(generate_latest(registry).decode())


# --- the metric names ------------------------------------------------------------------------


def test_metric_names_are_parsed_from_promql() -> None:
    """The parser itself: functions, keywords, labels, durations and variables are no names."""
    expr = (
        'histogram_quantile(0.99, sum by (le, job) (rate(a_bucket{job=~"$job", x="y z"}'
        "[$__rate_interval]))) / on (job) group_left sum without (pod) (b_total offset 5m) "
        "> 0 and c"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}
    assert metric_names("dsi_groups") == {"dsi_groups"}


def test_exposed_names_follow_the_metric_types() -> None:
    text = generate_latest(_sample_registry()).decode()
    names = exposed(text)
    assert {"t_total", "h_bucket", "h_sum", "h_count", "g"} <= names
    assert "t" not in names and "h" not in names


def _sample_registry() -> CollectorRegistry:
    from prometheus_client import Counter, Gauge, Histogram

    r = CollectorRegistry()
    Counter("t", "a counter", ["l"], registry=r)
    Histogram("h", "a histogram", registry=r)
    Gauge("g", "a gauge", registry=r)
    return r


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_queried_metric_is_exposed(name: str) -> None:
    """A panel over a metric nobody serves is an empty panel nobody notices: fail here."""
    have = operator_metrics() if SOURCES[name] == "operator" else worker_metrics()
    used: set[str] = set()
    for expr in queries(load(name)):
        found = metric_names(expr)
        assert found, f"no metric name in {expr!r}"
        used |= found
    missing = used - have
    assert not missing, f"{name} queries metrics /metrics does not serve: {sorted(missing)}"
    # Each dashboard reads its own component's metrics (prefix dsi_operator_ vs dsi_).
    prefix = "dsi_operator_" if SOURCES[name] == "operator" else "dsi_"
    assert all(u.startswith(prefix) for u in used)


def test_the_dashboards_cover_the_metrics() -> None:
    """Every metric of ours is on some panel, so a new metric gets a panel too."""
    used = {n for name in SOURCES for e in queries(load(name)) for n in metric_names(e)}
    ours = {n for n in operator_metrics() | worker_metrics() if n.startswith("dsi_")}
    # _created: the counters' creation times, not worth a panel.
    ours = {n for n in ours if not n.endswith("_created")}
    # Either a histogram's buckets or its sum and count cover it.
    for base in {n.removesuffix("_bucket") for n in ours if n.endswith("_bucket")}:
        if f"{base}_bucket" in used:
            ours -= {f"{base}_sum", f"{base}_count"}
    assert not ours - used, f"metrics on no panel: {sorted(ours - used)}"


# --- the dashboard JSON ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_dashboard_is_grafana_json(name: str) -> None:
    """The fields Grafana needs to import the file, and a templated Prometheus source."""
    dash = load(name)
    assert dash["uid"] == name.removesuffix(".json")
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    assert dash["title"] and dash["time"]["from"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels(dash):
        pos = p["gridPos"]
        assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] + pos["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and p["description"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"] == p["datasource"], p["title"]


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_panels_do_not_overlap(name: str) -> None:
    cells: dict[tuple[int, int], str] = {}
    for p in panels(load(name)):
        pos = p["gridPos"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


def test_every_panel_is_documented() -> None:
    doc = DOC.read_text(encoding="utf-8")
    for name in SOURCES:
        for p in panels(load(name)):
            assert p["title"] in doc, f"{name}: panel {p['title']!r} not in {DOC.name}"


# --- the chart -------------------------------------------------------------------------------


def test_chart_ships_no_dashboards_by_default(helm: str) -> None:
    objs = render(helm)
    assert not [o for o in by_kind(objs, "ConfigMap") if "dashboards" in o["metadata"]["name"]]


def test_chart_ships_the_dashboards_for_the_sidecar(helm: str) -> None:
    objs = render(helm, "dashboards.enabled=true")
    cm = one(objs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "dsi-system"
    assert set(cm["data"]) == set(SOURCES)
    for name, text in cm["data"].items():
        # Byte for byte: Grafana's {{label}} legends must not go through Helm's templating.
        assert text == (DASHBOARDS / name).read_text(encoding="utf-8")
        assert json.loads(text)["uid"]


def test_dashboards_label_namespace_and_annotations_are_settable(helm: str) -> None:
    objs = render(
        helm,
        values={
            "dashboards": {
                "enabled": True,
                "label": "example.com/dashboard",
                "labelValue": "dsi",
                "namespace": "monitoring",
                "annotations": {"grafana_folder": "DeepSpeed Inference"},
            }
        },
    )
    cm = one(objs, "ConfigMap")
    assert cm["metadata"]["labels"]["example.com/dashboard"] == "dsi"
    assert "grafana_dashboard" not in cm["metadata"]["labels"]
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "DeepSpeed Inference"}


def test_service_monitor_keeps_the_resources_namespace_label(helm: str) -> None:
    """The operator's series name the resource's namespace; the dashboard filters on it."""
    sm = one(render(helm, "metrics.serviceMonitor.enabled=true"), "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True

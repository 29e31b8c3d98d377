"""Every metric the chart's alerts and Grafana dashboard use is one the code exports, with the
labels they select on; docs/metrics.md lists exactly what the code exports.

Worker and operator metrics come from prometheus_client's registry. The queue gauges of
``QueueCollector`` exist only when it reads a Redis, so this module checks them against the
reference's queue section, and ``tests/integration/test_dashboard_metric_names.py`` checks that
section against the collector run on a real Redis.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

import conveyor.metrics
import conveyor_operator.metrics

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "conveyor"
REFERENCE = REPO / "docs" / "metrics.md"
TARGET_LABELS = frozenset(
    {"namespace", "pod", "instance", "job", "service", "endpoint", "container"}
    | {"taskqueue", "worker_class"}  # added by the chart's ServiceMonitor relabelings
)
REQUIRED_ALERTS = {
    "ConveyorBacklogTooOld",
    "ConveyorDeadLettersGrowing",
    "ConveyorNoWorkersForBacklog",
    "ConveyorRedisUnreachable",
}
QUEUE_SECTION = "Queue state"

NAME = re.compile(r"\bconveyor_[a-z0-9_]+\b")
SELECTOR = re.compile(r"\b(conveyor_[a-z0-9_]+)\s*\{([^}]*)\}")
CLAUSE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
REPLACED = re.compile(r'label_replace\(.*?,\s*"(\w+)",\s*"[^"]*",\s*"(\w+)"', re.DOTALL)
LABEL_VALUES = re.compile(r"label_values\((conveyor_\w+)(?:\{[^}]*\})?,\s*(\w+)\)")
LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")
ROW = re.compile(r"^\| `(conveyor_\w+)` \| (\w+) \| ([^|]*) \| .+ \|$")


@dataclass(frozen=True)
class Metric:
    name: str
    """As exposed: counters with ``_total``, histograms by their base name."""
    type: str
    labels: frozenset[str]

    def series(self) -> set[str]:
        if self.type == "histogram":
            return {f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count"}
        return {self.name}


# -- what the code exports -------------------------------------------------------------------------


def registry_metrics() -> dict[str, Metric]:
    """Conveyor's metrics in prometheus_client's default registry, after importing the worker's
    and the operator's metrics modules."""
    labels = {
        wrapper._name: frozenset(wrapper._labelnames)
        for module in (conveyor.metrics, conveyor_operator.metrics)
        for wrapper in vars(module).values()
        if isinstance(wrapper, MetricWrapperBase)
    }
    found = {}
    for family in REGISTRY.collect():
        if family.name.startswith("conveyor_"):
            name = f"{family.name}_total" if family.type == "counter" else family.name
            found[name] = Metric(name, family.type, labels[family.name])
    return found


def reference(section: str | None = None) -> dict[str, Metric]:
    """The tables of docs/metrics.md, all of them or those under headings containing
    ``section``."""
    found = {}
    heading = ""
    for line in REFERENCE.read_text().splitlines():
        if line.startswith("## "):
            heading = line
        row = ROW.match(line)
        if row and (section is None or section in heading):
            names = frozenset(re.findall(r"`(\w+)`", row[3]))
            found[row[1]] = Metric(row[1], row[2], names)
    return found


# -- what the chart uses ---------------------------------------------------------------------------


def values() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return loaded


def alert_rules() -> list[dict[str, Any]]:
    """The PrometheusRule's rules, rendered the way Helm would with the chart's defaults."""
    text = (CHART / "templates" / "prometheusrule.yaml").read_text()
    body = text.split("\nspec:\n", 1)[1].replace('{{ "{{" }}', "{{")
    body = body.replace("{{- end }}", "")

    def lookup(match: re.Match[str]) -> str:
        node: Any = values()
        for key in match[1].split("."):
            node = node[key]
        return str(node)

    body = re.sub(r"\{\{ \.Values\.([\w.]+) \}\}", lookup, body)
    # What is left must be Prometheus's own templating, not a Helm action this reader skipped.
    actions = re.findall(r"\{\{-?\s*([^\s}]+)", body)
    assert all(a.startswith(("$labels.", "$value")) for a in actions), actions
    spec = yaml.safe_load(body)
    return [rule for group in spec["groups"] for rule in group["rules"]]


def _strings(node: Any, keys: set[str]) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in keys and isinstance(value, str):
                yield value
            else:
                yield from _strings(value, keys)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item, keys)


def grafana() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((CHART / "dashboards" / "conveyor.json").read_text())
    return loaded


def queries() -> list[str]:
    """Every PromQL expression of the alerts and the Grafana dashboard."""
    return [rule["expr"] for rule in alert_rules()] + list(
        _strings(grafana(), {"expr", "definition"})
    )


def label_problems(expr: str, known: dict[str, Metric]) -> list[str]:
    """Labels an expression selects, groups or matches on that none of its metrics carries."""
    names = set(NAME.findall(expr))
    usable = set(TARGET_LABELS)
    for name in names:
        metric = next((m for m in known.values() if name in m.series()), None)
        if metric is not None:
            usable |= metric.labels | ({"le"} if metric.type == "histogram" else set())
    usable |= {dst for dst, _ in REPLACED.findall(expr)}
    problems = []
    for name, matchers in SELECTOR.findall(expr):
        metric = next((m for m in known.values() if name in m.series()), None)
        allowed = TARGET_LABELS | (metric.labels if metric else frozenset())
        for matcher in filter(None, (m.strip() for m in matchers.split(","))):
            label = re.split(r"=~|!~|!=|=", matcher)[0].strip()
            if label not in allowed:
                problems.append(f"{name}{{{label}}} in {expr!r}")
    for clause in CLAUSE.findall(expr):
        for label in filter(None, (c.strip() for c in clause.split(","))):
            if label not in usable:
                problems.append(f"({label}) in {expr!r}")
    for name, label in LABEL_VALUES.findall(expr):
        if label not in usable:
            problems.append(f"label_values({name}, {label})")
    return problems


# -- the tests -------------------------------------------------------------------------------------


def test_every_metric_the_alerts_and_grafana_use_is_exported() -> None:
    exported = {
        s for m in (*registry_metrics().values(), *reference().values()) for s in m.series()
    }
    used = {name for expr in queries() for name in NAME.findall(expr)}
    assert used, "no conveyor_* metric found in the rules or the dashboard"
    unknown = used - exported
    assert not unknown, f"used but never exported: {sorted(unknown)}"
    from_collector = used - {s for m in registry_metrics().values() for s in m.series()}
    assert from_collector <= {s for m in reference(QUEUE_SECTION).values() for s in m.series()}


def test_alerts_and_grafana_select_only_labels_their_metrics_carry() -> None:
    known = {**registry_metrics(), **reference(QUEUE_SECTION)}
    problems = [p for expr in queries() for p in label_problems(expr, known)]
    for target in _panel_targets(grafana()):
        names = set(NAME.findall(target["expr"]))
        carried = set(TARGET_LABELS).union(
            *(m.labels for m in known.values() if names & m.series())
        )
        for label in LEGEND.findall(target.get("legendFormat", "")):
            if label not in carried:
                problems.append(f"legend {{{{{label}}}}} of {target['expr']!r}")
    assert not problems, "\n".join(problems)


def _panel_targets(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if "expr" in node and "refId" in node:
            yield node
        for value in node.values():
            yield from _panel_targets(value)
    elif isinstance(node, list):
        for item in node:
            yield from _panel_targets(item)


def test_the_label_checker_catches_a_wrong_label() -> None:
    known = registry_metrics()
    wrong = 'sum by (tenant) (rate(conveyor_jobs_completed_total{job_id="1"}[5m]))'
    assert len(label_problems(wrong, known)) == 2
    right = 'sum by (priority) (rate(conveyor_jobs_completed_total{job_type="x"}[5m]))'
    assert label_problems(right, known) == []


def test_the_rules_cover_each_required_condition() -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} >= REQUIRED_ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
    redis_rule = next(r for r in rules if r["alert"] == "ConveyorRedisUnreachable")
    assert "conveyor_redis_up" in redis_rule["expr"]
    assert "== 0" in redis_rule["expr"]


def test_grafana_panels_have_unique_ids_and_a_datasource() -> None:
    board = grafana()
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]


def test_the_reference_lists_every_registered_metric_with_its_type_and_labels() -> None:
    registered = registry_metrics()
    documented = {k: v for k, v in reference().items() if k not in reference(QUEUE_SECTION)}
    assert documented == registered

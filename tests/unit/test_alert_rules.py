"""monitoring/qdb_alerts.yml: seed 003's alert rules over the exporter's metric names.

Every rule's expression may only use sample names the Prometheus exporter
exports (``qdb_client.prometheus.exported_names()``, which
tests/unit/test_exporters.py proves equal to what a live collector yields)
and, in label matchers and groupings, only the labels it exports. Every rule
has ``for``, a severity label and annotations. With ``promtool`` on the PATH
the file is also checked by Prometheus itself, and each rule is shown to
fire on series shaped like the exporter's.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from qdb_client.prometheus import METRICS, exported_names

RULES = Path(__file__).resolve().parents[2] / "monitoring" / "qdb_alerts.yml"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "observability.md"

#: Seed 003's alerts: rule -> (the comparison its expression ends with, severity).
SEED_ALERTS = {
    "QdbHighTimeoutRate": ("> 0.05", "warning"),
    "QdbHighRetryRate": ("> 0.1", "warning"),
    "QdbCircuitBreakerOpen": ("== 1", "critical"),
    "QdbBulkheadRejections": ("> 100", "warning"),
    "QdbHighSagaCompensationRate": ("> 0.05", "warning"),
}

#: Labels Prometheus attaches to every scraped series.
TARGET_LABELS = {"job", "instance"}

_PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
_IDENTIFIER = re.compile(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")


def load_rules() -> list[dict[str, Any]]:
    yaml = pytest.importorskip("yaml", reason="pyyaml is not installed (in the test extra)")
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (functions and keywords left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    return {
        name for name, call in _IDENTIFIER.findall(text) if not call and name not in _PROMQL_WORDS
    }


def labels_of(metric: str) -> set[str]:
    """The labels the exporter puts on a sample name."""
    for spec in METRICS:
        suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_count"]}
        suffixes["histogram"].append("_sum")
        for suffix in suffixes[spec.kind]:
            if metric == spec.name + suffix:
                extra = {"le"} if suffix == "_bucket" else set()
                return set(spec.labels) | extra
    raise AssertionError(f"{metric} is not exported")


def test_the_metric_name_scanner_sees_names_and_skips_functions_and_labels():
    expr = 'sum by (job) (rate(a_total{kind="x"}[5m])) / on (job) max(b) > 0.1 and c'
    assert metric_names(expr) == {"a_total", "b", "c"}


def test_every_rule_uses_only_exported_metric_names_and_labels():
    exported = exported_names()
    rules = load_rules()
    assert rules
    for rule in rules:
        expr = rule["expr"]
        names = metric_names(expr)
        assert names, f"{rule['alert']}: no metric in {expr!r}"
        unknown = names - exported
        assert not unknown, f"{rule['alert']} uses metrics the exporter never exports: {unknown}"
        for metric, matchers in _SELECTOR.findall(expr):
            used = set(_MATCHER.findall(matchers))
            assert used <= labels_of(metric), f"{rule['alert']}: {metric} has no {used}"
        for grouping in _GROUPING.findall(expr):
            grouped = {label.strip() for label in grouping.split(",") if label.strip()}
            allowed = TARGET_LABELS.union(*(labels_of(name) for name in names))
            assert grouped <= allowed, f"{rule['alert']}: groups by {grouped - allowed}"


def test_every_rule_has_for_labels_and_annotations():
    for rule in load_rules():
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: no valid 'for'"
        assert rule.get("labels", {}).get("severity") in {"warning", "critical"}, name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), name


def test_seed_003s_five_alerts_are_there_with_their_thresholds():
    rules = {rule["alert"]: rule for rule in load_rules()}
    for name, (comparison, severity) in SEED_ALERTS.items():
        assert name in rules, f"seed 003's {name} is missing"
        assert rules[name]["expr"].strip().endswith(comparison), name
        assert rules[name]["labels"]["severity"] == severity


def test_docs_list_every_alert_rule():
    text = DOCS.read_text(encoding="utf-8")
    for rule in load_rules():
        assert f"`{rule['alert']}`" in text, f"docs/observability.md misses {rule['alert']}"


# ------------------------------------------------------------------ promtool

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not on the PATH")

#: Series shaped like the exporter's (one scrape target), and the alerts they must raise.
PROMTOOL_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'qdb_requests_total{{job="app",instance="a"}}'
        values: '0+100x20'
      - series: 'qdb_request_timeouts_total{{job="app",instance="a",kind="deadline"}}'
        values: '0+10x20'
      - series: 'qdb_request_timeouts_total{{job="app",instance="a",kind="attempt"}}'
        values: '0+90x20'
      - series: 'qdb_retries_total{{job="app",instance="a"}}'
        values: '0+20x20'
      - series: 'qdb_breaker_open{{job="app",instance="a",node="n:1"}}'
        values: '1x20'
      - series: 'qdb_bulkhead_rejections_total{{job="app",instance="a"}}'
        values: '0+50x20'
      - series: 'qdb_sagas_total{{job="app",instance="a",status="completed"}}'
        values: '0+8x20'
      - series: 'qdb_sagas_total{{job="app",instance="a",status="compensated"}}'
        values: '0+2x20'
      - series: 'qdb_sagas_total{{job="app",instance="a",status="failed"}}'
        values: '0x20'
    alert_rule_test:
{expectations}
"""


@needs_promtool
def test_promtool_accepts_the_rules():
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_each_seed_alert_fires_on_series_shaped_like_the_exporters(tmp_path: Path):
    firing = {
        "QdbHighTimeoutRate": {"job": "app", "instance": "a"},  # 10% > 5% (attempts don't count)
        "QdbHighRetryRate": {"job": "app", "instance": "a"},  # 20% > 10%
        "QdbCircuitBreakerOpen": {"job": "app", "instance": "a", "node": "n:1"},
        "QdbBulkheadRejections": {"job": "app", "instance": "a"},  # 250 in 5 min
        "QdbHighSagaCompensationRate": {"job": "app", "instance": "a"},  # 20%
    }
    lines = []
    for name, labels in [*firing.items(), ("QdbSagaCompensationFailed", None)]:
        lines += ["      - eval_time: 20m", f"        alertname: {name}", "        exp_alerts:"]
        if labels is not None:
            rule = next(r for r in load_rules() if r["alert"] == name)
            exp = {**labels, "severity": rule["labels"]["severity"]}
            rendered = ", ".join(f'{k}: "{v}"' for k, v in exp.items())
            lines.append(f"          - exp_labels: {{{rendered}}}")
        else:
            lines[-1] += " []"
    # The rules as they are, less their annotations (what fires is the point here).
    yaml = pytest.importorskip("yaml", reason="pyyaml is not installed (in the test extra)")
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    for group in document["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules = tmp_path / "qdb_alerts.yml"
    rules.write_text(yaml.safe_dump(document))
    spec = tmp_path / "qdb_alerts_test.yml"
    spec.write_text(PROMTOOL_TESTS.format(rules=rules, expectations="\n".join(lines)))
    result = subprocess.run(
        [PROMTOOL, "test", "rules", str(spec)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr

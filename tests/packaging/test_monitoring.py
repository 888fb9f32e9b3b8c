"""Alert rules and the Grafana dashboard: valid for the real promtool, unit-tested alert by alert,
and querying only metrics the trainer and the operator actually export."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from finetune_api import contract
from packaging_support import MONITORING, REPO, run

RULES = MONITORING / "finetune-rules.yaml"
DASHBOARD = MONITORING / "dashboard.json"
UNIT_TESTS = sorted((MONITORING / "tests").glob("*.yaml"))
# PromQL words that look like metric names but are not.
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
                "and", "or", "unless", "le", "inf", "nan"}


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", var["query"]["query"])
            assert match, f"unexpected variable query {var['query']}"
            exprs.append(match.group(1))
    return exprs


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers outside label matchers and grouping
    clauses that are not functions (followed by a parenthesis) or keywords."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\boffset\s+\w+", "", expr)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        following = expr[match.end():].lstrip()
        if following.startswith("(") or match.group() in PROMQL_WORDS:
            continue
        names.add(match.group())
    return names


def trainer_metrics() -> set[str]:
    return {v for k, v in vars(contract).items() if k.startswith("METRIC_")}


def operator_metrics() -> set[str]:
    """Every series name the operator exposes, from the constants and metric objects of
    operator/finetune_operator/metrics.py (histograms add _bucket/_sum/_count)."""
    pytest.importorskip("prometheus_client", reason="the operator extra is not installed")
    sys.path.insert(0, str(REPO / "operator"))
    from prometheus_client import Histogram  # noqa: PLC0415

    from finetune_operator import metrics  # noqa: PLC0415

    names = {v for v in vars(metrics).values()
             if isinstance(v, str) and v.startswith("finetune_operator_")}
    for value in vars(metrics).values():
        if isinstance(value, Histogram):
            base = value._name  # noqa: SLF001  (prometheus_client keeps the name here)
            assert base in names, f"histogram {base} has no name constant"
            names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    return names


def test_metric_name_extraction():
    assert metric_names('sum by (phase) (rate(a_total{x="y"}[5m])) / on (ns) b offset 5m') == \
        {"a_total", "b"}
    assert metric_names("histogram_quantile(0.95, sum by (le) (rate(h_bucket[5m])))") == \
        {"h_bucket"}


def test_every_queried_metric_is_exported():
    exported = trainer_metrics() | operator_metrics() | {"up"}
    queries = [r["expr"] for r in alert_rules()] + dashboard_queries()
    for expr in queries:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= exported, f"{expr!r} queries {sorted(names - exported)}, not exported"


def test_dashboard_covers_training_and_operator():
    used = set().union(*(metric_names(e) for e in dashboard_queries()))
    for metric in (contract.METRIC_TRAIN_LOSS, contract.METRIC_VAL_ACCURACY,
                   contract.METRIC_IMAGES_PER_SECOND, contract.METRIC_GPU_MEMORY,
                   contract.METRIC_GPU_UTILIZATION, contract.METRIC_STEPS):
        assert metric in used, f"the dashboard does not show {metric}"
    assert any(name.startswith("finetune_operator_jobs") for name in used)


def test_dashboard_is_importable_grafana_json():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "finetunejob"} <= variables
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        # Per-job panels filter by the labels the PodMonitor adds.
        for target in panel["targets"]:
            if any(n in trainer_metrics() for n in metric_names(target["expr"])):
                assert 'finetunejob=~"$finetunejob"' in target["expr"], target["expr"]


def test_dashboard_queries_are_valid_promql(promtool, tmp_path):
    """promtool has no bare parser: check the dashboard's queries as recording rules."""
    rules = [{"record": f"dashboard:query_{i}", "expr": expr.replace("$", "x")}
             for i, expr in enumerate(dashboard_queries())]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules(promtool):
    result = run([promtool, "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


@pytest.mark.parametrize("unit_test", UNIT_TESTS, ids=lambda p: p.name)
def test_promtool_unit_tests(promtool, unit_test: Path):
    result = run([promtool, "test", "rules", str(unit_test)], cwd=unit_test.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_silent_unit_test():
    fires, silent = set(), set()
    for path in UNIT_TESTS:
        spec = yaml.safe_load(path.read_text())
        assert spec["rule_files"] == ["../finetune-rules.yaml"]
        for case in spec["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    alerts = {r["alert"] for r in alert_rules()}
    assert alerts <= fires, f"alerts never shown to fire: {sorted(alerts - fires)}"
    assert alerts <= silent, f"alerts never shown to stay silent: {sorted(alerts - silent)}"


def test_every_alert_is_documented():
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]

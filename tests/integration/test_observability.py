"""Alert rules, dashboards and metrics, proven with promtool and a real Prometheus server."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.metrics import Metrics
from tests.conftest import ROOT, USERS, make_config
from tests.integration.gateway_proc import GatewayProcess, free_port

pytestmark = pytest.mark.integration

OBS = ROOT / "docs" / "observability"
RULES = OBS / "rules" / "mcp-gateway.rules.yml"
DASHBOARDS = sorted((OBS / "dashboards").glob("*.json"))
DOC = ROOT / "docs" / "observability.md"


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is missing: `make sysdeps` installs Debian's prometheus"
    return path


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def rules_doc() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return doc


def alerts() -> list[dict[str, Any]]:
    return [r for g in rules_doc()["groups"] for r in g["rules"] if "alert" in r]


def dashboard_exprs() -> Iterator[tuple[str, str, str]]:
    """(dashboard file, panel title, PromQL) of every panel target."""
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                yield path.name, panel["title"], target["expr"]


# --- rules ------------------------------------------------------------------------------


def test_rules_pass_promtool_check() -> None:
    """Every rule parses and is well formed."""
    out = promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_has_a_unit_test_and_the_tests_pass() -> None:
    """promtool test rules: each alert fires on bad series and stays silent on healthy ones."""
    tests = yaml.safe_load((RULES.parent / "mcp-gateway.rules.test.yml").read_text())
    tested = {
        case["alertname"]
        for t in tests["tests"]
        for case in t.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    assert {a["alert"] for a in alerts()} <= tested
    out = promtool("test", "rules", "mcp-gateway.rules.test.yml", cwd=RULES.parent)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_links_to_its_runbook_section() -> None:
    """runbook_url points at a heading of docs/observability.md that exists."""
    headings = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in DOC.read_text().splitlines()
        if line.startswith("#")
    }
    for alert in alerts():
        url = alert["annotations"]["runbook_url"]
        page, _, anchor = url.partition("#")
        assert page == "docs/observability.md", url
        assert anchor in headings, f"{alert['alert']}: no section #{anchor}"
        assert alert["labels"]["severity"] in ("warning", "critical")


def test_scrape_config_example_is_valid() -> None:
    """The documented prometheus.yml loads (with its rule file)."""
    out = promtool("check", "config", str(OBS / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr


# --- dashboards ---------------------------------------------------------------------------


def test_dashboards_are_grafana_documents() -> None:
    """Three dashboards with unique uids and panel ids, a datasource variable, targets."""
    assert [p.stem for p in DASHBOARDS] == ["overview", "performance", "security"]
    uids = set()
    for path in DASHBOARDS:
        doc = json.loads(path.read_text())
        uids.add(doc["uid"])
        ids = [p["id"] for p in doc["panels"]]
        assert len(ids) == len(set(ids)), path.name
        variables = {v["name"] for v in doc["templating"]["list"]}
        assert {"datasource", "pair"} <= variables, path.name
        for panel in doc["panels"]:
            assert panel["targets"], (path.name, panel["title"])
    assert len(uids) == len(DASHBOARDS)


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    """Each panel's PromQL (with $pair filled in) parses: promtool checks it as a rule."""
    exprs = list(dashboard_exprs())
    assert len(exprs) >= 20
    rules = {
        "groups": [
            {
                "name": "dashboards",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": expr.replace("$pair", ".*")}
                    for i, (_, _, expr) in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboards.rules.yml"
    path.write_text(yaml.safe_dump(rules))
    out = promtool("check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr


def _exported_sample_names() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def test_rules_and_dashboards_only_use_metrics_the_gateway_exports() -> None:
    """No rule or panel refers to a gateway metric that does not exist (typos, renames)."""
    exported = _exported_sample_names()
    rule_exprs = [r["expr"] for g in rules_doc()["groups"] for r in g["rules"]]
    text = "\n".join(rule_exprs + [expr for _, _, expr in dashboard_exprs()])
    used = set(re.findall(r"\bmcp_[a-z_]+\b", text))
    assert used, "no gateway metric referenced"
    assert used <= exported, sorted(used - exported)


def test_metric_names_and_labels_follow_conventions() -> None:
    """mcp_ prefix, bounded label names only, no identifiers as labels."""
    allowed = {"transport", "method", "code", "action", "result", "engine", "state"}
    allowed |= {"check", "role", "kind", "version", "policy_engine", "le"}
    for family in Metrics().registry.collect():
        assert family.name.startswith("mcp_"), family.name
        for sample in family.samples:
            assert set(sample.labels) <= allowed, (family.name, sample.labels)


# --- a real Prometheus ------------------------------------------------------------------------


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayProcess]:
    state = tmp_path / "state"
    state.mkdir()
    gw = GatewayProcess(make_config(state), tmp_path)
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


def _query(port: int, promql: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


@pytest.mark.slow
def test_prometheus_scrapes_a_gateway_and_evaluates_the_rules(
    gateway: GatewayProcess, tmp_path: Path
) -> None:
    """A real Prometheus scrapes /metrics of a running gateway; recording rules evaluate."""
    token = USERS["alice"][0]
    for _ in range(3):
        request = urllib.request.Request(  # noqa: S310 (loopback)
            gateway.url + "/v1/commands",
            data=json.dumps({"command": "echo", "args": ["hi"], "wait": True}).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310
            assert resp.status == 200
    with urllib.request.urlopen(gateway.url + "/ready", timeout=30):  # noqa: S310
        pass
    rules = tmp_path / "rules.yml"
    shutil.copy(RULES, rules)
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(rules)],
                "scrape_configs": [
                    {
                        "job_name": "mcp-gateway",
                        "static_configs": [
                            {
                                "targets": [f"127.0.0.1:{gateway.port}"],
                                "labels": {"pair": "lab"},
                            }
                        ],
                    }
                ],
            }
        )
    )
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 60
        up: list[dict[str, Any]] = []
        rate: list[dict[str, Any]] = []
        saturation: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            time.sleep(1)
            try:
                up = _query(port, 'up{job="mcp-gateway"}')
                rate = _query(port, 'mcp:api_requests:rate5m{transport="rest"}')
                saturation = _query(port, "mcp:tasks:saturation")
            except OSError:
                continue
            if up and rate and saturation:
                break
        assert up, (tmp_path / "prometheus.log").read_text()[-2000:]
        assert up[0]["value"][1] == "1", up
        assert rate, (tmp_path / "prometheus.log").read_text()[-2000:]
        assert rate[0]["metric"]["pair"] == "lab"
        assert float(rate[0]["value"][1]) >= 0
        assert float(saturation[0]["value"][1]) == 0.0  # idle gateway
        ready = _query(port, 'mcp_ready{check="all"}')
        assert ready, ready
        assert ready[0]["value"][1] == "1", ready
        builds = _query(port, "mcp_build_info")
        assert builds[0]["metric"]["policy_engine"] == "embedded"
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()

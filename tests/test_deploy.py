"""The deployment files: every Grafana panel queries a metric the server exports; the compose file, the
Kubernetes manifest and the Dockerfile probe the server's real /ready and /health routes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import yaml

from slmforge.generate import Completion
from slmforge.serve import create_app

from conftest import LiveServer

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


class Echo:
    def complete(self, prompt, params):
        return [Completion("ok", 1, "stop")]

    def chat(self, messages, params):
        return [Completion("ok", 1, "stop")]

    def stream(self, prompt, params):
        yield "ok"

    def complete_batch(self, prompts, params):
        return [self.complete(p, params) for p in prompts]


def _exported() -> tuple[set[str], set[str]]:
    """The metric families of a live server's /metrics (after one request), and the paths it answers."""
    app = create_app({"echo": Echo()})
    with LiveServer(app) as url:
        httpx.post(f"{url}/v1/chat/completions", json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]})
        text = httpx.get(f"{url}/metrics").text
        paths = {p for p in ("/health", "/ready", "/metrics") if httpx.get(f"{url}{p}").status_code == 200}
    return set(re.findall(r"^# TYPE (\w+) ", text, re.M)), paths


def test_every_dashboard_query_names_an_exported_metric():
    families, paths = _exported()
    dashboard = json.loads((DEPLOY / "grafana" / "slmforge-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 9 and {p["id"] for p in dashboard["panels"]} == set(range(1, len(dashboard["panels"]) + 1))
    used = set()
    for expr in exprs:
        for name in re.findall(r"\bslmforge_\w+", expr):
            family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in families else name
            assert family in families, f"{name} in {expr!r} is not exported; the server exports {sorted(families)}"
            used.add(family)
    assert used == families  # and every exported family has a panel
    assert {"/health", "/ready"} <= paths


def test_the_orchestration_files_probe_real_routes():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert "/ready" in " ".join(compose["services"]["slmforge"]["healthcheck"]["test"])
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()))
    container = docs[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["args"][:2] == ["slmforge", "serve"] and "--api-keys" in container["args"]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in dockerfile and "/ready" in dockerfile
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert prometheus["scrape_configs"][0]["metrics_path"] == "/metrics"

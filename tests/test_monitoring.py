"""Issue 15: the ops tools, pointed at a live worker for real.

* Flower 2 (through ``thinfleet.flower``, with basic auth) against the fleet: its authenticated
  API shows a routed ticket as SUCCESS and a dead-lettered one as FAILURE with the reason, the
  producer's task-sent events, and answers 401 without credentials.
* Debian's Prometheus scraping the live worker: every dashboard query (Grafana's
  ``$__rate_interval`` substituted) returns data that is not only NaN.
* ``promtool test rules``: each alert fires when it should (``helm/.../alerts.test.yaml``).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer import Producer
from thinfleet import devstack

CHART = Path(__file__).parent.parent / "helm" / "thinfleet"
pytestmark = pytest.mark.fleet


def get_json(url: str, auth: str | None = None, timeout_s: float = 5) -> object:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def wait_http(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except urllib.error.HTTPError:
            return  # it answers (401 is an answer)
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(url)


@pytest.fixture()
def flower(fleet: devstack.WorkerProcess, redis_url: str, tmp_path: Path) -> Iterator[str]:
    port = devstack.free_port()
    log = (tmp_path / "flower.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "thinfleet.flower", f"--port={port}", "--address=127.0.0.1",
         "--persistent=False"],
        env={**os.environ, "THINFLEET_REDIS_URL": redis_url, "FLOWER_BASIC_AUTH": "ops:s3cret"},
        stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthcheck")
        time.sleep(1.0)  # Flower subscribes to the event stream after it serves
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(20)


def test_flower_refuses_to_start_without_authentication() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    proc = subprocess.run([sys.executable, "-m", "thinfleet.flower", "--port=1"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "FLOWER_BASIC_AUTH" in proc.stderr


def test_flower_shows_routed_as_success_and_dead_lettered_as_failure(
        flower: str, producer: Producer) -> None:
    routed = producer.submit({"ticket_id": "flower-ok", "text": "Where is my new card?"})
    rejected = producer.celery.send_task(
        "thinfleet.route_ticket", args=[{"ticket_id": "flower-bad", "text": "   "}],
        queue="thinfleet.route").id
    with pytest.raises(urllib.error.HTTPError) as caught:
        get_json(f"{flower}/api/tasks")
    assert caught.value.code == 401
    deadline = time.monotonic() + 60
    tasks: dict = {}
    while time.monotonic() < deadline:
        tasks = get_json(f"{flower}/api/tasks", auth="ops:s3cret")  # type: ignore[assignment]
        states = {t: tasks.get(t, {}).get("state") for t in (routed.task_id, rejected)}
        if states == {routed.task_id: "SUCCESS", rejected: "FAILURE"}:
            break
        time.sleep(0.5)
    assert tasks[routed.task_id]["state"] == "SUCCESS"
    assert tasks[routed.task_id]["sent"], "no task-sent event from the producer"
    assert tasks[rejected]["state"] == "FAILURE"
    assert "dead-lettered (invalid_ticket)" in tasks[rejected]["exception"]


# ---- Prometheus ---------------------------------------------------------------------------

def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((CHART / "files" / "dashboards" / "thinfleet.json").read_text())
    return [(panel["title"], target["expr"].replace("$__rate_interval", "1m"))
            for panel in dashboard["panels"] for target in panel.get("targets", [])]


def query(base: str, expr: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = get_json(url)
    assert isinstance(body, dict) and body["status"] == "success", body
    return body["data"]["result"]  # type: ignore[no-any-return]


def has_data(result: list[dict]) -> bool:
    return any(sample["value"][1] not in ("NaN", "+Inf", "-Inf") for sample in result)


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="scripts/bootstrap-debian.sh "
                    "installs Debian's prometheus")
def test_every_dashboard_query_returns_data_from_a_live_worker(
        fleet: devstack.WorkerProcess, producer: Producer, metrics_port: int,
        tmp_path: Path) -> None:
    port = devstack.free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: thinfleet\n    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n")
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/-/ready")
        # Scraping starts after target discovery (seconds after /-/ready): wait for the first
        # samples, and a few more, before the traffic, so that rate() sees the counters move.
        deadline = time.monotonic() + 60
        while not query(base, 'up{job="thinfleet"} == 1') and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(3)
        for i in range(6):
            producer.route({"ticket_id": f"prom-{i}", "text": "I was charged twice"},
                           timeout_s=60)
        producer.celery.send_task("thinfleet.route_ticket",
                                  args=[{"ticket_id": "prom-bad", "text": " "}],
                                  queue="thinfleet.route")
        producer.submit({"ticket_id": "prom-last", "text": "top up failed"})
        time.sleep(5)
        empty = [(title, expr) for title, expr in dashboard_queries()
                 if not has_data(query(base, expr))]
    finally:
        proc.terminate()
        proc.wait(20)
    assert len(dashboard_queries()) >= 20
    assert empty == [], f"dashboard queries with no data: {empty}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="scripts/bootstrap-debian.sh "
                    "installs Debian's prometheus (promtool)")
def test_alert_rules_fire_as_documented(tmp_path: Path) -> None:
    for name in ("alerts.yaml", "alerts.test.yaml"):
        shutil.copy(CHART / "files" / name, tmp_path / name)
    checked = subprocess.run(["promtool", "check", "rules", "alerts.yaml"], cwd=tmp_path,
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(["promtool", "test", "rules", "alerts.test.yaml"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    alerts = set(re.findall(r"alert: (\w+)", (CHART / "files" / "alerts.yaml").read_text()))
    covered = set(re.findall(r"alertname: (\w+)",
                             (CHART / "files" / "alerts.test.yaml").read_text()))
    assert alerts <= covered, f"alerts without a promtool test: {alerts - covered}"

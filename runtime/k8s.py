"""Kubernetes manifests for running feedrank beyond one machine, generated from feedrank.toml.

`feedrank k8s render` writes ``deploy/k8s/feedrank.yaml`` (committed; ``runtime/k8s_test.py`` checks
it is what the configuration renders, and validates it offline):

- the FeedService: a Deployment (the gRPC port with Kubernetes' native gRPC readiness probe on our
  health service, the HTTP API, Prometheus), a Service, a HorizontalPodAutoscaler on CPU;
- Redis: a StatefulSet with a volume and its Service (one node; shard with Redis Cluster beyond it);
- Kafka: Strimzi ``Kafka`` (KRaft) + ``KafkaNodePool`` + the engagement ``KafkaTopic``;
- the streaming jobs (feature job, online learner, lake job): Flink Kubernetes Operator
  ``FlinkDeployment``s running the PyFlink entry point in application mode;
- the batch tier: a CronJob for the daily cycle (batch features, training set, retraining, shadow).

Keys are not in the manifests: they come from a Secret (``k8s.secret``) the operator creates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.config import Config

STREAMING_JOBS = {"features": "jobs/feature_job.py", "learner": "jobs/learner.py", "lake": "jobs/lake.py"}
KEY_ENV = {"FEEDRANK_SERVING_JWT_SECRET": "jwt_secret", "FEEDRANK_SERVING_CURSOR_SECRET": "cursor_secret"}


def _labels(app: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": app, "app.kubernetes.io/part-of": "feedrank"}


def _env(cfg: Config) -> list[dict[str, Any]]:
    k = cfg.k8s
    topic = cfg.events.uri.rsplit("/", 1)[-1]
    env = [{"name": "FEEDRANK_REDIS", "value": f"redis://redis.{k.namespace}.svc:6379/0"},
           {"name": "FEEDRANK_EVENTS", "value": f"kafka://feedrank-kafka-bootstrap.{k.namespace}.svc:9092/{topic}"},
           {"name": "FEEDRANK_MODEL_STORE", "value": k.model_store_uri},
           {"name": "FEEDRANK_LAKE_URI", "value": k.lake_uri}]
    env += [{"name": name, "valueFrom": {"secretKeyRef": {"name": k.secret, "key": key}}} for name, key in KEY_ENV.items()]
    return env


def feed_service(cfg: Config) -> list[dict[str, Any]]:
    k, s = cfg.k8s, cfg.serving
    ports = [{"name": "grpc", "containerPort": s.port}, {"name": "http", "containerPort": s.http_port or 8080},
             {"name": "metrics", "containerPort": s.metrics_port}]
    container = {
        "name": "feedservice", "image": k.image,
        "args": ["serve", "--workers", "1"],  # one worker per pod: the HPA adds pods, Kubernetes spreads connections
        "env": _env(cfg) + [{"name": "FEEDRANK_SERVING_HOST", "value": "0.0.0.0"}],
        "ports": ports,
        "resources": {"requests": {"cpu": k.serving_cpu, "memory": k.serving_memory},
                      "limits": {"memory": k.serving_memory}},
        "readinessProbe": {"grpc": {"port": s.port}, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"grpc": {"port": s.port}, "initialDelaySeconds": 120, "periodSeconds": 20},
        "startupProbe": {"grpc": {"port": s.port}, "periodSeconds": 10, "failureThreshold": 60},
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "feedservice", "namespace": k.namespace, "labels": _labels("feedservice")},
        "spec": {"replicas": k.serving_replicas, "selector": {"matchLabels": _labels("feedservice")},
                 "template": {"metadata": {"labels": _labels("feedservice"),
                                           "annotations": {"prometheus.io/scrape": "true",
                                                           "prometheus.io/port": str(s.metrics_port)}},
                              "spec": {"containers": [container], "terminationGracePeriodSeconds": 30}}},
    }
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "feedservice", "namespace": k.namespace, "labels": _labels("feedservice")},
        "spec": {"selector": _labels("feedservice"),
                 "ports": [{"name": p["name"], "port": p["containerPort"], "targetPort": p["name"]} for p in ports]},
    }
    hpa = {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "feedservice", "namespace": k.namespace},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "feedservice"},
                 "minReplicas": k.serving_replicas, "maxReplicas": k.serving_max_replicas,
                 "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
                     "type": "Utilization", "averageUtilization": k.serving_cpu_target_percent}}}]},
    }
    return [deployment, service, hpa]


def redis(cfg: Config) -> list[dict[str, Any]]:
    k = cfg.k8s
    return [
        {"apiVersion": "apps/v1", "kind": "StatefulSet",
         "metadata": {"name": "redis", "namespace": k.namespace, "labels": _labels("redis")},
         "spec": {"serviceName": "redis", "replicas": 1, "selector": {"matchLabels": _labels("redis")},
                  "template": {"metadata": {"labels": _labels("redis")}, "spec": {"containers": [{
                      "name": "redis", "image": k.redis_image, "args": ["--appendonly", "yes"],
                      "ports": [{"name": "redis", "containerPort": 6379}],
                      "resources": {"requests": {"cpu": "1", "memory": k.redis_memory},
                                    "limits": {"memory": k.redis_memory}},
                      "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]}},
                  "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {
                      "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": k.redis_storage}}}}]}},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "redis", "namespace": k.namespace, "labels": _labels("redis")},
         "spec": {"selector": _labels("redis"), "ports": [{"name": "redis", "port": 6379, "targetPort": "redis"}]}},
    ]


def kafka(cfg: Config) -> list[dict[str, Any]]:
    k, e = cfg.k8s, cfg.events
    replicas = min(3, k.kafka_brokers)
    return [
        {"apiVersion": "kafka.strimzi.io/v1beta2", "kind": "KafkaNodePool",
         "metadata": {"name": "dual-role", "namespace": k.namespace, "labels": {"strimzi.io/cluster": "feedrank"}},
         "spec": {"replicas": k.kafka_brokers, "roles": ["controller", "broker"],
                  "storage": {"type": "persistent-claim", "size": k.kafka_storage, "deleteClaim": False}}},
        {"apiVersion": "kafka.strimzi.io/v1beta2", "kind": "Kafka",
         "metadata": {"name": "feedrank", "namespace": k.namespace,
                      "annotations": {"strimzi.io/node-pools": "enabled", "strimzi.io/kraft": "enabled"}},
         "spec": {"kafka": {"version": k.kafka_version, "listeners": [
                      {"name": "plain", "port": 9092, "type": "internal", "tls": False}],
                      "config": {"offsets.topic.replication.factor": replicas,
                                 "transaction.state.log.replication.factor": replicas,
                                 "transaction.state.log.min.isr": max(1, replicas - 1),
                                 "min.insync.replicas": max(1, replicas - 1)}},
                  "entityOperator": {"topicOperator": {}}}},
        {"apiVersion": "kafka.strimzi.io/v1beta2", "kind": "KafkaTopic",
         "metadata": {"name": e.uri.rsplit("/", 1)[-1], "namespace": k.namespace,
                      "labels": {"strimzi.io/cluster": "feedrank"}},
         "spec": {"partitions": k.kafka_partitions, "replicas": replicas,
                  "config": {"retention.ms": e.kafka_retention_ms}}},
    ]


def flink_jobs(cfg: Config) -> list[dict[str, Any]]:
    k, f = cfg.k8s, cfg.flink
    out = []
    for name, path in STREAMING_JOBS.items():
        out.append({
            "apiVersion": "flink.apache.org/v1beta1", "kind": "FlinkDeployment",
            "metadata": {"name": f"feedrank-{name}", "namespace": k.namespace, "labels": _labels(f"flink-{name}")},
            "spec": {"image": k.flink_image, "flinkVersion": k.flink_version, "serviceAccount": "flink",
                     "flinkConfiguration": {"taskmanager.numberOfTaskSlots": str(f.taskmanager_slots),
                                            "python.execution-mode": "thread",
                                            "execution.checkpointing.interval": "10s",
                                            "state.checkpoints.dir": f"{k.checkpoint_uri}/{name}",
                                            "high-availability.type": "kubernetes",
                                            "high-availability.storageDir": f"{k.checkpoint_uri}/ha/{name}"},
                     "podTemplate": {"spec": {"containers": [{"name": "flink-main-container", "env": _env(cfg)}]}},
                     "jobManager": {"resource": {"memory": f.jobmanager_memory, "cpu": 1}},
                     "taskManager": {"resource": {"memory": k.flink_taskmanager_memory, "cpu": 1}},
                     "job": {"jarURI": k.flink_python_jar, "entryClass": "org.apache.flink.client.python.PythonDriver",
                             "args": ["-py", f"/opt/feedrank/{path}"], "parallelism": k.flink_parallelism,
                             "upgradeMode": "last-state"}},
        })
    return out


def batch(cfg: Config) -> list[dict[str, Any]]:
    k = cfg.k8s
    return [{
        "apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": {"name": "feedrank-daily", "namespace": k.namespace, "labels": _labels("daily")},
        "spec": {"schedule": k.daily_schedule, "concurrencyPolicy": "Forbid",
                 "jobTemplate": {"spec": {"backoffLimit": 2, "template": {"spec": {
                     "restartPolicy": "OnFailure",
                     "containers": [{"name": "daily", "image": k.image, "args": ["batch", "daily"], "env": _env(cfg),
                                     "resources": {"requests": {"cpu": "2", "memory": k.batch_memory},
                                                   "limits": {"memory": k.batch_memory}}}]}}}}},
    }]


def manifests(cfg: Config) -> list[dict[str, Any]]:
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": cfg.k8s.namespace}}
    return [ns, *redis(cfg), *kafka(cfg), *feed_service(cfg), *flink_jobs(cfg), *batch(cfg)]


def render(cfg: Config) -> str:
    import yaml

    head = ("# Generated by `feedrank k8s render` from feedrank.toml ([k8s] and the settings it uses); do not edit.\n"
            f"# Create the keys first: kubectl -n {cfg.k8s.namespace} create secret generic {cfg.k8s.secret} "
            "--from-literal=jwt_secret=... --from-literal=cursor_secret=...\n")
    return head + yaml.safe_dump_all(manifests(cfg), sort_keys=False, default_flow_style=False)


def write(cfg: Config, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(cfg))
    return path


def crd_schemas(cfg: Config) -> dict[tuple[str, str], tuple[str, dict[str, Any]]]:
    """(apiVersion, kind) -> (where from, openAPIV3Schema) of the operators' CRDs fetched by ``make jvm``
    (``core/jvm/pom.xml``: the Flink Kubernetes Operator's API jar carries its generated CRDs). Strimzi
    publishes no artifact with its CRDs on Maven Central, so its resources stay unvalidated."""
    import zipfile

    import yaml

    from core.jvm import jvm_dir

    out: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
    for jar in sorted((jvm_dir(cfg) / "crds").glob("*.jar")):
        with zipfile.ZipFile(jar) as z:
            for name in z.namelist():
                if not (name.startswith("META-INF/fabric8/") and name.endswith("-v1.yml")):
                    continue  # the apiextensions.k8s.io/v1 form (the -v1beta1.yml files are the legacy API)
                crd = yaml.safe_load(z.read(name))
                group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
                for v in crd["spec"]["versions"]:
                    out[(f"{group}/{v['name']}", kind)] = (jar.name, v["schema"]["openAPIV3Schema"])
    return out


def _strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists properties and neither allows more nor
    preserves unknown fields: what the API server's strict field validation does for a custom resource."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out and \
                not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


# a value the schema's operator release predates, not a mistake: a warning (the FlinkVersion enum of the only
# operator release served here ends before Flink 2; the image runs PyFlink 2.x, which needs a newer operator)
NEWER_THAN_SCHEMA = {("FlinkDeployment", ("spec", "flinkVersion"))}


def validate(docs: list[dict[str, Any]], k8s_version: str,
             crds: dict[tuple[str, str], tuple[str, dict[str, Any]]] | None = None) -> dict[str, list[str]]:
    """Kind -> problems: built-in kinds against the Kubernetes schemas kubernetes-validate ships (strict:
    unknown fields are errors), custom resources against their operator's CRD schema in ``crds``
    (:func:`crd_schemas`; strict too); the rest are listed under ``not_validated``."""
    import jsonschema
    import kubernetes_validate as kv

    out: dict[str, list[str]] = {"errors": [], "warnings": [], "validated": [], "validated_crd": [],
                                 "not_validated": []}
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        crd = (crds or {}).get((d["apiVersion"], d["kind"]))
        if crd is not None:
            schema = _strict(crd[1])  # the API server itself checks the envelope every object has
            schema["properties"] = {**schema["properties"], "apiVersion": {"type": "string"},
                                    "kind": {"type": "string"}, "metadata": {"type": "object"}}
            problems = sorted(jsonschema.Draft7Validator(schema).iter_errors(d), key=lambda e: list(e.path))
            for e in problems:
                where = ".".join(map(str, e.path))
                if (d["kind"], tuple(e.path)) in NEWER_THAN_SCHEMA and e.validator == "enum":
                    out["warnings"].append(f"{name}: {where} {e.instance!r} is newer than {crd[0]}'s schema")
                else:
                    out["errors"].append(f"{name}: {e.message} at {where}")
            out["validated_crd"].append(name)
            continue
        try:
            kv.validate(d, k8s_version, strict=True)
            out["validated"].append(name)
        except kv.SchemaNotFoundError:
            out["not_validated"].append(name)
        except kv.ValidationError as e:
            out["errors"].append(f"{name}: {e.message} at {'.'.join(map(str, e.path))}")
    return out

"""The Kubernetes manifests: the committed deploy/k8s/feedrank.yaml is what feedrank.toml renders, every
built-in resource is valid against the Kubernetes schemas and every FlinkDeployment against the Flink
operator's CRD schema (both strict), and the validation can fail."""

from __future__ import annotations

import copy

import yaml

from core.config import PROJECT_ROOT, load_config
from runtime.k8s import crd_schemas, manifests, render, validate


def _defaults():
    return load_config({})  # feedrank.toml alone: what `feedrank k8s render` renders without overrides


def test_the_committed_manifests_are_what_the_configuration_renders():
    committed = (PROJECT_ROOT / "deploy" / "k8s" / "feedrank.yaml").read_text()
    assert committed == render(_defaults()), "run `feedrank k8s render` and commit deploy/k8s/feedrank.yaml"


def test_every_builtin_resource_is_valid_and_the_custom_resources_are_named():
    cfg = _defaults()
    docs = list(yaml.safe_load_all(render(cfg)))
    res = validate(docs, cfg.k8s.k8s_version, crd_schemas(cfg))
    assert res["errors"] == []
    assert set(res["validated"]) == {"Namespace/feedrank", "StatefulSet/redis", "Service/redis", "Deployment/feedservice",
                                     "Service/feedservice", "HorizontalPodAutoscaler/feedservice", "CronJob/feedrank-daily"}
    flink = {"FlinkDeployment/feedrank-features", "FlinkDeployment/feedrank-learner", "FlinkDeployment/feedrank-lake"}
    assert set(res["validated_crd"]) == flink
    # the one operator release served here (1.10.0) predates Flink 2: its FlinkVersion enum is all it lacks
    assert len(res["warnings"]) == 3 and all("spec.flinkVersion 'v2_0' is newer than" in w for w in res["warnings"])
    assert set(res["not_validated"]) == {"KafkaNodePool/dual-role", "Kafka/feedrank", "KafkaTopic/engagements"}
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    hpa = by[("HorizontalPodAutoscaler", "feedservice")]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (cfg.k8s.serving_replicas, cfg.k8s.serving_max_replicas)
    pod = by[("Deployment", "feedservice")]["spec"]["template"]["spec"]["containers"][0]
    assert pod["readinessProbe"]["grpc"]["port"] == cfg.serving.port  # our gRPC health service says when ready
    assert not any("value" in e and "secret" in e["name"].lower() for e in pod["env"])  # keys only by reference
    topic = by[("KafkaTopic", "engagements")]["spec"]
    assert topic["partitions"] == cfg.k8s.kafka_partitions
    for job in ("features", "learner", "lake"):
        spec = by[("FlinkDeployment", f"feedrank-{job}")]["spec"]
        assert spec["job"]["parallelism"] <= topic["partitions"]
        assert spec["flinkConfiguration"]["python.execution-mode"] == "thread"


def test_the_validation_rejects_a_broken_manifest():
    cfg = _defaults()

    def broken(change) -> list[str]:
        docs = copy.deepcopy(manifests(cfg))
        change(next(d for d in docs if d["kind"] == "Deployment"))
        return validate(docs, cfg.k8s.k8s_version)["errors"]

    wrong_type = broken(lambda d: d["spec"].update(replicas="two"))
    assert len(wrong_type) == 1 and "spec.replicas" in wrong_type[0]
    misspelt = broken(lambda d: d["spec"]["template"]["spec"]["containers"][0].update(readinessProb={}))
    assert len(misspelt) == 1 and misspelt[0].startswith("Deployment/feedservice"), misspelt  # strict: unknown field


def test_the_crd_validation_rejects_a_broken_flink_deployment():
    cfg = _defaults()
    crds = crd_schemas(cfg)

    def broken(change) -> list[str]:
        docs = copy.deepcopy(manifests(cfg))
        change(next(d for d in docs if d["kind"] == "FlinkDeployment"))
        return validate(docs, cfg.k8s.k8s_version, crds)["errors"]

    misspelt = broken(lambda d: d["spec"]["job"].update(paralelism=2))
    assert misspelt == ["FlinkDeployment/feedrank-features: Additional properties are not allowed ('paralelism' was "
                        "unexpected) at spec.job"]
    wrong_type = broken(lambda d: d["spec"]["taskManager"]["resource"].update(cpu="lots"))
    assert len(wrong_type) == 1 and "spec.taskManager.resource.cpu" in wrong_type[0]
    bad_mode = broken(lambda d: d["spec"]["job"].update(upgradeMode="sometimes"))
    assert len(bad_mode) == 1 and "spec.job.upgradeMode" in bad_mode[0]

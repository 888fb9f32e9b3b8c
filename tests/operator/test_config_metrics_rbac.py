import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from finetune_operator import metrics, rbac
from finetune_operator.config import ConfigError, OperatorConfig


def test_config_from_environment():
    config = OperatorConfig.from_env({
        "FINETUNE_TRAINER_IMAGE": "registry.local/trainer:2",
        "FINETUNE_DEFAULT_S3_ENDPOINT": "http://s3.internal:9000",
        "FINETUNE_DEFAULT_GPU_RESOURCE": "amd.com/gpu",
        "FINETUNE_WATCH_NAMESPACES": "team-a, team-b,,",
        "FINETUNE_OPERATOR_METRICS_PORT": "9090", "FINETUNE_OPERATOR_METRICS_ADDR": "127.0.0.1",
        "FINETUNE_PROGRESS_INTERVAL_SECONDS": "5", "FINETUNE_LOG_LEVEL": "debug",
        "FINETUNE_RENDEZVOUS_TIMEOUT_SECONDS": "120", "POD_NAMESPACE": "finetune-system",
        "FINETUNE_DEFAULT_EPHEMERAL_STORAGE": "50Gi", "FINETUNE_MAX_DISRUPTIONS": "0",
        "FINETUNE_START_ERROR_GRACE_SECONDS": "30", "FINETUNE_NETWORK_POLICIES": "false",
        "FINETUNE_METRICS_FROM_NAMESPACES": "monitoring, prometheus,"})
    assert config.watch_namespaces == ("team-a", "team-b")
    assert (config.metrics_addr, config.metrics_port) == ("127.0.0.1", 9090)
    assert config.default_gpu_resource == "amd.com/gpu"
    assert config.log_level == "DEBUG" and config.pod_namespace == "finetune-system"
    assert config.rendezvous_timeout_seconds == 120
    assert config.default_ephemeral_storage == "50Gi"
    assert (config.max_disruptions, config.start_error_grace_seconds) == (0, 30)
    assert not config.network_policies
    assert config.metrics_from_namespaces == ("monitoring", "prometheus")
    defaults = OperatorConfig.from_env({})
    assert defaults.watch_namespaces == () and defaults.metrics_port == 8080
    assert defaults.metrics_addr == "0.0.0.0" and defaults.leader_election
    assert defaults.rendezvous_timeout_seconds == 600
    assert defaults.default_ephemeral_storage == "20Gi"
    assert (defaults.max_disruptions, defaults.start_error_grace_seconds) == (3, 300)
    assert defaults.network_policies and defaults.metrics_from_namespaces == ()


@pytest.mark.parametrize("env, field", [
    ({"FINETUNE_OPERATOR_METRICS_PORT": "http"}, "FINETUNE_OPERATOR_METRICS_PORT"),
    ({"FINETUNE_PROGRESS_INTERVAL_SECONDS": "0"}, "FINETUNE_PROGRESS_INTERVAL_SECONDS"),
    ({"FINETUNE_LOG_LEVEL": "LOUD"}, "FINETUNE_LOG_LEVEL"),
    ({"FINETUNE_DEFAULT_S3_ENDPOINT": "s3.local"}, "FINETUNE_DEFAULT_S3_ENDPOINT"),
    ({"FINETUNE_LEADER_ELECTION": "maybe"}, "FINETUNE_LEADER_ELECTION"),
    ({"FINETUNE_RENDEZVOUS_TIMEOUT_SECONDS": "5"}, "FINETUNE_RENDEZVOUS_TIMEOUT_SECONDS"),
    ({"FINETUNE_DEFAULT_EPHEMERAL_STORAGE": "lots"}, "FINETUNE_DEFAULT_EPHEMERAL_STORAGE"),
    ({"FINETUNE_MAX_DISRUPTIONS": "-1"}, "FINETUNE_MAX_DISRUPTIONS"),
    ({"FINETUNE_START_ERROR_GRACE_SECONDS": "5m"}, "FINETUNE_START_ERROR_GRACE_SECONDS"),
    ({"FINETUNE_NETWORK_POLICIES": "maybe"}, "FINETUNE_NETWORK_POLICIES"),
    ({"FINETUNE_METRICS_FROM_NAMESPACES": "Monitoring"}, "FINETUNE_METRICS_FROM_NAMESPACES"),
])
def test_bad_config_names_the_variable(env, field):
    with pytest.raises(ConfigError, match=field):
        OperatorConfig.from_env(env)


def test_jobs_gauge_counts_every_phase():
    registry = CollectorRegistry()
    registry.register(metrics.JobsByPhase(lambda: ["Running", "Running", "Queued", None]))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry)
                                                                  .decode())}
    values = {s.labels["phase"]: s.value for s in families[metrics.JOBS].samples}
    assert values == {"Pending": 1, "Queued": 1, "Running": 2, "Succeeded": 0, "Failed": 0,
                      "Suspended": 0}


def test_metric_names_follow_prometheus_conventions():
    assert metrics.RECONCILIATIONS.endswith("_total")
    assert metrics.RECONCILE_ERRORS.endswith("_total")
    for name in (metrics.RECONCILE_DURATION, metrics.JOB_CREATION_LATENCY,
                 metrics.TIME_TO_RUNNING):
        assert name.startswith("finetune_operator_") and name.endswith("_seconds")


def test_rbac_is_least_privilege():
    granted = {(group, resource): set(rule["verbs"]) for rule in rbac.CLUSTER_RULES
               for group in rule["apiGroups"] for resource in rule["resources"]}
    assert ("", "secrets") not in granted  # credentials reach the pod by secretKeyRef only
    assert "update" not in granted[("finetune.dev", "finetunejobs")]  # never writes spec
    assert "patch" not in granted[("finetune.dev", "finetunejobs")]
    assert granted[("", "pods")] == {"get", "list", "watch"}
    assert not any("*" in rule["verbs"] or "*" in rule["resources"]
                   for rule in rbac.CLUSTER_RULES + rbac.LEADER_ELECTION_RULES)

import json
from dataclasses import replace

import yaml
import kubernetes
import pytest

from finetune_api import contract
from finetune_operator import builders
from finetune_operator.config import OperatorConfig

from operator_factories import finetunejob

CONFIG = OperatorConfig(trainer_image="registry.local/trainer:1", default_s3_endpoint="",
                        default_gpu_resource="nvidia.com/gpu")


def container(job):
    return job["spec"]["template"]["spec"]["containers"][0]


def env(job):
    return {e["name"]: e for e in container(job)["env"]}


def test_job_requests_and_limits_the_declared_gpus():
    job = builders.build_trainer_job(finetunejob(resources={"gpus": 2, "cpu": "4",
                                                             "memory": "16Gi"}), CONFIG)
    resources = container(job)["resources"]
    assert resources["limits"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "2",
                                   "ephemeral-storage": "20Gi"}
    assert resources["requests"] == resources["limits"]


def test_gpu_resource_name_comes_from_spec_then_operator_default():
    amd = OperatorConfig(default_gpu_resource="amd.com/gpu")
    job = builders.build_trainer_job(finetunejob(resources={"gpus": 1}), amd)
    assert container(job)["resources"]["limits"]["amd.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in container(job)["resources"]["limits"]
    mig = finetunejob(resources={"gpus": 1, "gpuResourceName": "nvidia.com/mig-1g.10gb"})
    job = builders.build_trainer_job(mig, amd)
    assert container(job)["resources"]["limits"] == {"nvidia.com/mig-1g.10gb": "1",
                                                     "ephemeral-storage": "20Gi"}


def test_zero_gpus_requests_no_gpu_resource():
    job = builders.build_trainer_job(finetunejob(resources={"gpus": 0, "cpu": "2"}), CONFIG)
    assert container(job)["resources"]["limits"] == {"cpu": "2", "ephemeral-storage": "20Gi"}
    job = builders.build_trainer_job(finetunejob(resources={"gpus": 0}), CONFIG)
    assert container(job)["resources"]["limits"] == {"ephemeral-storage": "20Gi"}


def test_ephemeral_storage_comes_from_spec_then_operator_default_and_bounds_the_volumes():
    def disk(job):
        volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container(job)["volumeMounts"]}
        resources = container(job)["resources"]
        return (resources["requests"]["ephemeral-storage"],
                resources["limits"]["ephemeral-storage"],
                volumes[mounts[builders.CACHE_DIR]]["emptyDir"]["sizeLimit"],
                volumes[mounts[builders.SCRATCH_DIR]]["emptyDir"]["sizeLimit"])

    # The dataset cache may fill the pod's disk; /tmp (pretrained downloads) a quarter of it.
    assert disk(builders.build_trainer_job(finetunejob(), CONFIG)) == \
        ("20Gi", "20Gi", "20Gi", "5Gi")
    spec = finetunejob(resources={"gpus": 1, "ephemeralStorage": "100Gi"})
    assert disk(builders.build_trainer_job(spec, CONFIG)) == ("100Gi", "100Gi", "100Gi", "25Gi")
    operator_default = OperatorConfig.from_env({"FINETUNE_DEFAULT_EPHEMERAL_STORAGE": "50G"})
    assert disk(builders.build_trainer_job(finetunejob(), operator_default)) == \
        ("50G", "50G", "50G", "12500000000")
    odd = finetunejob(resources={"gpus": 1, "ephemeralStorage": "1.5Gi"})
    assert disk(builders.build_trainer_job(odd, CONFIG))[3] == "384Mi"


def test_the_trainer_reads_its_ephemeral_storage_limit_through_the_downward_api():
    variable = env(builders.build_trainer_job(finetunejob(), CONFIG))[
        contract.ENV_EPHEMERAL_STORAGE_LIMIT]
    assert variable["valueFrom"] == {"resourceFieldRef": {"resource": "limits.ephemeral-storage"}}
    assert contract.ENV_EPHEMERAL_STORAGE_LIMIT == "FINETUNE_EPHEMERAL_STORAGE_LIMIT_BYTES"


def test_scheduling_fields_pass_through_to_the_pod():
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "gpu", "operator": "In", "values": ["a100"]}]}]}}}
    spec = finetunejob(resources={"gpus": 1, "nodeSelector": {"pool": "gpu"},
                                  "tolerations": tolerations, "affinity": affinity,
                                  "priorityClassName": "batch-low"})
    pod = builders.build_trainer_job(spec, CONFIG)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["tolerations"] == tolerations
    assert pod["affinity"] == affinity
    assert pod["priorityClassName"] == "batch-low"
    plain = builders.build_trainer_job(finetunejob(), CONFIG)["spec"]["template"]["spec"]
    assert not {"nodeSelector", "tolerations", "affinity", "priorityClassName"} & plain.keys()


def test_queue_name_labels_the_job_for_kueue_and_creates_it_suspended():
    job = builders.build_trainer_job(finetunejob(queueName="team-a-gpus"), CONFIG)
    assert job["metadata"]["labels"][contract.LABEL_QUEUE] == "team-a-gpus"
    assert job["spec"]["suspend"] is True
    unqueued = builders.build_trainer_job(finetunejob(), CONFIG)
    assert contract.LABEL_QUEUE not in unqueued["metadata"]["labels"]
    assert unqueued["spec"]["suspend"] is False


def test_suspend_in_spec_creates_the_job_suspended():
    assert builders.build_trainer_job(finetunejob(suspend=True), CONFIG)["spec"]["suspend"]


def test_credentials_come_from_the_named_secret_by_reference():
    variables = env(builders.build_trainer_job(finetunejob(), CONFIG))
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        ref = variables[key]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "s3-creds" and ref["key"] == key
        assert "value" not in variables[key]
    assert variables["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert "optional" not in variables["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]
    assert variables["AWS_ENDPOINT_URL"]["value"] == "http://s3.local:7070"


def test_without_a_secret_the_pod_uses_its_own_credential_chain():
    spec = finetunejob(dataset={"uri": "s3://datasets/flowers/"})
    variables = env(builders.build_trainer_job(spec, CONFIG))
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} & variables.keys()


def test_endpoint_falls_back_to_the_operator_default():
    spec = finetunejob(dataset={"uri": "s3://datasets/flowers/"})
    config = OperatorConfig(default_s3_endpoint="http://s3.internal:9000")
    assert env(builders.build_trainer_job(spec, config))["AWS_ENDPOINT_URL"]["value"] == \
        "http://s3.internal:9000"


def test_pushgateway_is_passed_to_trainers_only_when_the_operator_has_one():
    spec = finetunejob(dataset={"uri": "s3://datasets/flowers/"})
    assert contract.ENV_PUSHGATEWAY_URL not in env(builders.build_trainer_job(spec, CONFIG))
    config = OperatorConfig.from_env({"FINETUNE_PUSHGATEWAY_URL": " http://pushgateway:9091 "})
    assert env(builders.build_trainer_job(spec, config))[contract.ENV_PUSHGATEWAY_URL] == \
        {"name": contract.ENV_PUSHGATEWAY_URL, "value": "http://pushgateway:9091"}


def test_pod_runs_locked_down():
    job = builders.build_trainer_job(finetunejob(), CONFIG)
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["restartPolicy"] == "Never"
    security = container(job)["securityContext"]
    assert security == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                        "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}
    mounts = {m["mountPath"]: m["name"] for m in container(job)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    # Writable scratch for /tmp and the cache dir, since the root filesystem is read-only.
    assert "emptyDir" in volumes[mounts["/tmp"]]
    cache_dir = env(job)[contract.ENV_CACHE_DIR]["value"]
    assert "emptyDir" in volumes[mounts[cache_dir]]


def test_pod_failure_policy_fails_at_once_on_do_not_retry_codes_and_ignores_disruption():
    policy = builders.build_trainer_job(finetunejob(), CONFIG)["spec"]["podFailurePolicy"]
    fail, ignore, graceful = policy["rules"]
    assert fail["action"] == "FailJob"
    assert fail["onExitCodes"]["values"] == contract.NON_RETRYABLE_EXIT_CODES
    assert fail["onExitCodes"]["containerName"] == "trainer"
    for code in contract.ExitCode:
        assert (code in fail["onExitCodes"]["values"]) == (code != 0 and not code.retryable)
    assert ignore == {"action": "Ignore",
                      "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    # A graceful stop on SIGTERM, whatever sent it, is not a failure either.
    assert graceful == {"action": "Ignore", "onExitCodes": {
        "containerName": "trainer", "operator": "In", "values": [contract.ExitCode.PREEMPTED]}}


def test_the_grace_period_is_the_trainers_checkpoint_grace():
    pod = builders.build_trainer_job(finetunejob(), CONFIG)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 60
    spec = finetunejob(checkpoint={"preemptionGraceSeconds": 300})
    pod = builders.build_trainer_job(spec, CONFIG)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 300


def test_job_fields_from_spec():
    spec = finetunejob(activeDeadlineSeconds=3600, backoffLimit=5, metrics={"port": 9555},
                       image="registry.local/custom:2", serviceAccountName="trainer-irsa")
    job = builders.build_trainer_job(spec, CONFIG)
    assert job["spec"]["activeDeadlineSeconds"] == 3600
    assert job["spec"]["backoffLimit"] == 5
    assert job["spec"]["podReplacementPolicy"] == "Failed"
    assert container(job)["image"] == "registry.local/custom:2"
    assert container(job)["ports"] == [{"name": "metrics", "containerPort": 9555,
                                        "protocol": "TCP"}]
    assert container(job)["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert env(job)[contract.ENV_METRICS_ADDR]["value"] == "0.0.0.0"
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "trainer-irsa"
    default = builders.build_trainer_job(finetunejob(), CONFIG)
    assert container(default)["image"] == "registry.local/trainer:1"
    assert "activeDeadlineSeconds" not in default["spec"]


def test_job_and_pods_are_labelled_and_owned():
    ftj = finetunejob()
    job = builders.build_trainer_job(ftj, CONFIG)
    for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
        assert labels[contract.LABEL_JOB] == "flowers"
        assert labels[contract.LABEL_COMPONENT] == contract.COMPONENT_TRAINER
        assert labels[contract.LABEL_MANAGED_BY] == contract.MANAGED_BY
    owner, = job["metadata"]["ownerReferences"]
    assert owner == {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                     "name": "flowers", "uid": ftj["metadata"]["uid"], "controller": True,
                     "blockOwnerDeletion": True}
    assert job["metadata"]["name"] == builders.trainer_job_name("flowers") == "flowers-trainer"


def test_names_are_deterministic_and_fit_label_limits():
    long_a = "a" * 200 + "-x"
    long_b = "a" * 200 + "-y"
    assert builders.trainer_job_name(long_a) == builders.trainer_job_name(long_a)
    assert builders.trainer_job_name(long_a) != builders.trainer_job_name(long_b)
    assert len(builders.trainer_job_name(long_a)) <= 63
    # An Indexed Job's pods are named by the Job controller "<job>-<index>" as their hostname.
    assert len(builders.trainer_job_name(long_a) + "-63") <= 63
    assert len(builders.label_value(long_a)) <= 63
    assert builders.label_value(long_a) != builders.label_value(long_b)


def test_the_pods_carry_the_whole_manifest_the_trainer_reads_as_its_spec_file():
    ftj = finetunejob()
    job = builders.build_trainer_job(ftj, CONFIG)
    annotations = job["spec"]["template"]["metadata"]["annotations"]
    manifest = yaml.safe_load(annotations[builders.ANNOTATION_SPEC])
    assert manifest == {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                        "metadata": {"name": "flowers", "namespace": "team-a",
                                     "uid": ftj["metadata"]["uid"]},
                        "spec": ftj["spec"]}
    volume = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "spec")
    assert volume["downwardAPI"]["items"] == [{
        "path": contract.SPEC_FILE_NAME,
        "fieldRef": {"fieldPath": f"metadata.annotations['{builders.ANNOTATION_SPEC}']"}}]
    mount = next(m for m in container(job)["volumeMounts"] if m["name"] == "spec")
    assert mount["mountPath"] == contract.SPEC_MOUNT_DIR
    assert container(job)["command"][-1] == f"{contract.SPEC_MOUNT_DIR}/{contract.SPEC_FILE_NAME}"
    assert builders.parse_spec_annotation(builders.spec_annotation_of(job)) == ftj["spec"]


@pytest.mark.parametrize("spec", [finetunejob(), finetunejob(
    queueName="q", suspend=True, activeDeadlineSeconds=10,
    resources={"gpus": 2, "nodeSelector": {"a": "b"}, "cpu": "500m",
               "tolerations": [{"key": "k", "operator": "Exists"}]})])
def test_job_uses_only_real_batch_v1_fields(spec):
    """Round-trip through the Kubernetes client's models: a misspelt field would be dropped."""
    job = builders.build_trainer_job(spec, CONFIG)
    client = kubernetes.client.ApiClient()

    model = client._ApiClient__deserialize(json.loads(json.dumps(job)), "V1Job")
    assert client.sanitize_for_serialization(model) == job


def test_job_patch_applies_the_mutable_fields_only():
    live = builders.build_trainer_job(finetunejob(), CONFIG)
    assert builders.job_spec_patch(finetunejob()["spec"], live) == {}
    assert builders.job_spec_patch(finetunejob(suspend=True)["spec"], live) == \
        {"spec": {"suspend": True}}
    assert builders.job_spec_patch(finetunejob(activeDeadlineSeconds=60, backoffLimit=1)["spec"],
                                   live) == {"spec": {"activeDeadlineSeconds": 60,
                                                      "backoffLimit": 1}}
    # Kueue decides when a queued job runs: a resume leaves its suspension alone.
    queued = builders.build_trainer_job(finetunejob(queueName="q"), CONFIG)
    assert builders.job_spec_patch(finetunejob(queueName="q")["spec"], queued) == {}


def test_spec_changes_that_cannot_reach_the_trainer_are_listed():
    applied = finetunejob()["spec"]
    changed = finetunejob(batchSize=64, suspend=True, backoffLimit=9,
                          optimizer={"learningRate": 0.01})["spec"]
    assert builders.unapplied_spec_changes(changed, applied) == [
        "spec.batchSize", "spec.optimizer.learningRate"]
    assert builders.unapplied_spec_changes(applied, applied) == []


def test_one_worker_builds_a_plain_job_and_no_service():
    ftj = finetunejob()
    job = builders.build_trainer_job(ftj, CONFIG)
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (1, 1)
    assert "completionMode" not in job["spec"]
    assert "subdomain" not in job["spec"]["template"]["spec"]
    assert "MASTER_ADDR" not in env(job)
    assert builders.build_rendezvous_service(ftj) is None


def test_several_workers_build_an_indexed_job_and_a_headless_service():
    ftj = finetunejob(resources={"gpus": 4, "workers": 3}, queueName="team-a")
    job = builders.build_trainer_job(ftj, CONFIG)
    service = builders.build_rendezvous_service(ftj)
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (3, 3)
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["metadata"]["labels"][contract.LABEL_QUEUE] == "team-a"  # Kueue admits all 3
    assert job["spec"]["podFailurePolicy"] == builders.pod_failure_policy()
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"][
        "labels"].items()
    assert service["metadata"]["ownerReferences"][0]["uid"] == ftj["metadata"]["uid"]
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"]
    variables = env(job)
    assert variables["MASTER_ADDR"]["value"] == (
        f"{job['metadata']['name']}-0.{service['metadata']['name']}")
    assert variables["FINETUNE_WORKERS"]["value"] == "3"
    assert variables["FINETUNE_RENDEZVOUS_TIMEOUT"]["value"] == str(
        CONFIG.rendezvous_timeout_seconds)
    shorter = builders.build_trainer_job(ftj, replace(CONFIG, rendezvous_timeout_seconds=30))
    assert env(shorter)["FINETUNE_RENDEZVOUS_TIMEOUT"]["value"] == "30"
    assert container(job)["resources"]["limits"]["nvidia.com/gpu"] == "4"  # per worker


def test_a_namespace_gets_one_policy_opening_every_trainers_metrics_port_to_named_namespaces():
    config = OperatorConfig(pod_namespace="finetune-system",
                            metrics_from_namespaces=("monitoring", "finetune-system"))
    policy = builders.build_trainer_network_policy("team-a", config)
    assert policy["metadata"]["name"] == builders.TRAINER_NETWORK_POLICY_NAME
    assert policy["metadata"]["namespace"] == "team-a"
    # Shared by the namespace's jobs: owned by none of them; found again by its label.
    assert "ownerReferences" not in policy["metadata"]
    assert policy["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "finetune-operator"
    # It selects every trainer pod, of jobs with any metrics port: the port goes by its name.
    for metrics in ({}, {"port": 9555}):
        job = builders.build_trainer_job(finetunejob(metrics=metrics), config)
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= \
            job["spec"]["template"]["metadata"]["labels"].items()
        port, = container(job)["ports"]
        assert port["name"] == policy["spec"]["ingress"][0]["ports"][0]["port"] == "metrics"
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rule, = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": "metrics"}]
    assert rule["from"] == [{"namespaceSelector": {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "In",
         "values": ["finetune-system", "monitoring"]}]}}]
    # The operator reads the trainers' progress from its own namespace, named or not.
    alone = builders.build_trainer_network_policy("team-a", OperatorConfig(pod_namespace="ops"))
    assert alone["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchExpressions"][0][
        "values"] == ["ops"]


def test_a_multi_worker_job_gets_a_policy_opening_its_pods_to_each_other_only():
    ftj = finetunejob(resources={"gpus": 1, "workers": 2})
    job = builders.build_trainer_job(ftj, CONFIG)
    peers = builders.build_peers_network_policy(ftj, CONFIG)
    assert peers["metadata"]["name"] == "flowers-peers"
    assert peers["metadata"]["ownerReferences"] == job["metadata"]["ownerReferences"]
    trainer_pods = {"matchLabels": builders.selector_labels("flowers")}
    assert peers["spec"]["podSelector"] == trainer_pods
    # From the job's own pods (in its namespace) on every port: the rendezvous, and the ephemeral
    # ports gloo and NCCL connect the ranks on.
    assert peers["spec"]["ingress"] == [{"from": [{"podSelector": trainer_pods}]}]
    assert peers["spec"]["policyTypes"] == ["Ingress"]
    assert builders.build_peers_network_policy(finetunejob(), CONFIG) is None  # one worker


def test_network_policies_can_be_turned_off_and_have_deterministic_names():
    ftj = finetunejob(resources={"gpus": 1, "workers": 2})
    off = OperatorConfig(network_policies=False)
    assert builders.build_trainer_network_policy("team-a", off) is None
    assert builders.build_peers_network_policy(ftj, off) is None
    assert builders.build_peers_network_policy(ftj, CONFIG) == \
        builders.build_peers_network_policy(ftj, CONFIG)
    assert len(builders.peers_network_policy_name("a" * 250)) <= 253


@pytest.mark.parametrize("workers", [1, 2])
def test_network_policies_use_only_real_networking_v1_fields(workers):
    client = kubernetes.client.ApiClient()
    ftj = finetunejob(resources={"gpus": 1, "workers": workers})
    for policy in filter(None, [builders.build_trainer_network_policy("team-a", CONFIG),
                                builders.build_peers_network_policy(ftj, CONFIG)]):
        model = client._ApiClient__deserialize(json.loads(json.dumps(policy)), "V1NetworkPolicy")
        assert client.sanitize_for_serialization(model) == policy

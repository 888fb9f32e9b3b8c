"""The tenancy policy: what a tenant who may create FineTuneJobs may choose for its trainer pods.

Enforced twice with the same rules and the same messages: by the API server at `kubectl apply`
(the chart's ValidatingAdmissionPolicy, helm/finetune-operator/templates/tenancy-policy.yaml,
CEL) and by the operator before it creates anything (`violations`, for clusters installed
without the chart; the job then fails with reason PolicyViolation). tests/api/test_tenancy.py
evaluates the chart's CEL against the same cases as `violations` and fails when they differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

# Toleration and node-selector keys tenants may use by default: the GPU ones (the taint GPU node
# pools carry, the labels that pick a GPU model) and the node-lifecycle taints every pod tolerates
# for 300 s anyway (a job may choose to leave a failing node sooner).
DEFAULT_TOLERATION_KEYS = ("nvidia.com/gpu", "amd.com/gpu", "node.kubernetes.io/not-ready",
                           "node.kubernetes.io/unreachable")
DEFAULT_NODE_SELECTOR_KEYS = ("nvidia.com/gpu.product", "nvidia.com/gpu.memory",
                              "nvidia.com/gpu.present", "cloud.google.com/gke-accelerator",
                              "node.kubernetes.io/instance-type")


@dataclass(frozen=True)
class TenancyPolicy:
    enabled: bool = True
    # Image repositories (any tag or digest of them), or prefixes ending in "/".
    allowed_images: tuple[str, ...] = ()
    allow_service_account_name: bool = False
    allowed_priority_classes: tuple[str, ...] = ()
    allowed_toleration_keys: tuple[str, ...] = DEFAULT_TOLERATION_KEYS
    allowed_node_selector_keys: tuple[str, ...] = DEFAULT_NODE_SELECTOR_KEYS
    allow_affinity: bool = False
    require_credentials_secret: bool = True

    @classmethod
    def from_json(cls, text: str, *, default_image: str) -> "TenancyPolicy":
        """The chart's `tenancy` values as JSON (FINETUNE_TENANCY_POLICY); empty: the defaults,
        with the operator's trainer image repository as the one allowed image."""
        values: Mapping[str, Any] = json.loads(text) if text.strip() else {}
        if not isinstance(values, dict):
            raise ValueError("the tenancy policy must be a JSON object")
        known = {"enabled", "allowedImages", "allowServiceAccountName", "allowedPriorityClasses",
                 "allowedTolerationKeys", "allowedNodeSelectorKeys", "allowAffinity",
                 "requireCredentialsSecret", "admissionPolicy"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown tenancy settings: {', '.join(unknown)}")
        defaults = cls()
        return cls(
            enabled=bool(values.get("enabled", True)),
            allowed_images=tuple(values.get("allowedImages") or ()) or (
                image_repository(default_image),),
            allow_service_account_name=bool(values.get("allowServiceAccountName", False)),
            allowed_priority_classes=tuple(values.get("allowedPriorityClasses") or ()),
            allowed_toleration_keys=tuple(values.get("allowedTolerationKeys",
                                                     defaults.allowed_toleration_keys)),
            allowed_node_selector_keys=tuple(values.get("allowedNodeSelectorKeys",
                                                        defaults.allowed_node_selector_keys)),
            allow_affinity=bool(values.get("allowAffinity", False)),
            require_credentials_secret=bool(values.get("requireCredentialsSecret", True)))


def image_repository(image: str) -> str:
    """registry/path/name of an image reference, without its tag or digest."""
    name = image.split("@", 1)[0]
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > last_slash else name


def image_allowed(image: str, allowed: tuple[str, ...]) -> bool:
    return any(image == entry or image.startswith((entry + ":", entry + "@"))
               or (entry.endswith("/") and image.startswith(entry)) for entry in allowed)


def _listed(values: tuple[str, ...]) -> str:
    return ", ".join(values) if values else "none"


def violations(spec: Mapping[str, Any], policy: TenancyPolicy) -> list[str]:
    """Each field of `spec` the policy forbids, as `<field>: <value> is not ...`; the chart's
    ValidatingAdmissionPolicy says the same words."""
    if not policy.enabled:
        return []
    problems = []
    resources = spec.get("resources") or {}
    image = spec.get("image")
    if image and not image_allowed(image, policy.allowed_images):
        problems.append(f"spec.image: {image} is not an allowed trainer image (allowed: "
                        f"{_listed(policy.allowed_images)})")
    if spec.get("serviceAccountName") and not policy.allow_service_account_name:
        problems.append(f"spec.serviceAccountName: {spec['serviceAccountName']} is not allowed: "
                        "tenants may not choose the trainer's ServiceAccount "
                        "(tenancy.allowServiceAccountName)")
    priority = resources.get("priorityClassName")
    if priority and priority not in policy.allowed_priority_classes:
        problems.append(f"spec.resources.priorityClassName: {priority} is not an allowed "
                        f"priority class (allowed: {_listed(policy.allowed_priority_classes)})")
    bad_tolerations = [toleration.get("key") or "(empty: every taint)"
                       for toleration in resources.get("tolerations") or []
                       if toleration.get("key", "") not in policy.allowed_toleration_keys]
    if bad_tolerations:
        problems.append(f"spec.resources.tolerations: key {bad_tolerations[0]} is not an allowed "
                        f"toleration key (allowed: {_listed(policy.allowed_toleration_keys)})")
    bad_selectors = [key for key in resources.get("nodeSelector") or {}
                     if key not in policy.allowed_node_selector_keys]
    if bad_selectors:
        problems.append(f"spec.resources.nodeSelector: key {bad_selectors[0]} is not an "
                        "allowed node-selector key (allowed: "
                        f"{_listed(policy.allowed_node_selector_keys)})")
    if resources.get("affinity") and not policy.allow_affinity:
        problems.append("spec.resources.affinity: is not allowed: tenants may not set affinity "
                        "(tenancy.allowAffinity)")
    secret = ((spec.get("dataset") or {}).get("s3") or {}).get("credentialsSecret")
    if policy.require_credentials_secret and not secret:
        problems.append("spec.dataset.s3.credentialsSecret: is required: name a Secret of the "
                        "namespace with the S3 keys; without one the trainer would use the "
                        "node's own credentials (tenancy.requireCredentialsSecret)")
    return problems

"""The operator's calls to the Kubernetes API, on plain dicts (camelCase, as the API sends them)."""

from __future__ import annotations

import json
import logging
import uuid
from datetime import datetime, timezone
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException

from finetune_api import GROUP, PLURAL, VERSION

from finetune_operator.config import ConfigError
from finetune_operator.status import timestamp

Manifest = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"
REQUEST_TIMEOUT_SECONDS = 30
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
log = logging.getLogger(__name__)


class NotOurs(Exception):
    """An object with the deterministic name exists but another owner controls it."""

    def __init__(self, existing: Manifest):
        self.existing = existing
        meta = existing.get("metadata", {})
        owners = [f"{r.get('kind')}/{r.get('name')}" for r in meta.get("ownerReferences") or []]
        super().__init__(f"{existing.get('kind')} {meta.get('name')} already exists and is "
                         f"owned by {', '.join(owners) or 'nobody'}")

    @property
    def being_replaced(self) -> bool:
        """A leftover of a deleted FineTuneJob of the same name, on its way out."""
        meta = self.existing.get("metadata", {})
        return bool(meta.get("deletionTimestamp")) or any(
            ref.get("kind") == "FineTuneJob" for ref in meta.get("ownerReferences") or [])


def load_kube_config() -> None:
    """The in-cluster service account, else a kubeconfig; ConfigError (one line) naming what is
    missing when neither is usable."""
    try:
        kubernetes.config.load_incluster_config()
        return
    except kubernetes.config.ConfigException as error:
        in_cluster = str(error)
    try:
        kubernetes.config.load_kube_config()
    except Exception as error:  # the loader raises ConfigException, OSError, YAMLError, ...
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ConfigError(f"no Kubernetes configuration: no in-cluster service account "
                          f"({in_cluster.rstrip('.')}) and no usable kubeconfig "
                          f"(KUBECONFIG or ~/.kube/config: {reason})") from None


class Kube:
    """The official client's typed API classes, asked for raw JSON: the objects stay camelCase
    dicts, exactly as the builders write them and the API returns them. The client sets the
    bearer token itself (kubernetes >= 36.0.2), refreshing rotated in-cluster tokens."""

    def __init__(self, api_client: kubernetes.client.ApiClient | None = None,
                 connections: int = 16, field_manager: str = "finetune-operator"):
        if api_client is None:
            load_kube_config()
            configuration = kubernetes.client.Configuration.get_default_copy()
            # One pooled connection per reconcile worker and the Lease keeper.
            configuration.connection_pool_maxsize = connections
            api_client = kubernetes.client.ApiClient(configuration)
        self.client = api_client
        # Names this replica in the managedFields of what it writes.
        self.field_manager = field_manager[:128]
        # Called before every write: the leader election's fence (raises when not leading).
        self.fence: Any = lambda: None
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.batch = kubernetes.client.BatchV1Api(api_client)
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.networking = kubernetes.client.NetworkingV1Api(api_client)
        self.coordination = kubernetes.client.CoordinationV1Api(api_client)

    @staticmethod
    def _call(method: Any, *args: Any, timeout: float = REQUEST_TIMEOUT_SECONDS,
              **kwargs: Any) -> Manifest:
        response = method(*args, _preload_content=False, _request_timeout=timeout, **kwargs)
        data = response.data
        return json.loads(data) if data else {}

    def _get(self, method: Any, *args: Any, **kwargs: Any) -> Manifest | None:
        try:
            return self._call(method, *args, **kwargs)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    # FineTuneJobs
    def patch_finetunejob_status(self, namespace: str, name: str, status: dict[str, Any]
                                 ) -> Manifest:
        self.fence()
        return self._call(self.custom.patch_namespaced_custom_object_status, GROUP, VERSION,
                          namespace, PLURAL, name, {"status": status},
                          field_manager=self.field_manager, _content_type=MERGE_PATCH)

    def finetunejob_versions(self, namespaces: tuple[str, ...]) -> dict[tuple[str, str], int]:
        """(namespace, name) -> resourceVersion of every FineTuneJob, listed as metadata only
        (PartialObjectMetadataList: no spec, no status)."""
        paths = ([f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}" for ns in namespaces]
                 or [f"/apis/{GROUP}/{VERSION}/{PLURAL}"])
        versions = {}
        for path in paths:
            response = self.client.call_api(
                path, "GET", header_params={"Accept": METADATA_LIST}, auth_settings=["BearerToken"],
                _preload_content=False, _request_timeout=REQUEST_TIMEOUT_SECONDS)
            for item in json.loads(response.data).get("items") or []:
                meta = item["metadata"]
                versions[(meta["namespace"], meta["name"])] = int(meta["resourceVersion"])
        return versions

    def delete_finetunejob(self, namespace: str, name: str, uid: str) -> None:
        self.fence()
        try:
            self._call(self.custom.delete_namespaced_custom_object, GROUP, VERSION, namespace,
                       PLURAL, name, propagation_policy="Background",
                       body={"apiVersion": "v1", "kind": "DeleteOptions",
                             "preconditions": {"uid": uid}})
        except ApiException as error:
            if error.status not in (404, 409):  # gone already, or a new one with that name
                raise

    # Children
    def get_job(self, namespace: str, name: str) -> Manifest | None:
        return self._get(self.batch.read_namespaced_job, name, namespace)

    def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> Manifest:
        self.fence()
        return self._call(self.batch.patch_namespaced_job, name, namespace, patch,
                          field_manager=self.field_manager, _content_type=MERGE_PATCH)

    def failed_creates(self, namespace: str, job_uid: str) -> list[Manifest]:
        """The Job controller's FailedCreate Events of one Job (quota exceeded, a missing
        ServiceAccount or PriorityClass): they are on no object the operator watches."""
        events = self._call(self.core.list_namespaced_event, namespace,
                            field_selector=f"involvedObject.uid={job_uid},reason=FailedCreate")
        return events.get("items") or []

    def _create_call(self, manifest: Manifest) -> tuple[Any, Any]:
        namespace = manifest["metadata"]["namespace"]
        name = manifest["metadata"]["name"]
        kind = manifest["kind"]
        if kind == "Job":
            return (lambda: self._call(self.batch.create_namespaced_job, namespace, manifest,
                                       field_manager=self.field_manager),
                    lambda: self._get(self.batch.read_namespaced_job, name, namespace))
        if kind == "Service":
            return (lambda: self._call(self.core.create_namespaced_service, namespace, manifest,
                                       field_manager=self.field_manager),
                    lambda: self._get(self.core.read_namespaced_service, name, namespace))
        if kind == "NetworkPolicy":
            return (lambda: self._call(self.networking.create_namespaced_network_policy,
                                       namespace, manifest, field_manager=self.field_manager),
                    lambda: self._get(self.networking.read_namespaced_network_policy, name,
                                      namespace))
        raise ValueError(f"no create call for kind {kind}")

    def create_or_adopt(self, manifest: Manifest, owner_uid: str) -> tuple[Manifest, bool]:
        """Create a child, or return the existing one when it is ours (idempotent after a
        restart at any moment). Returns (object, created)."""
        self.fence()
        create, read = self._create_call(manifest)
        try:
            return create(), True
        except ApiException as error:
            if error.status != 409:
                raise
        existing = read()
        if existing is None:  # deleted between our create and read: let the retry create it
            raise ApiException(status=409, reason=f"{manifest['kind']} "
                                                  f"{manifest['metadata']['name']} is being deleted")
        owned = any(ref.get("uid") == owner_uid and ref.get("controller")
                    for ref in existing["metadata"].get("ownerReferences") or [])
        if not owned:
            raise NotOurs(existing)
        return existing, False

    def ensure_network_policy(self, policy: Manifest) -> bool:
        """A policy shared by no owner (one per namespace) exists as built: read, then created
        or its spec patched where it differs. NotOurs when one of that name exists without the
        operator's managed-by label. Returns whether it wrote."""
        self.fence()
        meta = policy["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        read = lambda: self._get(self.networking.read_namespaced_network_policy, name,  # noqa: E731
                                 namespace)
        existing = read()
        if existing is None:
            try:
                self._call(self.networking.create_namespaced_network_policy, namespace, policy,
                           field_manager=self.field_manager)
                return True
            except ApiException as error:
                if error.status != 409:
                    raise
            existing = read()  # another replica, or a worker of an older one, made it
            if existing is None:
                raise ApiException(status=409, reason=f"NetworkPolicy {name} is being deleted")
        labels = existing["metadata"].get("labels") or {}
        if any(labels.get(key) != value for key, value in meta["labels"].items()):
            raise NotOurs(existing)
        if existing.get("spec") == policy["spec"]:
            return False
        self._call(self.networking.patch_namespaced_network_policy, name, namespace,
                   {"spec": policy["spec"]}, field_manager=self.field_manager,
                   _content_type=MERGE_PATCH)
        return True

    # Leases (leader election)
    def get_lease(self, namespace: str, name: str,
                  timeout: float = REQUEST_TIMEOUT_SECONDS) -> Manifest | None:
        return self._get(self.coordination.read_namespaced_lease, name, namespace,
                         timeout=timeout)

    def create_lease(self, lease: Manifest, timeout: float = REQUEST_TIMEOUT_SECONDS
                     ) -> Manifest:
        return self._call(self.coordination.create_namespaced_lease,
                          lease["metadata"]["namespace"], lease, timeout=timeout)

    def replace_lease(self, lease: Manifest, timeout: float = REQUEST_TIMEOUT_SECONDS
                      ) -> Manifest:
        meta = lease["metadata"]
        return self._call(self.coordination.replace_namespaced_lease, meta["name"],
                          meta["namespace"], lease, timeout=timeout)

    # Events
    def post_event(self, finetunejob: Manifest, type_: str, reason: str, message: str) -> None:
        self.fence()
        meta = finetunejob["metadata"]
        now = datetime.now(timezone.utc)
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta['name'][:200]}.{uuid.uuid4().hex[:12]}",
                         "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": finetunejob.get("apiVersion"),
                               "kind": finetunejob.get("kind"), "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta["uid"]},
            "type": type_, "reason": reason, "message": message[:1024],
            "source": {"component": "finetune-operator"},
            "reportingComponent": "finetune-operator", "reportingInstance": "finetune-operator",
            "firstTimestamp": timestamp(now), "lastTimestamp": timestamp(now), "count": 1,
        }
        try:
            self._call(self.core.create_namespaced_event, meta["namespace"], event)
        except ApiException as error:  # an Event is a courtesy; never fail a reconcile for it
            log.warning("could not post event %s for %s/%s: %s", reason, meta["namespace"],
                        meta["name"], error.reason)

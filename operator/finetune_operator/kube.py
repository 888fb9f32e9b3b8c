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
    """Raw JSON requests through the kubernetes client's authenticated connection pool: the
    objects stay camelCase dicts, exactly as the builders write them and the API returns them."""

    def __init__(self, api_client: kubernetes.client.ApiClient | None = None):
        if api_client is None:
            load_kube_config()
            configuration = kubernetes.client.Configuration.get_default_copy()
            # Handlers run in a thread pool: enough pooled connections for all of them.
            configuration.connection_pool_maxsize = 32
            api_client = kubernetes.client.ApiClient(configuration)
        self.client = api_client

    def request(self, method: str, path: str, body: Any = None,
                query: dict[str, Any] | None = None, content_type: str = "application/json",
                timeout: float = 30) -> Manifest:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        authorization = self._authorization()
        if authorization:
            headers["Authorization"] = authorization
        query_params = list((query or {}).items())
        if hasattr(self.client, "param_serialize"):  # kubernetes >= 37 (new generator)
            method, url, headers, body, post = self.client.param_serialize(
                method=method, resource_path=path, query_params=query_params,
                header_params=headers, body=body, auth_settings=[])
            response = self.client.call_api(method, url, header_params=headers, body=body,
                                            post_params=post, _request_timeout=timeout)
            data = response.read()
            if not 200 <= response.status < 300:
                raise ApiException(status=response.status, reason=response.reason,
                                   body=data.decode(errors="replace") if data else None)
        else:  # raises ApiException itself on a non-2xx answer
            response = self.client.call_api(
                path, method, query_params=query_params, header_params=headers, body=body,
                auth_settings=[], _preload_content=False,
                _request_timeout=timeout)
            data = response.data
        return json.loads(data) if data else {}

    def _authorization(self) -> str | None:
        """The bearer token, wherever this client version keeps it: kubernetes 36.0.0's config
        loaders store it under "authorization" while its API classes read "BearerToken" (token
        auth silently becomes anonymous). Reading it calls the refresh hook, so rotated in-cluster
        tokens are picked up."""
        config = self.client.configuration
        return (config.get_api_key_with_prefix("BearerToken")
                or config.get_api_key_with_prefix("authorization"))

    def _get(self, path: str) -> Manifest | None:
        try:
            return self.request("GET", path)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    # FineTuneJobs
    @staticmethod
    def _finetunejob_path(namespace: str, name: str) -> str:
        return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}"

    def get_finetunejob(self, namespace: str, name: str) -> Manifest | None:
        return self._get(self._finetunejob_path(namespace, name))

    def patch_finetunejob_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.request("PATCH", self._finetunejob_path(namespace, name) + "/status",
                     {"status": status}, content_type=MERGE_PATCH)

    def delete_finetunejob(self, namespace: str, name: str, uid: str) -> None:
        try:
            self.request("DELETE", self._finetunejob_path(namespace, name),
                         {"apiVersion": "v1", "kind": "DeleteOptions",
                          "propagationPolicy": "Background", "preconditions": {"uid": uid}})
        except ApiException as error:
            if error.status not in (404, 409):  # gone already, or a new one with that name
                raise

    # Children
    def get_job(self, namespace: str, name: str) -> Manifest | None:
        return self._get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}")

    def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> Manifest:
        return self.request("PATCH", f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}",
                            patch, content_type=MERGE_PATCH)

    def get_configmap(self, namespace: str, name: str) -> Manifest | None:
        return self._get(f"/api/v1/namespaces/{namespace}/configmaps/{name}")

    def create_or_adopt(self, manifest: Manifest, owner_uid: str) -> tuple[Manifest, bool]:
        """Create a child, or return the existing one when it is ours (idempotent after a
        restart at any moment). Returns (object, created)."""
        namespace = manifest["metadata"]["namespace"]
        name = manifest["metadata"]["name"]
        collection = {"Job": f"/apis/batch/v1/namespaces/{namespace}/jobs",
                      "ConfigMap": f"/api/v1/namespaces/{namespace}/configmaps",
                      "Service": f"/api/v1/namespaces/{namespace}/services",
                      "NetworkPolicy": f"/apis/networking.k8s.io/v1/namespaces/{namespace}/"
                                       "networkpolicies"}[manifest["kind"]]
        try:
            return self.request("POST", collection, manifest), True
        except ApiException as error:
            if error.status != 409:
                raise
        existing = self._get(f"{collection}/{name}")
        if existing is None:  # deleted between our create and read: let the retry create it
            raise ApiException(status=409, reason=f"{manifest['kind']} {name} is being deleted")
        owned = any(ref.get("uid") == owner_uid and ref.get("controller")
                    for ref in existing["metadata"].get("ownerReferences") or [])
        if not owned:
            raise NotOurs(existing)
        return existing, False

    # Leases (leader election)
    def get_lease(self, namespace: str, name: str) -> Manifest | None:
        return self._get(f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}")

    def create_lease(self, lease: Manifest) -> Manifest:
        namespace = lease["metadata"]["namespace"]
        return self.request("POST", f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases",
                            lease)

    def replace_lease(self, lease: Manifest) -> Manifest:
        meta = lease["metadata"]
        return self.request(
            "PUT", f"/apis/coordination.k8s.io/v1/namespaces/{meta['namespace']}/leases/"
                   f"{meta['name']}", lease)

    # Events
    def post_event(self, finetunejob: Manifest, type_: str, reason: str, message: str) -> None:
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
            self.request("POST", f"/api/v1/namespaces/{meta['namespace']}/events", event)
        except ApiException as error:  # an Event is a courtesy; never fail a reconcile for it
            log.warning("could not post event %s for %s/%s: %s", reason, meta["namespace"],
                        meta["name"], error.reason)

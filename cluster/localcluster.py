"""Start and stop the local cluster: a real Kubernetes control plane, a real kubelet node running
pods in containers, fake GPU nodes for scheduling tests, DNS, S3 and Prometheus.

    python cluster/localcluster.py up       # start (or find running) and print the env file
    python cluster/localcluster.py down     # stop every process `up` started, remove the state
    python cluster/localcluster.py status   # exit 0 when every recorded process is alive

Needs root (network namespaces, a bridge, cgroups, mounts). What runs where (cluster/realnode.py
has the network's layout):

* in the cluster network namespace ``ft-<id>`` at 10.213.N.2: etcd, kube-apiserver (RBAC, the usual
  admission plugins, certificates made here with the openssl CLI), kube-controller-manager,
  kube-scheduler, kwok, CoreDNS (``cluster.local`` from the API), versitygw (S3), the Pushgateway and
  Prometheus: every address pods need, reachable from pods and from this machine alike;
* on this machine: containerd + runc and the kubelet of node ``real-0`` (node IP 10.213.N.1, the
  bridge's address), whose pods get addresses on the bridge from the CNI ``bridge`` plugin. Pods run
  from images in containerd (``make images``; moved in with ``ctr images import``);
* kwok keeps three fake GPU nodes Ready (tainted ``kwok.x-k8s.io/node=fake:NoSchedule``, so only
  pods that ask for them land there) for scheduling tests and scale benchmarks.

State lives in ``$FINETUNE_CLUSTER_DIR`` (default ``<repo>/.state/cluster``, gitignored): pid files,
logs, certificates, data, containerd's and the kubelet's directories, and ``env``, a shell file with
KUBECONFIG, S3 and Prometheus settings. Binaries are looked up on PATH (``make cluster-build`` puts
them in ``$CACHE_DIR/bin``). Standard library only, so the fixtures and the Makefile can share it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import realnode  # noqa: E402  (a sibling module; this file also runs as a script)

REPO = Path(__file__).resolve().parent.parent
CLUSTER_SRC = Path(__file__).resolve().parent
DEFAULT_STATE_DIR = REPO / ".state" / "cluster"

# Fixed test credentials of the local S3 server; never used outside this machine.
S3_ACCESS_KEY = "finetune-test"
S3_SECRET_KEY = "finetune-test-secret"
S3_REGION = "us-east-1"
SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"
# Pod IPs kwok reports for pods on its fake nodes: the real node's pods route them into the
# cluster network namespace, where nothing answers unless a test serves them there.
KWOK_POD_CIDR = "10.244.0.0/16"
NODE_ANNOTATION = "kwok.x-k8s.io/node"
FAKE_NODE_TAINT = {"key": NODE_ANNOTATION, "value": "fake", "effect": "NoSchedule"}
# Fixed ports inside the cluster network namespace (it is the cluster's own: nothing else binds).
PORTS = {"etcd": 2379, "etcd_peer": 2380, "apiserver": 6443, "controller_manager": 10257,
         "scheduler": 10259, "kwok": 10247, "coredns_ready": 8181, "versitygw": 9000,
         "prometheus": 9090, "pushgateway": 9091}

# Start order; `down` stops them in reverse. The first group runs in the cluster network namespace.
NETNS_COMPONENTS = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "coredns",
    "versitygw",
    "pushgateway",
    "podtargets",
    "prometheus",
]
NODE_COMPONENTS = ["containerd", "kubelet"]
IMAGE_REFERENCES = ("FINETUNE_OPERATOR_IMAGE", "FINETUNE_TRAINER_IMAGE")
IMAGE_ARCHIVES = ("FINETUNE_OPERATOR_ARCHIVE", "FINETUNE_TRAINER_ARCHIVE")
COMPONENTS = NETNS_COMPONENTS + NODE_COMPONENTS


def log(message: str) -> None:
    print(f">> {message}", file=sys.stderr, flush=True)


def state_dir() -> Path:
    return Path(os.environ.get("FINETUNE_CLUSTER_DIR") or DEFAULT_STATE_DIR).resolve()


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (sockets held open together so none is handed out twice)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def binary(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise SystemExit(f"{name} not found on PATH; run `make cluster-build` first")
    return path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not reaped) counts as dead.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


# --------------------------------------------------------------------------------------------
# Certificates


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(pki: Path, api_address: str) -> None:
    """A cluster CA, the API server's serving certificate, client certificates (the kubelet's and the
    API server's own for talking to the kubelet among them), the SA key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    days = "3650"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
            "-days", days, "-subj", "/CN=finetune-local-ca", cwd=pki)
    sans = ",".join([
        "IP:127.0.0.1", f"IP:{api_address}", f"IP:{KUBERNETES_SERVICE_IP}", "DNS:localhost",
        "DNS:kubernetes",
        "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
        "DNS:kubernetes.default.svc.cluster.local",
    ])
    certs = {
        # name: (subject, extensions)
        "apiserver": ("/CN=kube-apiserver",
                      f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n"),
        "admin": ("/O=system:masters/CN=finetune-admin", "extendedKeyUsage=clientAuth\n"),
        "controller-manager": ("/CN=system:kube-controller-manager",
                               "extendedKeyUsage=clientAuth\n"),
        "scheduler": ("/CN=system:kube-scheduler", "extendedKeyUsage=clientAuth\n"),
        "kubelet": (f"/O=system:nodes/CN=system:node:{realnode.NODE_NAME}",
                    "extendedKeyUsage=clientAuth\n"),
        "apiserver-kubelet-client": ("/CN=kube-apiserver-kubelet-client",
                                     "extendedKeyUsage=clientAuth\n"),
    }
    for name, (subject, extensions) in certs.items():
        (pki / f"{name}.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n" + extensions)
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                f"{name}.csr", "-subj", subject, cwd=pki)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", days, "-extfile", f"{name}.ext",
                cwd=pki)
    openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
    for key in pki.glob("*.key"):
        key.chmod(0o600)


def write_kubeconfig(path: Path, server: str, pki: Path, user: str) -> None:
    path.write_text(textwrap.dedent(f"""\
        apiVersion: v1
        kind: Config
        clusters:
        - name: finetune-local
          cluster:
            server: {server}
            certificate-authority: {pki / 'ca.crt'}
        users:
        - name: {user}
          user:
            client-certificate: {pki / f'{user}.crt'}
            client-key: {pki / f'{user}.key'}
        contexts:
        - name: finetune-local
          context:
            cluster: finetune-local
            user: {user}
            namespace: default
        current-context: finetune-local
        """))


# --------------------------------------------------------------------------------------------
# Configuration files


NODES = [
    # name, gpus, product, gpu memory MiB, tainted
    ("gpu-a100-0", 4, "NVIDIA-A100-SXM4-40GB", 40960, True),
    ("gpu-t4-0", 1, "Tesla-T4", 15360, False),
    ("cpu-0", 0, None, 0, False),
]


def nodes_manifest() -> str:
    docs = []
    for name, gpus, product, gpu_memory, tainted in NODES:
        labels = {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "type": "kwok",
        }
        capacity = {"cpu": "64", "memory": "512Gi", "pods": "250", "ephemeral-storage": "1Ti"}
        if gpus:
            labels |= {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": product,
                       "nvidia.com/gpu.count": str(gpus), "nvidia.com/gpu.memory": str(gpu_memory)}
            capacity["nvidia.com/gpu"] = str(gpus)
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": labels,
                         "annotations": {NODE_ANNOTATION: "fake",
                                         "node.alpha.kubernetes.io/ttl": "0"}},
            "spec": {"taints": [FAKE_NODE_TAINT] + ([{"key": "nvidia.com/gpu", "value": "present",
                                                      "effect": "NoSchedule"}] if tainted else [])},
            "status": {"capacity": capacity, "allocatable": capacity},
        }
        docs.append(json.dumps(node))
    return "\n---\n".join(docs) + "\n"


def prometheus_config(state: Path) -> str:
    targets = state / "prometheus" / "targets"
    rules = state / "prometheus" / "rules"
    return textwrap.dedent(f"""\
        # Generated by cluster/localcluster.py; short intervals so tests see samples quickly.
        # Debian's Prometheus has no Kubernetes service discovery: cluster/podtargets.py lists the
        # pods through the API and writes these file_sd files (labels namespace, pod, finetunejob).
        global:
          scrape_interval: 2s
          scrape_timeout: 1s
          evaluation_interval: 2s
        rule_files:
          - {rules}/*.yaml
        scrape_configs:
          # Trainer pods (finetune.dev/component=trainer), at podIP:<port named metrics>.
          - job_name: trainers
            file_sd_configs:
              - files: [{targets}/trainers.json]
                refresh_interval: 2s
          # The operator's pods (app.kubernetes.io/component=operator), likewise.
          - job_name: finetune-operator
            file_sd_configs:
              - files: [{targets}/operator.json]
                refresh_interval: 2s
          - job_name: pushgateway
            honor_labels: true
            static_configs:
              - targets: ["127.0.0.1:{PORTS['pushgateway']}"]
        """)


def corefile(kubeconfig: str, address: str) -> str:
    return textwrap.dedent(f"""\
        # Generated by cluster/localcluster.py: cluster.local from the API, nothing else (no
        # forwarding: pods here have no way out, and names outside the cluster do not resolve).
        .:53 {{
            bind {address}
            errors
            ready {address}:{PORTS['coredns_ready']}
            kubernetes cluster.local in-addr.arpa ip6.arpa {{
                kubeconfig {kubeconfig} finetune-local
                pods insecure
                ttl 5
            }}
        }}
        """)


# --------------------------------------------------------------------------------------------
# Processes


class Cluster:
    def __init__(self, state: Path):
        self.state = state
        self.pids = state / "pids"
        self.logs = state / "logs"
        self.pki = state / "pki"
        self.env_file = state / "env"
        self.network = realnode.Network(state)
        self.ctr = ["ctr", "--address", str(state / "containerd" / "containerd.sock")]

    # --- bookkeeping

    def recorded(self) -> dict[str, int]:
        if not self.pids.is_dir():
            return {}
        return {p.stem: int(p.read_text()) for p in self.pids.glob("*.pid")}

    def running(self) -> bool:
        pids = self.recorded()
        return set(COMPONENTS) <= set(pids) and all(pid_alive(pids[name]) for name in COMPONENTS)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              in_netns: bool = True) -> int:
        """Start a component, in the cluster network namespace unless in_netns is False."""
        if in_netns:
            argv = self.network.exec_prefix() + argv  # `ip netns exec` execs argv in place
        log_path = self.logs / f"{name}.log"
        with open(log_path, "ab") as out:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.state, env={**os.environ, **(env or {})}, start_new_session=True)
        (self.pids / f"{name}.pid").write_text(str(process.pid))
        (self.logs / f"{name}.cmdline").write_text(shlex.join(argv) + "\n")
        return process.pid

    def check_alive(self, name: str) -> None:
        pid = int((self.pids / f"{name}.pid").read_text())
        if not pid_alive(pid):
            tail = (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{name} exited during start-up; last log lines:\n{tail}")

    def wait_for(self, name: str, probe, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive(name)
            with contextlib.suppress(Exception):
                if probe():
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready after {timeout:.0f}s; see {self.logs / name}.log")
            time.sleep(0.3)

    # --- probes

    @property
    def address(self) -> str:
        """Where the cluster's services listen (the cluster network namespace)."""
        return self.network.services

    def api_ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        context.load_cert_chain(self.pki / "admin.crt", self.pki / "admin.key")
        return context

    def api_request(self, path: str, method: str = "GET", body: bytes | None = None,
                    content_type: str = "application/json") -> tuple[int, bytes]:
        url = f"https://{self.address}:{PORTS['apiserver']}{path}"
        request = urllib.request.Request(url, data=body, method=method,
                                         headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, context=self.api_ssl_context(), timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def api_get(self, path: str) -> tuple[int, bytes]:
        return self.api_request(path)

    @staticmethod
    def http_ok(url: str) -> bool:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200

    def in_netns_answers(self, port: int) -> bool:
        """A loopback-only server inside the cluster network namespace accepts connections."""
        probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2).close()"
        return subprocess.run(self.network.exec_prefix() + [sys.executable, "-c", probe],
                              capture_output=True).returncode == 0

    # --- up / down

    def up(self, images: dict[str, str] | None = None) -> None:
        if self.running():
            log(f"cluster already running (state in {self.state})")
            if images is None:
                self.refresh_images()
            return
        if self.recorded() or self.network.file.exists():
            log("found a partly running cluster; stopping it first")
            self.down()
        if os.geteuid() != 0:
            raise SystemExit("the local cluster needs root (network namespaces, cgroups, mounts)")
        images = images if images is not None else load_images()
        started = time.monotonic()
        for d in (self.pids, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        try:
            self._up(images)
        except BaseException:
            log(f"start-up failed; stopping what was started (logs kept in {self.logs})")
            self.down(keep_logs=True)
            raise
        log(f"cluster up in {time.monotonic() - started:.1f}s")

    def _up(self, images: dict[str, str]) -> None:
        state, address, network = self.state, self.address, self.network
        log(f"state in {state}; network {network.subnet} (namespace {network.netns}, "
            f"bridge {network.bridge}); services at {address}")
        network.up()

        log("generating certificates")
        make_pki(self.pki, address)
        server = f"https://{address}:{PORTS['apiserver']}"
        kubeconfigs = {}
        for user in ("admin", "controller-manager", "scheduler", "kubelet"):
            kubeconfigs[user] = state / f"{user}.kubeconfig"
            write_kubeconfig(kubeconfigs[user], server, self.pki, user)
        admin = str(kubeconfigs["admin"])

        log("starting etcd")
        etcd_client = f"http://127.0.0.1:{PORTS['etcd']}"
        etcd_peer = f"http://127.0.0.1:{PORTS['etcd_peer']}"
        self.start("etcd", [
            binary("etcd"), "--name=default", f"--data-dir={state / 'etcd'}",
            f"--listen-client-urls={etcd_client}", f"--advertise-client-urls={etcd_client}",
            f"--listen-peer-urls={etcd_peer}", f"--initial-advertise-peer-urls={etcd_peer}",
            f"--initial-cluster=default={etcd_peer}", "--unsafe-no-fsync",
            "--quota-backend-bytes=2147483648", "--log-level=warn",
        ])
        self.wait_for("etcd", lambda: self.in_netns_answers(PORTS["etcd"]))

        log("starting kube-apiserver")
        pki = self.pki
        self.start("kube-apiserver", [
            binary("kube-apiserver"),
            f"--etcd-servers={etcd_client}",
            f"--bind-address={address}", f"--advertise-address={address}",
            f"--secure-port={PORTS['apiserver']}",
            f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            "--kubelet-preferred-address-types=InternalIP",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,"
            "DefaultTolerationSeconds,Priority,ResourceQuota,MutatingAdmissionWebhook,"
            "ValidatingAdmissionWebhook,ValidatingAdmissionPolicy,NodeRestriction,"
            # As OpenShift: setting blockOwnerDeletion needs delete on the owner.
            "OwnerReferencesPermissionEnforcement",
            "--allow-privileged=true",
            "--profiling=false",
            "--v=1",
        ])
        self.wait_for("kube-apiserver", lambda: self.api_get("/readyz")[0] == 200, timeout=120)

        log("starting kube-controller-manager and kube-scheduler")
        cm = str(kubeconfigs["controller-manager"])
        self.start("kube-controller-manager", [
            binary("kube-controller-manager"),
            f"--kubeconfig={cm}", f"--authentication-kubeconfig={cm}",
            f"--authorization-kubeconfig={cm}",
            "--bind-address=127.0.0.1", f"--secure-port={PORTS['controller_manager']}",
            "--leader-elect=false", "--controllers=*",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # No cloud: nothing programs routes; the pod network is one bridge.
            "--configure-cloud-routes=false",
            # A quota on a resource whose CRD came after the quota controller's start (the tests
            # install it) is counted only at the controller's next full pass: 5 min by default.
            "--resource-quota-sync-period=15s",
            "--v=1",
        ])
        sched = str(kubeconfigs["scheduler"])
        self.start("kube-scheduler", [
            binary("kube-scheduler"),
            f"--kubeconfig={sched}", f"--authentication-kubeconfig={sched}",
            f"--authorization-kubeconfig={sched}",
            "--bind-address=127.0.0.1", f"--secure-port={PORTS['scheduler']}",
            "--leader-elect=false", "--v=1",
        ])
        self.wait_for("kube-controller-manager", lambda: self.in_netns_answers(PORTS["controller_manager"]))
        self.wait_for("kube-scheduler", lambda: self.in_netns_answers(PORTS["scheduler"]))

        log("starting kwok and creating its fake GPU nodes")
        stages = CLUSTER_SRC / "kwok-stages.yaml"
        self.start("kwok", [
            binary("kwok"), f"--kubeconfig={admin}", f"--config={stages}",
            f"--manage-nodes-with-annotation-selector={NODE_ANNOTATION}=fake",
            f"--server-address=127.0.0.1:{PORTS['kwok']}",
            "--node-ip=127.0.0.1", f"--cidr={KWOK_POD_CIDR}",
            "--node-lease-duration-seconds=40",
        ])
        self.wait_for("kwok", lambda: self.in_netns_answers(PORTS["kwok"]))
        (state / "nodes.yaml").write_text(nodes_manifest())
        self.kubectl(admin, "apply", "-f", str(state / "nodes.yaml"))
        self.kubectl(admin, "apply", "-f", str(CLUSTER_SRC / "local-images-policy.yaml"))

        log("starting CoreDNS, versitygw, pushgateway and prometheus")
        (state / "Corefile").write_text(corefile(admin, address))
        self.start("coredns", [binary("coredns"), "-conf", str(state / "Corefile")])
        s3_root = state / "s3"
        s3_root.mkdir(exist_ok=True)
        self.start("versitygw", [
            binary("versitygw"), f"--access={S3_ACCESS_KEY}", f"--secret={S3_SECRET_KEY}",
            f"--region={S3_REGION}", f"--port={address}:{PORTS['versitygw']}",
            "posix", str(s3_root),
        ])
        self.start("pushgateway", [
            binary("prometheus-pushgateway"),
            f"--web.listen-address=0.0.0.0:{PORTS['pushgateway']}",
        ])
        rules = state / "prometheus" / "rules"
        rules.mkdir(parents=True, exist_ok=True)
        targets = state / "prometheus" / "targets"
        self.start("podtargets", [sys.executable, str(CLUSTER_SRC / "podtargets.py"),
                                  f"--kubeconfig={admin}", f"--out-dir={targets}"])
        self.wait_for("podtargets", lambda: (targets / ".ready").exists())
        prom_config = state / "prometheus" / "prometheus.yml"
        prom_config.write_text(prometheus_config(state))
        self.start("prometheus", [
            binary("prometheus"), f"--config.file={prom_config}",
            f"--storage.tsdb.path={state / 'prometheus' / 'data'}",
            f"--web.listen-address={address}:{PORTS['prometheus']}",
            "--web.enable-lifecycle", "--storage.tsdb.retention.time=1d",
        ])

        self.start_node(images, str(kubeconfigs["kubelet"]))

        s3_url = f"http://{address}:{PORTS['versitygw']}"
        prometheus_url = f"http://{address}:{PORTS['prometheus']}"
        pushgateway_url = f"http://{address}:{PORTS['pushgateway']}"
        self.wait_for("coredns", lambda: self.http_ok(f"http://{address}:{PORTS['coredns_ready']}/ready"))
        self.wait_for("versitygw", lambda: self.s3_answers(s3_url))
        self.wait_for("pushgateway", lambda: self.http_ok(f"{pushgateway_url}/-/ready"))
        self.wait_for("prometheus", lambda: self.http_ok(f"{prometheus_url}/-/ready"))

        log("waiting for nodes to be Ready and the default service account")
        self.wait_for("kubelet", self.nodes_ready, timeout=120)
        # The kubelet knows no device plugin and measures no local storage: advertise the node's
        # GPUs and ephemeral storage in its status (the kubelet keeps them across its own status
        # updates; a kubelet restart resets them).
        status, body = self.api_request(
            f"/api/v1/nodes/{realnode.NODE_NAME}/status", method="PATCH",
            body=realnode.capacity_patch(), content_type="application/merge-patch+json")
        if status != 200:
            raise RuntimeError(f"patching the capacity of {realnode.NODE_NAME} failed: {status} {body[:300]!r}")
        self.wait_for("kube-controller-manager",
                      lambda: self.api_get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200,
                      timeout=60)

        env = {
            "FINETUNE_CLUSTER_DIR": str(state),
            "KUBECONFIG": admin,
            "KUBERNETES_API_URL": server,
            # In-cluster clients (the operator's pods) reach the API server here: the local
            # cluster has no kube-proxy, so the `kubernetes` Service's ClusterIP is not routed.
            "FINETUNE_API_SERVER_HOST": address,
            "FINETUNE_API_SERVER_PORT": str(PORTS["apiserver"]),
            "S3_ENDPOINT_URL": s3_url,
            "AWS_ENDPOINT_URL_S3": s3_url,
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "AWS_DEFAULT_REGION": S3_REGION,
            "PROMETHEUS_URL": prometheus_url,
            "PUSHGATEWAY_URL": pushgateway_url,
            "FINETUNE_PROMETHEUS_RULES_DIR": str(rules),
            "FINETUNE_CLUSTER_DNS": address,
            "FINETUNE_NODE_NAME": realnode.NODE_NAME,
            "FINETUNE_POD_LOGS_DIR": str(state / "pod-logs"),
            "FINETUNE_CONTAINERD_ADDRESS": str(state / "containerd" / "containerd.sock"),
            "FINETUNE_OPERATOR_IMAGE": images.get("FINETUNE_OPERATOR_IMAGE", ""),
            "FINETUNE_TRAINER_IMAGE": images.get("FINETUNE_TRAINER_IMAGE", ""),
            "FINETUNE_PAUSE_IMAGE": realnode.PAUSE_IMAGE,
        }
        self.env_file.write_text(
            "# Local cluster settings, written by cluster/localcluster.py up. Source it:\n"
            f"#   source {self.env_file}\n"
            + "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))

    def import_images(self, archives: list[Path]) -> None:
        for archive in archives:
            t = time.monotonic()
            realnode.import_image(self.ctr, archive)
            log(f"imported {archive.name} in {time.monotonic() - t:.1f}s")

    def refresh_images(self) -> None:
        """Build the project's images if the tree changed, move them into the running cluster's
        containerd, and point the env file at them (for working on a running cluster)."""
        images = load_images()
        exports = [f"export {k}={shlex.quote(images[k])}\n" for k in IMAGE_REFERENCES]
        current = self.env_file.read_text().splitlines(keepends=True)
        if all(line in current for line in exports):
            return
        self.import_images([Path(images[k]) for k in IMAGE_ARCHIVES])
        lines = [line for line in current
                 if not line.startswith(tuple(f"export {k}=" for k in IMAGE_REFERENCES))]
        lines += exports
        self.env_file.write_text("".join(lines))

    def start_node(self, images: dict[str, str], kubeconfig: str) -> None:
        """containerd with the project's images, then the kubelet of the real node."""
        state, network = self.state, self.network
        log("starting containerd and importing the images")
        (state / "containerd").mkdir(exist_ok=True)
        (state / "cni" / "net.d").mkdir(parents=True, exist_ok=True)
        (state / "cni" / "net.d" / "10-finetune.conflist").write_text(realnode.cni_config(state, network, [KWOK_POD_CIDR]))
        (state / "containerd" / "config.toml").write_text(realnode.containerd_config(state, network))
        self.start("containerd", [binary("containerd"), "--config",
                                  str(state / "containerd" / "config.toml")], in_netns=False)
        self.wait_for("containerd", lambda: run_ok(self.ctr + ["version"]))
        pause = realnode.pause_image_archive(Path(binary("finetune-pause")), state / "pause.tar")
        self.import_images([pause] + [Path(images[k]) for k in IMAGE_ARCHIVES if images.get(k)])

        log(f"starting the kubelet of node {realnode.NODE_NAME}")
        kubelet_dir = state / "kubelet"
        kubelet_dir.mkdir(exist_ok=True)
        (state / "pod-logs").mkdir(exist_ok=True)
        # Pods get the cluster's DNS (clusterDNS); dnsPolicy Default gets nothing to escape to.
        (kubelet_dir / "resolv.conf").write_text("")
        ports = dict(zip(("kubelet", "kubelet_healthz"), free_ports(2)))
        (kubelet_dir / "config.json").write_text(
            realnode.kubelet_config(state, network, ports, self.pki / "ca.crt"))
        realnode.make_cgroup_root(network)
        self.start("kubelet", [
            binary("kubelet"), f"--config={kubelet_dir / 'config.json'}",
            f"--kubeconfig={kubeconfig}", f"--root-dir={kubelet_dir / 'root'}",
            f"--cert-dir={kubelet_dir / 'pki'}",
            f"--hostname-override={realnode.NODE_NAME}", f"--node-ip={network.gateway}",
            f"--node-labels={realnode.node_labels()}", "--v=1",
        ], in_netns=False)

    @staticmethod
    def s3_answers(url: str) -> bool:
        try:
            urllib.request.urlopen(url, timeout=2)
        except urllib.error.HTTPError:
            pass  # 403 for an unsigned request: it is serving
        return True

    def nodes_ready(self) -> bool:
        status, body = self.api_get("/api/v1/nodes")
        if status != 200:
            return False
        ready = {
            n["metadata"]["name"]
            for n in json.loads(body)["items"]
            for c in n.get("status", {}).get("conditions", [])
            if c["type"] == "Ready" and c["status"] == "True"
        }
        return ready >= {name for name, *_ in NODES} | {realnode.NODE_NAME}

    @staticmethod
    def kubectl(kubeconfig: str, *args: str) -> None:
        subprocess.run([binary("kubectl"), f"--kubeconfig={kubeconfig}", *args], check=True,
                       stdout=subprocess.DEVNULL)

    def down(self, keep_logs: bool = False) -> None:
        pids = self.recorded()
        # Processes others recorded here to share the cluster's lifetime, stopped first, while
        # the API server they talk to is still up.
        for name, pid in pids.items():
            if name not in COMPONENTS:
                stop(name, pid, group=True)
        self.stop_node(pids)
        for name in reversed(NETNS_COMPONENTS):
            if name in pids:
                stop(name, pids[name])
        realnode.unmount_all(self.state)
        self.network.down()
        if keep_logs:
            for path in self.state.iterdir() if self.state.is_dir() else []:
                if path.name != "logs":
                    remove(path)
        else:
            remove(self.state)

    def stop_node(self, pids: dict[str, int]) -> None:
        """The kubelet, every container it started (killed through their cgroups), containerd and
        its shims; then the mounts and cgroups they leave."""
        if "kubelet" in pids:
            stop("kubelet", pids["kubelet"])
        for _ in range(50):
            running = realnode.cgroup_processes(self.network)
            if not running:
                break
            for pid in running:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        if "containerd" in pids:
            stop("containerd", pids["containerd"])
        socket_path = str(self.state / "containerd" / "containerd.sock")
        for shim in processes_with_argument(socket_path):
            stop(f"containerd shim {shim}", shim, grace=2)
        realnode.unmount_all(self.state)
        realnode.remove_cgroups(self.network)
        for link in realnode.container_log_links(self.state):
            link.unlink(missing_ok=True)


def split_image(reference: str) -> dict[str, str]:
    """`repo/name:tag` -> the chart's {repository, tag}."""
    repository, _, tag = reference.rpartition(":")
    if "/" in tag or not repository:  # a registry port, no tag
        return {"repository": reference, "tag": ""}
    return {"repository": repository, "tag": tag}


def operator_chart_values(env: dict[str, str], watch_namespaces: list[str], replicas: int = 1,
                          extra_env: dict[str, str] | None = None) -> dict:
    """Helm values that run the chart's operator Deployment on this cluster: the project's images
    (already in containerd, so never pulled), the cluster's S3, and the API server's address for
    in-cluster clients (no kube-proxy here routes the `kubernetes` Service)."""
    variables = {"KUBERNETES_SERVICE_HOST": env["FINETUNE_API_SERVER_HOST"],
                 "KUBERNETES_SERVICE_PORT": env["FINETUNE_API_SERVER_PORT"],
                 **(extra_env or {})}
    return {
        "image": {**split_image(env["FINETUNE_OPERATOR_IMAGE"]), "pullPolicy": "Never"},
        "trainer": {"image": split_image(env["FINETUNE_TRAINER_IMAGE"])},
        "s3": {"defaultEndpoint": env["S3_ENDPOINT_URL"]},
        "watchNamespaces": list(watch_namespaces),
        "replicaCount": replicas,
        "extraEnv": [{"name": k, "value": str(v)} for k, v in variables.items()],
    }


def load_images() -> dict[str, str]:
    """The project's images (cluster/images.sh): references and archives, built when missing."""
    completed = subprocess.run(["bash", str(CLUSTER_SRC / "images.sh"), "env"],
                               stdout=subprocess.PIPE, text=True)
    if completed.returncode != 0:
        raise SystemExit("building the project's images failed (cluster/images.sh build)")
    images = {}
    for line in completed.stdout.splitlines():
        key, sep, value = line.removeprefix("export ").partition("=")
        if sep and key.startswith("FINETUNE_"):
            images[key.strip()] = shlex.split(value)[0] if value else ""
    needed = set(IMAGE_REFERENCES + IMAGE_ARCHIVES)
    if not needed <= set(images):
        raise SystemExit(f"cluster/images.sh env printed no {sorted(needed - set(images))}")
    return images


def run_ok(argv: list[str]) -> bool:
    return subprocess.run(argv, capture_output=True).returncode == 0


def processes_with_argument(argument: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if argument.encode() in (entry / "cmdline").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
    return found


def stop(name: str, pid: int, group: bool = False, grace: float = 10.0) -> None:
    """SIGTERM the process (and its process group: every component leads its own), then SIGKILL."""
    kill = os.killpg if group else os.kill
    if not pid_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        log(f"{name} ({pid}) ignored SIGTERM; killing")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(pid, signal.SIGKILL)
    log(f"stopped {name} ({pid})")


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "status", "env", "images"],
                        help="images: rebuild what changed and load it into the running cluster")
    parser.add_argument("--no-product-images", action="store_true",
                        help="up: import only the pause image (for testing the cluster itself)")
    args = parser.parse_args(argv)
    cluster = Cluster(state_dir())
    if args.command == "up":
        cluster.up(images={} if args.no_product_images else None)
        print(cluster.env_file.read_text(), end="")
        print(f"\nUse it:  source {cluster.env_file}   (or: export KUBECONFIG={cluster.state / 'admin.kubeconfig'})")
    elif args.command == "down":
        cluster.down()
    elif args.command == "images":
        if not cluster.running():
            print("local cluster is not running", file=sys.stderr)
            return 1
        cluster.refresh_images()
    elif args.command == "env":
        if not cluster.running():
            print("local cluster is not running", file=sys.stderr)
            return 1
        print(cluster.env_file)
    else:
        for name, pid in sorted(cluster.recorded().items()):
            print(f"{name:26} {pid:>8} {'running' if pid_alive(pid) else 'DEAD'}")
        return 0 if cluster.running() else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Start and stop the local cluster: a real Kubernetes control plane, fake GPU nodes, S3, Prometheus.

    python cluster/localcluster.py up       # start (or find running) and print the env file
    python cluster/localcluster.py down     # stop every process `up` started, remove the state
    python cluster/localcluster.py status   # exit 0 when every recorded process is alive

Everything listens on 127.0.0.1 only, on ports picked free at start-up:

* etcd, kube-apiserver (RBAC, the usual admission plugins, certificates made here with the
  openssl CLI), kube-controller-manager (all controllers), kube-scheduler;
* kwok keeps three Node objects Ready and plays the lifecycle of ordinary pods (Running, then
  Succeeded for Job pods): ``gpu-a100-0`` (4 nvidia.com/gpu, tainted ``nvidia.com/gpu:NoSchedule``),
  ``gpu-t4-0`` (1 nvidia.com/gpu) and ``cpu-0``;
* ``cluster/podagent.py`` runs pods labelled ``finetune.dev/component=trainer`` as local processes
  (kwok's stages leave those pods alone);
* versitygw serves S3 from a local directory; Prometheus scrapes the agent's trainer pods, the
  operator (targets file written by whoever runs it) and a Pushgateway.

State lives in ``$FINETUNE_CLUSTER_DIR`` (default ``<repo>/.state/cluster``, gitignored): pid files,
logs, certificates, data, and ``env``, a shell file with KUBECONFIG, S3 and Prometheus settings.
Binaries are looked up on PATH (``make cluster-build`` puts them in ``$CACHE_DIR/bin``). The agent
runs under ``$FINETUNE_CLUSTER_PYTHON`` (default: the interpreter running this script), which needs
the ``kubernetes`` client. Standard library only, so the fixtures and the Makefile can share it.
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

REPO = Path(__file__).resolve().parent.parent
CLUSTER_SRC = Path(__file__).resolve().parent
DEFAULT_STATE_DIR = REPO / ".state" / "cluster"

# Fixed test credentials of the local S3 server; never used outside this machine.
S3_ACCESS_KEY = "finetune-test"
S3_SECRET_KEY = "finetune-test-secret"
S3_REGION = "us-east-1"
SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"
POD_CIDR = "10.244.0.0/16"
TRAINER_LABEL = "finetune.dev/component"
TRAINER_VALUE = "trainer"
NODE_ANNOTATION = "kwok.x-k8s.io/node"

# Start order; `down` stops them in reverse.
COMPONENTS = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "podagent",
    "versitygw",
    "pushgateway",
    "prometheus",
]


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


def make_pki(pki: Path) -> None:
    """A cluster CA, the API server's serving certificate, client certificates, the SA key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    days = "3650"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
            "-days", days, "-subj", "/CN=finetune-local-ca", cwd=pki)
    sans = ",".join([
        "IP:127.0.0.1", f"IP:{KUBERNETES_SERVICE_IP}", "DNS:localhost", "DNS:kubernetes",
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
            "spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present",
                                 "effect": "NoSchedule"}] if tainted else []},
            "status": {"capacity": capacity, "allocatable": capacity},
        }
        docs.append(json.dumps(node))
    return "\n---\n".join(docs) + "\n"


def prometheus_config(state: Path, pushgateway_port: int) -> str:
    targets = state / "prometheus" / "targets"
    rules = state / "prometheus" / "rules"
    return textwrap.dedent(f"""\
        # Generated by cluster/localcluster.py; short intervals so tests see samples quickly.
        global:
          scrape_interval: 2s
          scrape_timeout: 1s
          evaluation_interval: 2s
        rule_files:
          - {rules}/*.yaml
        scrape_configs:
          # Trainer pods run by cluster/podagent.py (labels: namespace, pod, finetunejob).
          - job_name: trainers
            file_sd_configs:
              - files: [{targets}/trainers.json]
                refresh_interval: 2s
          # The operator's metrics endpoint: whoever runs the operator writes operator.json,
          # e.g. [{{"targets": ["127.0.0.1:8080"], "labels": {{}}}}].
          - job_name: finetune-operator
            file_sd_configs:
              - files: [{targets}/operator.json]
                refresh_interval: 2s
          - job_name: pushgateway
            honor_labels: true
            static_configs:
              - targets: ["127.0.0.1:{pushgateway_port}"]
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
        self.ports_file = state / "ports.json"

    # --- bookkeeping

    def recorded(self) -> dict[str, int]:
        if not self.pids.is_dir():
            return {}
        return {p.stem: int(p.read_text()) for p in self.pids.glob("*.pid")}

    def running(self) -> bool:
        pids = self.recorded()
        return set(COMPONENTS) <= set(pids) and all(pid_alive(pids[name]) for name in COMPONENTS)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
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

    def api_ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        context.load_cert_chain(self.pki / "admin.crt", self.pki / "admin.key")
        return context

    def api_get(self, path: str) -> tuple[int, bytes]:
        ports = json.loads(self.ports_file.read_text())
        url = f"https://127.0.0.1:{ports['apiserver']}{path}"
        try:
            with urllib.request.urlopen(url, context=self.api_ssl_context(), timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    @staticmethod
    def http_ok(url: str) -> bool:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200

    @staticmethod
    def https_answers(port: int) -> bool:
        """A TLS endpoint that answers at all (401/403 included) is up."""
        context = ssl._create_unverified_context()  # local self-signed serving certs
        try:
            urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=context, timeout=2)
        except urllib.error.HTTPError:
            pass
        return True

    # --- up / down

    def up(self, python: str) -> None:
        if self.running():
            log(f"cluster already running (state in {self.state})")
            return
        if self.recorded():
            log("found a partly running cluster; stopping it first")
            self.down()
        started = time.monotonic()
        for d in (self.pids, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        try:
            self._up(python)
        except BaseException:
            log(f"start-up failed; stopping what was started (logs kept in {self.logs})")
            self.down(keep_logs=True)
            raise
        log(f"cluster up in {time.monotonic() - started:.1f}s")

    def _up(self, python: str) -> None:
        state = self.state
        names = ["etcd", "etcd_peer", "apiserver", "controller_manager", "scheduler", "kwok",
                 "versitygw", "prometheus", "pushgateway"]
        ports = dict(zip(names, free_ports(len(names))))
        self.ports_file.write_text(json.dumps(ports, indent=2) + "\n")
        log(f"state in {state}; ports {ports}")

        log("generating certificates")
        make_pki(self.pki)
        server = f"https://127.0.0.1:{ports['apiserver']}"
        kubeconfigs = {}
        for user in ("admin", "controller-manager", "scheduler"):
            kubeconfigs[user] = state / f"{user}.kubeconfig"
            write_kubeconfig(kubeconfigs[user], server, self.pki, user)
        admin = str(kubeconfigs["admin"])

        log("starting etcd")
        etcd_client = f"http://127.0.0.1:{ports['etcd']}"
        etcd_peer = f"http://127.0.0.1:{ports['etcd_peer']}"
        self.start("etcd", [
            binary("etcd"), "--name=default", f"--data-dir={state / 'etcd'}",
            f"--listen-client-urls={etcd_client}", f"--advertise-client-urls={etcd_client}",
            f"--listen-peer-urls={etcd_peer}", f"--initial-advertise-peer-urls={etcd_peer}",
            f"--initial-cluster=default={etcd_peer}", "--unsafe-no-fsync",
            "--quota-backend-bytes=2147483648", "--log-level=warn",
        ])
        self.wait_for("etcd", lambda: self.http_ok(f"{etcd_client}/health"))

        log("starting kube-apiserver")
        pki = self.pki
        self.start("kube-apiserver", [
            binary("kube-apiserver"),
            f"--etcd-servers={etcd_client}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={ports['apiserver']}",
            f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,"
            "DefaultTolerationSeconds,Priority,ResourceQuota,MutatingAdmissionWebhook,"
            "ValidatingAdmissionWebhook,ValidatingAdmissionPolicy,NodeRestriction",
            "--allow-privileged=true",
            "--endpoint-reconciler-type=none",
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
            "--bind-address=127.0.0.1", f"--secure-port={ports['controller_manager']}",
            "--leader-elect=false", "--controllers=*",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # No kubelets: nothing reports volume or route state; keep those controllers quiet.
            "--configure-cloud-routes=false",
            "--v=1",
        ])
        sched = str(kubeconfigs["scheduler"])
        self.start("kube-scheduler", [
            binary("kube-scheduler"),
            f"--kubeconfig={sched}", f"--authentication-kubeconfig={sched}",
            f"--authorization-kubeconfig={sched}",
            "--bind-address=127.0.0.1", f"--secure-port={ports['scheduler']}",
            "--leader-elect=false", "--v=1",
        ])
        self.wait_for("kube-controller-manager", lambda: self.https_answers(ports["controller_manager"]))
        self.wait_for("kube-scheduler", lambda: self.https_answers(ports["scheduler"]))

        log("starting kwok and creating nodes")
        stages = CLUSTER_SRC / "kwok-stages.yaml"
        self.start("kwok", [
            binary("kwok"), f"--kubeconfig={admin}", f"--config={stages}",
            f"--manage-nodes-with-annotation-selector={NODE_ANNOTATION}=fake",
            f"--server-address=127.0.0.1:{ports['kwok']}",
            "--node-ip=127.0.0.1", f"--cidr={POD_CIDR}",
            "--node-lease-duration-seconds=40",
        ])
        self.wait_for("kwok", lambda: self.http_ok(f"http://127.0.0.1:{ports['kwok']}/healthz"))
        (state / "nodes.yaml").write_text(nodes_manifest())
        self.kubectl(admin, "apply", "-f", str(state / "nodes.yaml"))

        log("starting the pod agent")
        agent_dir = state / "podagent"
        targets = state / "prometheus" / "targets"
        for d in (agent_dir, targets, state / "prometheus" / "rules"):
            d.mkdir(parents=True, exist_ok=True)
        for name in ("trainers.json", "operator.json"):
            if not (targets / name).exists():
                (targets / name).write_text("[]\n")
        self.start("podagent", [
            python, str(CLUSTER_SRC / "podagent.py"), f"--kubeconfig={admin}",
            f"--state-dir={agent_dir}", f"--targets-file={targets / 'trainers.json'}",
        ])
        self.wait_for("podagent", lambda: (agent_dir / "ready").exists(), timeout=60)

        log("starting versitygw, pushgateway and prometheus")
        s3_root = state / "s3"
        s3_root.mkdir(exist_ok=True)
        self.start("versitygw", [
            binary("versitygw"), f"--access={S3_ACCESS_KEY}", f"--secret={S3_SECRET_KEY}",
            f"--region={S3_REGION}", f"--port=127.0.0.1:{ports['versitygw']}",
            "posix", str(s3_root),
        ])
        self.start("pushgateway", [
            binary("prometheus-pushgateway"),
            f"--web.listen-address=127.0.0.1:{ports['pushgateway']}",
        ])
        prom_config = state / "prometheus" / "prometheus.yml"
        prom_config.write_text(prometheus_config(state, ports["pushgateway"]))
        self.start("prometheus", [
            binary("prometheus"), f"--config.file={prom_config}",
            f"--storage.tsdb.path={state / 'prometheus' / 'data'}",
            f"--web.listen-address=127.0.0.1:{ports['prometheus']}",
            "--web.enable-lifecycle", "--storage.tsdb.retention.time=1d",
        ])
        s3_url = f"http://127.0.0.1:{ports['versitygw']}"
        self.wait_for("versitygw", lambda: self.s3_answers(s3_url))
        self.wait_for("pushgateway", lambda: self.http_ok(f"http://127.0.0.1:{ports['pushgateway']}/-/ready"))
        self.wait_for("prometheus", lambda: self.http_ok(f"http://127.0.0.1:{ports['prometheus']}/-/ready"))

        log("waiting for nodes to be Ready and the default service account")
        self.wait_for("kwok", self.nodes_ready, timeout=60)
        self.wait_for("kube-controller-manager",
                      lambda: self.api_get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200,
                      timeout=60)

        env = {
            "FINETUNE_CLUSTER_DIR": str(state),
            "KUBECONFIG": admin,
            "KUBERNETES_API_URL": server,
            "S3_ENDPOINT_URL": s3_url,
            "AWS_ENDPOINT_URL_S3": s3_url,
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "AWS_DEFAULT_REGION": S3_REGION,
            "PROMETHEUS_URL": f"http://127.0.0.1:{ports['prometheus']}",
            "PUSHGATEWAY_URL": f"http://127.0.0.1:{ports['pushgateway']}",
            "FINETUNE_PROMETHEUS_TARGETS_DIR": str(targets),
            "FINETUNE_PROMETHEUS_RULES_DIR": str(state / "prometheus" / "rules"),
            "FINETUNE_PODAGENT_PORTS": str(agent_dir / "ports.json"),
        }
        self.env_file.write_text(
            "# Local cluster settings, written by cluster/localcluster.py up. Source it:\n"
            f"#   source {self.env_file}\n"
            + "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))

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
        return ready >= {name for name, *_ in NODES}

    @staticmethod
    def kubectl(kubeconfig: str, *args: str) -> None:
        subprocess.run([binary("kubectl"), f"--kubeconfig={kubeconfig}", *args], check=True,
                       stdout=subprocess.DEVNULL)

    def down(self, keep_logs: bool = False) -> None:
        pids = self.recorded()
        # Processes others recorded here to share the cluster's lifetime (the demo's operator),
        # stopped first, while the API server they talk to is still up.
        for name, pid in pids.items():
            if name not in COMPONENTS:
                stop(name, pid, group=True)
        for name in reversed(COMPONENTS):
            if name in pids:
                stop(name, pids[name])
        # Trainer processes the agent did not get to stop (it records their process groups).
        for pid_file in (self.state / "podagent" / "pids").glob("*"):
            with contextlib.suppress(ValueError):
                stop(f"pod process {pid_file.name}", int(pid_file.name), group=True)
        if keep_logs:
            for path in self.state.iterdir() if self.state.is_dir() else []:
                if path.name != "logs":
                    remove(path)
        else:
            remove(self.state)


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
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument("--python", default=os.environ.get("FINETUNE_CLUSTER_PYTHON", sys.executable),
                        help="interpreter for the pod agent (needs the kubernetes client)")
    args = parser.parse_args(argv)
    cluster = Cluster(state_dir())
    if args.command == "up":
        cluster.up(args.python)
        print(cluster.env_file.read_text(), end="")
        print(f"\nUse it:  source {cluster.env_file}   (or: export KUBECONFIG={cluster.state / 'admin.kubeconfig'})")
    elif args.command == "down":
        cluster.down()
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

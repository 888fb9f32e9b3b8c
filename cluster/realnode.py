"""The local cluster's network and its real node: a bridge, a network namespace for the services
pods must reach, containerd + runc, and a kubelet.

Layout (one /24 per cluster, chosen from the state directory so two clusters do not collide)::

    host network namespace                      network namespace ft-<id> ("the cluster network")
    ----------------------                      ------------------------------------------------
    bridge ftb-<id>   10.X.Y.1/24  <--veth-->   eth0 10.X.Y.2/24: etcd (on its own loopback),
      kubelet (node IP 10.X.Y.1), containerd      kube-apiserver, controller-manager, scheduler, kwok,
      pods 10.X.Y.16-254 (CNI bridge)             CoreDNS (:53), S3, Pushgateway, Prometheus

Every address in use is on the bridge this module creates or inside namespaces it (or containerd,
for pods) creates; nothing is routed off the machine (no default route in pods, no NAT, IP
forwarding left as it is). The host reaches the services at 10.X.Y.2 and pods at their pod IPs.

Standard library only; used by cluster/localcluster.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import ipaddress
import json
import os
import subprocess
import tarfile
import textwrap
import time
from pathlib import Path

NODE_NAME = "real-0"
# What the real node advertises: the trainer's GPU requests schedule here (there is no GPU: torch
# runs on the CPU), with the labels of a GPU node so node selectors behave as on a cluster.
NODE_GPUS = 2
NODE_GPU_PRODUCT = "NVIDIA-A100-SXM4-40GB"
# The kubelet runs with localStorageCapacityIsolation off and so advertises no ephemeral-storage:
# trainer pods, which request it, schedule against this instead (as on the fake nodes); their
# limits are not enforced here.
NODE_EPHEMERAL_STORAGE = "1Ti"
PAUSE_IMAGE = "localhost/finetune/pause:1"
SYSCTLS = {
    # The kubelet refuses to start unless these are set (it checks kernel defaults).
    "vm.overcommit_memory": "1",
    "kernel.panic": "10",
    "kernel.panic_on_oops": "1",
}
CGROUP_ROOT = Path("/sys/fs/cgroup")


def run(*argv: str, check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=check, capture_output=True, input=input)


class Network:
    """Names and addresses of one cluster's network, derived from its state directory."""

    def __init__(self, state: Path):
        self.id = hashlib.sha256(str(state).encode()).hexdigest()[:6]
        self.netns = f"ft-{self.id}"
        self.bridge = f"ftb-{self.id}"
        self.veth_host = f"ftv-{self.id}"
        self.cni_name = f"finetune-{self.id}"
        self.file = state / "network.json"
        saved = json.loads(self.file.read_text()) if self.file.exists() else {}
        self.subnet = ipaddress.ip_network(saved.get("subnet") or self._pick_subnet())

    def _pick_subnet(self) -> str:
        in_use = [ipaddress.ip_network(line.split()[0], strict=False)
                  for line in run("ip", "-4", "route", "show", "table", "all").stdout.decode().splitlines()
                  if line and line.split()[0][0].isdigit()]
        start = int(self.id, 16) % 200
        for offset in range(200):
            candidate = ipaddress.ip_network(f"10.213.{(start + offset) % 200 + 20}.0/24")
            if not any(candidate.overlaps(route) for route in in_use):
                return str(candidate)
        raise RuntimeError("no free 10.213.x.0/24 for the local cluster's network")

    @property
    def gateway(self) -> str:
        """The host's address on the bridge; also the node's IP."""
        return str(self.subnet.network_address + 1)

    @property
    def services(self) -> str:
        """The cluster network namespace's address: API server, DNS, S3, Prometheus."""
        return str(self.subnet.network_address + 2)

    @property
    def pod_range(self) -> tuple[str, str]:
        return str(self.subnet.network_address + 16), str(self.subnet.broadcast_address - 1)

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns]

    def up(self) -> None:
        self.file.write_text(json.dumps({"subnet": str(self.subnet), "netns": self.netns,
                                         "bridge": self.bridge}) + "\n")
        for key, value in SYSCTLS.items():
            Path("/proc/sys", *key.split(".")).write_text(value)
        prefix = self.subnet.prefixlen
        run("ip", "link", "add", self.bridge, "type", "bridge")
        run("ip", "addr", "add", f"{self.gateway}/{prefix}", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")
        run("ip", "netns", "add", self.netns)
        run("ip", "link", "add", self.veth_host, "type", "veth", "peer", "name", "eth0",
            "netns", self.netns)
        run("ip", "link", "set", self.veth_host, "master", self.bridge, "up")
        inside = self.exec_prefix()
        run(*inside, "ip", "addr", "add", f"{self.services}/{prefix}", "dev", "eth0")
        run(*inside, "ip", "link", "set", "eth0", "up")
        run(*inside, "ip", "link", "set", "lo", "up")

    def down(self) -> None:
        run("ip", "netns", "delete", self.netns, check=False)
        run("ip", "link", "delete", self.veth_host, check=False)
        run("ip", "link", "delete", self.bridge, check=False)

    def leftovers(self) -> list[str]:
        """Interfaces and namespaces of this network that still exist (empty after down())."""
        found = []
        links = run("ip", "-o", "link", "show", check=False).stdout.decode()
        for name in (self.bridge, self.veth_host):
            if f" {name}:" in links or f" {name}@" in links:
                found.append(f"link {name}")
        if self.netns in run("ip", "netns", "list", check=False).stdout.decode().split():
            found.append(f"netns {self.netns}")
        return found


# --------------------------------------------------------------------------------------------
# containerd


def containerd_config(state: Path, network: Network) -> str:
    base = state / "containerd"
    return textwrap.dedent(f"""\
        # Generated by cluster/realnode.py: containerd for the local cluster's real node only.
        version = 2
        root = "{base / 'root'}"
        state = "{base / 'state'}"
        oom_score = 0
        # Plugins that would touch machine-wide paths or need absent kernel features.
        disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs",
                            "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs",
                            "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"]

        [grpc]
          address = "{base / 'containerd.sock'}"

        [ttrpc]
          address = "{base / 'containerd.sock.ttrpc'}"

        [debug]
          address = "{base / 'debug.sock'}"

        [metrics]
          address = ""

        [plugins."io.containerd.grpc.v1.cri"]
          sandbox_image = "{PAUSE_IMAGE}"
          # root here lacks CAP_SYS_RESOURCE: a negative oom_score_adj would be refused.
          restrict_oom_score_adj = true
          disable_apparmor = true
          netns_mounts_under_state_dir = true
          enable_selinux = false
          [plugins."io.containerd.grpc.v1.cri".containerd]
            snapshotter = "overlayfs"
            default_runtime_name = "runc"
            [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
              runtime_type = "io.containerd.runc.v2"
              [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
                BinaryName = "runc"
                SystemdCgroup = false
          [plugins."io.containerd.grpc.v1.cri".cni]
            bin_dir = "/usr/lib/cni"
            conf_dir = "{state / 'cni' / 'net.d'}"
            max_conf_num = 1
        """)


def cni_config(state: Path, network: Network, namespace_cidrs: list[str] = ()) -> str:
    """`namespace_cidrs`: ranges the pods reach through the cluster network namespace (kwok's
    fake pod IPs, which tests may serve there), besides the bridge."""
    first, last = network.pod_range
    return json.dumps({
        "cniVersion": "1.0.0",
        "name": network.cni_name,
        "plugins": [{
            "type": "bridge",
            "bridge": network.bridge,
            # The bridge already has the gateway address; pods get no default route and no NAT,
            # so the only addresses they reach are on this bridge (and `namespace_cidrs`, in the
            # cluster's own network namespace on it).
            "isGateway": False,
            "ipMasq": False,
            "hairpinMode": True,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": str(network.subnet), "rangeStart": first, "rangeEnd": last}]],
                "dataDir": str(state / "cni" / "ipam"),
                "routes": [{"dst": cidr, "gw": network.services} for cidr in namespace_cidrs],
            },
        }],
    }, indent=2) + "\n"


def pause_image_archive(pause_binary: Path, out: Path) -> Path:
    """A docker-archive of a FROM-scratch image holding only the pause binary (deterministic)."""
    layer = io.BytesIO()
    pause_binary = pause_binary.resolve()  # $CACHE_DIR/bin holds links
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tar.gettarinfo(str(pause_binary), arcname="pause")
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        info.mode = 0o755
        with open(pause_binary, "rb") as f:
            tar.addfile(info, f)
    layer_bytes = layer.getvalue()
    layer_digest = hashlib.sha256(layer_bytes).hexdigest()
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
    }, sort_keys=True).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [PAUSE_IMAGE],
                            "Layers": [f"{layer_digest}/layer.tar"]}]).encode()
    with tarfile.open(out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in ((f"{layer_digest}/layer.tar", layer_bytes), (config_name, config),
                           ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return out


def import_image(ctr: list[str], archive: Path) -> None:
    """Move an image archive into containerd's k8s.io namespace (what the kubelet uses)."""
    result = run(*ctr, "-n", "k8s.io", "images", "import", str(archive), check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ctr images import {archive} failed: {result.stderr.decode()[-2000:]}")


# --------------------------------------------------------------------------------------------
# kubelet


def kubelet_config(state: Path, network: Network, ports: dict[str, int], ca: Path) -> str:
    kubelet = state / "kubelet"
    return json.dumps({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # cgroups here are v1 (hybrid layout); no systemd to delegate to.
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/finetune-{network.id}",
        "cgroupsPerQOS": True,
        # root here lacks CAP_SYS_RESOURCE: keep the kubelet's and containerd's own score.
        "oomScoreAdj": 0,
        "failSwapOn": False,
        "localStorageCapacityIsolation": False,
        "enforceNodeAllocatable": [],
        "evictionHard": {"memory.available": "0%", "nodefs.available": "0%",
                         "nodefs.inodesFree": "0%", "imagefs.available": "0%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "containerRuntimeEndpoint": f"unix://{state / 'containerd' / 'containerd.sock'}",
        "address": network.gateway,
        "port": ports["kubelet"],
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": ports["kubelet_healthz"],
        # Only clients with a certificate of the cluster's CA (the API server's kubelet client)
        # get in, and they may do anything: logs, exec, port-forward.
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                           "x509": {"clientCAFile": str(ca)}},
        "authorization": {"mode": "AlwaysAllow"},
        "clusterDomain": "cluster.local",
        "clusterDNS": [network.services],
        "resolvConf": str(kubelet / "resolv.conf"),
        "podLogsDir": str(state / "pod-logs"),
        "serializeImagePulls": False,
        "maxPods": 110,
        "syncFrequency": "10s",
        "fileCheckFrequency": "0s",
        "nodeStatusUpdateFrequency": "5s",
        "shutdownGracePeriod": "0s",
        "registerWithTaints": [],
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
    }, indent=2) + "\n"


def node_labels() -> str:
    labels = {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": NODE_GPU_PRODUCT,
              "nvidia.com/gpu.count": str(NODE_GPUS), "finetune.dev/node": "real"}
    return ",".join(f"{k}={v}" for k, v in labels.items())


def capacity_patch() -> bytes:
    """The resources the kubelet cannot advertise itself: GPUs and ephemeral storage."""
    resources = {"nvidia.com/gpu": str(NODE_GPUS), "ephemeral-storage": NODE_EPHEMERAL_STORAGE}
    return json.dumps({"status": {"capacity": resources, "allocatable": resources}}).encode()


# --------------------------------------------------------------------------------------------
# Clean-up of what the kubelet and containerd leave in the machine: mounts and cgroups.


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below root, deepest first."""
    prefix = str(root.resolve())
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(set(points), key=lambda p: (-p.count("/"), p))


def unmount_all(root: Path) -> None:
    for _ in range(5):
        points = mounts_under(root)
        if not points:
            return
        for point in points:
            run("umount", "--lazy", point, check=False)
        time.sleep(0.2)


CONTAINER_LOG_LINKS = Path("/var/log/containers")  # the kubelet's, whatever its root dir


def container_log_links(state: Path) -> list[Path]:
    """The kubelet's /var/log/containers links into this cluster's pod logs."""
    if not CONTAINER_LOG_LINKS.is_dir():
        return []
    prefix = str(state.resolve()) + "/"
    return [link for link in CONTAINER_LOG_LINKS.iterdir()
            if link.is_symlink() and os.readlink(link).startswith(prefix)]


def cgroup_dirs(network: Network) -> list[Path]:
    """The cluster's cgroup directories in every hierarchy, deepest first."""
    found = []
    for hierarchy in CGROUP_ROOT.iterdir() if CGROUP_ROOT.is_dir() else []:
        top = hierarchy / f"finetune-{network.id}"
        if top.is_dir():
            found += [Path(dirpath) for dirpath, _, _ in os.walk(top)]
    return sorted(found, key=lambda p: -len(p.parts))


def make_cgroup_root(network: Network) -> None:
    for hierarchy in CGROUP_ROOT.iterdir():
        if hierarchy.is_dir() and not hierarchy.is_symlink() and (hierarchy / "cgroup.procs").exists():
            with contextlib.suppress(OSError):
                (hierarchy / f"finetune-{network.id}").mkdir(exist_ok=True)


def cgroup_processes(network: Network) -> set[int]:
    pids = set()
    for directory in cgroup_dirs(network):
        with contextlib.suppress(OSError):
            pids |= {int(p) for p in (directory / "cgroup.procs").read_text().split()}
    return pids


def remove_cgroups(network: Network) -> None:
    for directory in cgroup_dirs(network):
        with contextlib.suppress(OSError):
            directory.rmdir()

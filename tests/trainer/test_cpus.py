"""The trainer sizes its thread pools by the pod's CPUs, not the node's."""

import os
import subprocess
import sys

from finetune_trainer import cpus


def _cgroup_v2(tmp_path, cpu_max: str):
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    return tmp_path


def test_a_cpu_limit_caps_the_threads_below_the_cores_the_process_sees(tmp_path):
    root = _cgroup_v2(tmp_path, "250000 100000")  # cpu: 2.5
    assert cpus.cgroup_cpu_limit(root) == 2.5
    assert cpus.cpu_budget(root=root, affinity=set(range(64))) == 3
    assert cpus.cpu_budget(processes=2, root=root, affinity=set(range(64))) == 1


def test_no_limit_means_the_affinity_and_never_zero(tmp_path):
    root = _cgroup_v2(tmp_path, "max 100000")
    assert cpus.cgroup_cpu_limit(root) is None
    assert cpus.cpu_budget(root=root, affinity={0, 1, 2, 3}) == 4
    assert cpus.cpu_budget(processes=8, root=root, affinity={0, 1, 2, 3}) == 1


def test_cgroup_v1_quota(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus.cpu_budget(root=tmp_path, affinity=set(range(16))) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpus.cgroup_cpu_limit(tmp_path) is None


def test_limit_threads_sizes_torch_and_the_blas_pools_to_the_cgroup_limit(tmp_path):
    """A container limited to one CPU on this (multi-core) machine: torch's pool and every
    OpenMP/BLAS pool, including those of libraries loaded afterwards, get one thread."""
    _cgroup_v2(tmp_path, "100000 100000")
    program = (
        "import sys; from pathlib import Path; from finetune_trainer import cpus\n"
        "cpus.CGROUP = Path(sys.argv[1])\n"
        "cpus.limit_threads(log=lambda *a: None)\n"
        "# scipy's and scikit-learn's pools load after the limit, as in the trainer\n"
        "from threadpoolctl import threadpool_info; import scipy.linalg, sklearn.linear_model\n"
        "import torch\n"
        "print(torch.get_num_threads(), sorted({p['num_threads'] for p in threadpool_info()}))\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    run = subprocess.run([sys.executable, "-c", program, str(tmp_path)], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert run.split(maxsplit=1) == ["1", "[1]\n"]
    unlimited = subprocess.run(
        [sys.executable, "-c", program.replace("cpus.limit_threads", "0 and cpus.limit_threads"),
         str(tmp_path)], env=env, capture_output=True, text=True, check=True).stdout
    if len(os.sched_getaffinity(0)) > 1:  # without the limit the pools would be larger
        assert unlimited.split(maxsplit=1) != ["1", "[1]\n"]
    explicit = subprocess.run([sys.executable, "-c", program, str(tmp_path / "none")],
                              env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True, check=True).stdout
    assert explicit.split(maxsplit=1) == ["1", "[1]\n"]

import io
import sys
from pathlib import Path

import pytest

# The helpers next to the tests (operator_factories, e2e_support) import however pytest started.
sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[2]
DATASETS_BUCKET = "datasets"
MODELS_BUCKET = "models"


@pytest.fixture(scope="session")
def installed_crd(kubectl):
    """The CRD as `kubectl apply -f crds/` installs it (idempotent)."""
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    kubectl("wait", "--for=condition=Established", "crd/finetunejobs.finetune.dev",
            "--timeout=60s")


@pytest.fixture
def operator_factory(kubectl, kubeconfig, cluster_env, tmp_path):
    """start(namespaces, home=None, **env) -> a running `finetune-operator` process watching
    `namespaces` with rbac.py's permissions only; all are stopped after the test."""
    from e2e_support import OperatorProcess, grant_operator

    started = []

    def start(namespaces, home=None, **env):
        home = home or namespaces[0]
        config = grant_operator(kubectl, kubeconfig, namespaces, home, tmp_path)
        process = OperatorProcess(config, namespaces, home, cluster_env["S3_ENDPOINT_URL"],
                                  tmp_path / f"operator-{len(started)}.log", **env)
        started.append(process.start())
        return process

    yield start
    for process in started:
        process.stop()
        print(f"--- operator log ({process.log_path}) ---\n{process.log_tail(80)}")


@pytest.fixture
def ftj_operator(operator_factory, namespace):
    return operator_factory([namespace]).wait_leader()


def _upload_tree(s3_client, root: Path, bucket: str, prefix: str) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            s3_client.upload_file(str(path), bucket, prefix + path.relative_to(root).as_posix())


@pytest.fixture(scope="session")
def datasets(s3_client, tmp_path_factory):
    """Tiny datasets in the cluster's S3 (s3://datasets/...), and the models bucket:
    fashion-mnist (10 classes x 10 train + 3 val, 32 px: what examples/fashion-mnist.yaml reads),
    and one-class (a single class: the trainer refuses it with INVALID_DATA)."""
    from PIL import Image

    from finetune_trainer.samples import write_fashion_mnist

    existing = {b["Name"] for b in s3_client.list_buckets().get("Buckets", [])}
    for bucket in (DATASETS_BUCKET, MODELS_BUCKET):
        if bucket not in existing:
            s3_client.create_bucket(Bucket=bucket)
    root = tmp_path_factory.mktemp("datasets")
    fashion = write_fashion_mnist(root / "fashion-mnist", per_class=10, val_per_class=3,
                                  image_size=32, seed=0)
    _upload_tree(s3_client, Path(fashion), DATASETS_BUCKET, "fashion-mnist/")
    for index in range(6):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (index * 40, 0, 0)).save(buffer, format="PNG")
        s3_client.put_object(Bucket=DATASETS_BUCKET, Key=f"one-class/train/cats/{index}.png",
                             Body=buffer.getvalue())
    return {"fashion-mnist": f"s3://{DATASETS_BUCKET}/fashion-mnist/",
            "one-class": f"s3://{DATASETS_BUCKET}/one-class/"}

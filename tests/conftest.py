"""Shared fixtures: one Ray instance per test session (started lazily), dataset location."""

from __future__ import annotations

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs for the whole session; tests request fractional CPUs."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    started = False
    if not ray.is_initialized():
        # address="local": a new instance, even while another Ray (test_multinode's) runs here
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, namespace="qinco-tests")
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def one_faiss_thread():
    """Faiss on one thread for a module: tiny problems run fastest that way on a shared machine."""
    import faiss

    n = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(n)


def data_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("QINCO_DATA_DIR", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def dwsift_dir() -> pathlib.Path:
    d = data_dir() / "dwsift"
    if not (d / "learn.bvecs").exists():
        pytest.skip(f"dwsift dataset not found under {d} (set QINCO_DATA_DIR)")
    return d


class _S3Handle:
    """What the ``s3`` fixture yields: endpoint, credentials, and a bucket factory."""

    def __init__(self, server):
        self.server = server
        self.endpoint_url = server.endpoint_url
        self.access_key = server.access_key
        self.secret_key = server.secret_key
        self.region = server.region

    def options(self):
        from pipeline.io.storage import StorageOptions

        return StorageOptions(endpoint_url=self.endpoint_url, region=self.region,
                              access_key=self.access_key, secret_key=self.secret_key)

    def bucket(self, name: str) -> str:
        """Create bucket ``name`` (if missing) and return ``"s3://name"``."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
                              aws_secret_access_key=self.secret_key, region_name=self.region)
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real SeaweedFS S3 server for the session, with the AWS_* env vars pointing at it."""
    import sys

    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    from s3_server import S3Server, weed_binary

    try:
        weed_binary()
    except FileNotFoundError as exc:  # pragma: no cover - weed comes with the dev dependencies
        pytest.skip(str(exc))
    server = S3Server(data_dir=str(tmp_path_factory.mktemp("seaweedfs")))
    server.start(timeout_s=60)
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    from pipeline.io import storage

    storage._clear_cache()
    try:
        yield _S3Handle(server)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        storage._clear_cache()
        server.stop()


@pytest.fixture(scope="session")
def codec_vectors():
    """Small real vectors for codec tests: (train 3000, held-out 500, name). The first rows of
    dwsift learn.bvecs when present, else clustered synthetic float32 data (D=32)."""
    import numpy as np

    path = data_dir() / "dwsift" / "learn.bvecs"
    n_train, n_val = 3000, 500
    if path.exists():
        d = 128
        raw = np.fromfile(path, dtype=np.uint8, count=(n_train + n_val) * (d + 4))
        x = raw.reshape(-1, d + 4)[:, 4:].astype(np.float32)
        name = "dwsift"
    else:
        rng = np.random.default_rng(0)
        centers = rng.normal(0, 4, (20, 32))
        x = (centers[rng.integers(0, 20, n_train + n_val)]
             + rng.normal(0, 1, (n_train + n_val, 32)) @ rng.normal(0, 0.5, (32, 32))).astype(np.float32)
        name = "synthetic"
    return x[:n_train], x[n_train:], name


def clustered_vectors(n: int, d: int, n_clusters: int = 16, seed: int = 0) -> "np.ndarray":
    """Synthetic clustered float32 data (a stand-in for real embeddings in fast tests)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 4, (n_clusters, d)).astype(np.float32)
    lab = rng.integers(0, n_clusters, n)
    return (centers[lab] + rng.normal(0, 1, (n, d))).astype(np.float32)


def build_tiny_model(out_uri: str, x_train, nlist: int = 8, M: int = 4, K: int = 16, options=None):
    """A small IVF-QINCo2 model: RQ-initialised (no epochs), additive decoder fitted, saved."""
    from pipeline.codec.model_file import save_model
    from pipeline.codec.model import QincoConfig
    from pipeline.train.config import TrainConfig
    from pipeline.train.loop import train_model

    qcfg = QincoConfig(dim=x_train.shape[1], M=M, K=K, L=1, de=16, dh=32, A=4, B=2, nlist=nlist)
    # greedy k-means RQ: the fixture's recall floors were set on it (50 queries of 2-4 byte
    # codes, where one query is 2 points of recall)
    tcfg = TrainConfig(epochs=0, val_size=200, rq_iters=4, rq_beam=0)
    model, _ = train_model(x_train[200:], x_train[:200], qcfg, tcfg)
    save_model(model, out_uri, options=options)
    return model


@pytest.fixture(scope="session")
def tiny_index_inputs(tmp_path_factory):
    """A 16-d clustered base (fvecs, 4,000 rows), queries, and a tiny IVF model on disk."""
    from pipeline.io import vectors

    d = tmp_path_factory.mktemp("tiny_index")
    x = clustered_vectors(4000, 16, seed=1)
    learn = clustered_vectors(3000, 16, seed=2)
    q = clustered_vectors(50, 16, seed=3)
    vectors.write_vectors(str(d / "base.fvecs"), x)
    vectors.write_vectors(str(d / "query.fvecs"), q)
    model = build_tiny_model(str(d / "model"), learn)
    return {"dir": d, "base": str(d / "base.fvecs"), "query": str(d / "query.fvecs"),
            "model": str(d / "model"), "x": x, "q": q, "model_obj": model}

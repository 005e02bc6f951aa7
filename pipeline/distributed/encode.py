"""The encode job's Ray Data actor: loads the model once, encodes one row range per call and
writes its shard (and the shard's sidecar) atomically. The driver is :mod:`pipeline.stages.encode`."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from pipeline.codec import encoder
from pipeline.codec.decoder import model_row_scales
from pipeline.codec.model_file import load_model, model_identity
from pipeline.codec.threads import use_threads
from pipeline.errors import ConfigError, PipelineError, StorageError
from pipeline.index.shards import ShardInfo, listed_shards, shard_name, verify_shard, write_shard
from pipeline.io import storage
from pipeline.sysinfo import peak_rss_bytes, private_rss_bytes


def sidecar(shard_uri: str) -> str:
    """The shard's sidecar: its ``ShardInfo`` as JSON, written after the shard."""
    return shard_uri + ".json"


def shard_record(version_uri: str, task, options=None) -> dict | None:
    """The sidecar record of ``task``'s shard when the shard exists and matches it, else None."""
    uri = storage.join(version_uri, task.shard)
    try:
        record = json.loads(storage.read_bytes(sidecar(uri), options))
        info = ShardInfo.from_dict(record)
    except (ValueError, TypeError, KeyError, ConfigError, StorageError):
        return None
    return record if verify_shard(uri, info, options) else None


def shards_done(version_uri: str, tasks, options=None) -> dict[str, dict]:
    """``{task.shard: sidecar record}`` of the ``tasks`` whose shards are written and verified
    (``shard_record``), with one listing of the version's shards: only shards found there are
    read, so a new version costs one request however many shards it will have."""
    listed = listed_shards(version_uri, options)
    done = {}
    for tk in tasks:
        if tk.shard in listed and sidecar(tk.shard) in listed:
            record = shard_record(version_uri, tk, options)
            if record is not None:
                done[tk.shard] = record
    return done


class EncodeActor:
    """Ray Data actor: loads the model once, encodes one range per call and writes its shard.

    Each output row also carries the actor's process id and peak resident memory, so the job
    report can show that memory per actor does not grow with the collection.
    """

    def __init__(self, model_uri: str, version_uri: str, inputs: list, batch_size: int,
                 threads: int, options=None, lut_weight: float = 0.0, precision: str | None = None,
                 A: int | None = None, B: int | None = None):
        use_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(model_uri, device=self.device, options=options)
        self.model_sha = model_identity(model_uri, options)["config_sha256"]
        self.version_uri = version_uri
        self.inputs = inputs
        self.batch_size = batch_size
        self.options = options
        self.lut_weight = lut_weight
        self.precision = precision
        self.A, self.B = A, B
        self.peak_private = 0  # largest private memory seen at the end of a range (before its arrays go)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.asarray(batch["id"], dtype=np.int64)
        if len(ids) == 0:
            return {"shard": np.array([], dtype=object), "info": np.array([], dtype=object),
                    "encode_s": np.array([], dtype=np.float64), "pid": np.array([], dtype=np.int64),
                    "peak_rss": np.array([], dtype=np.int64), "peak_private": np.array([], dtype=np.int64)}
        file_index = int(batch["file_index"][0])
        rows = np.asarray(batch["row"], dtype=np.int64)
        first = int(rows[0])
        if not (np.all(batch["file_index"] == file_index) and np.array_equal(rows, np.arange(first, first + len(rows)))):
            raise PipelineError(
                f"encode actor received a batch that is not one contiguous range "
                f"(file {file_index}, rows {rows[0]}..{rows[-1]}); check shard_rows vs block size")
        x = np.asarray(batch["vector"], dtype=np.float32)
        t0 = time.perf_counter()
        codes, list_ids = encoder.encode(self.model, x, batch_size=self.batch_size or None, device=self.device,
                                         lut_weight=self.lut_weight, precision=self.precision, A=self.A, B=self.B)
        scale_N = None
        if self.model.additive_MKD.shape[0]:
            # the lookup-table stage's row scales, stored so searches need not decode every row
            scale_N = model_row_scales(self.model, codes, list_ids, device=self.device)
        if list_ids is None:
            list_ids = np.zeros(len(ids), dtype=np.int64)
        encode_s = time.perf_counter() - t0
        rel = f"shards/{shard_name(file_index, first)}"
        uri = storage.join(self.version_uri, rel)
        cfg = self.model.config
        info = write_shard(uri, list_ids.astype(np.int32), ids, codes, K=cfg.K,
                           nlist=max(1, cfg.nlist), model_sha=self.model_sha, options=self.options,
                           lut_scale_N=scale_N)
        storage.write_bytes_atomic(sidecar(uri), info.to_json().encode(), self.options)
        self.peak_private = max(self.peak_private, private_rss_bytes())
        return {"shard": np.array([rel], dtype=object), "info": np.array([info.to_json()], dtype=object),
                "encode_s": np.array([encode_s]), "pid": np.array([os.getpid()], dtype=np.int64),
                "peak_rss": np.array([peak_rss_bytes()], dtype=np.int64),
                "peak_private": np.array([self.peak_private], dtype=np.int64)}

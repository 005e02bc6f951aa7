"""Plans before work: what an encode or query job will read, write, hold and take, from headers
and manifests only, checked against the resources it is given (``--dry-run``).

The rates are the cost model of bench/RESULTS.md (section "Scale", "Cost model"), measured with
the Ray jobs on CPU cores; encoding time is scaled from the measured model by the encoder's
multiply-adds per vector (:func:`pipeline.codec.model.encode_flops_per_vector`). They are
estimates for planning (the measured runs varied by about 20 %); GPU encoding is not in the
model. A plan that the resources cannot hold lists its problems and :func:`check_plan` refuses
it, naming each.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

from pipeline.codec.model import QincoConfig, config_from_preset, encode_flops_per_vector
from pipeline.codec.model_file import read_model_info
from pipeline.distributed.shard_pool import ACTOR_BASE_BYTES, actor_bytes, assign_shards
from pipeline.errors import ConfigError
from pipeline.index.manifest import load_manifest
from pipeline.io import storage, vectors
from pipeline.io.inputs import plan_inputs
from pipeline.search.params import SearchParams
from pipeline.sysinfo import available_memory_bytes

log = logging.getLogger(__name__)

# the measured encoder: the cpu preset, 128-d, 8 bytes, 4,096 lists, its default beam (A=8, B=4)
REFERENCE_ENCODER = config_from_preset("cpu", 128, M=8, K=256, nlist=4096)
REFERENCE_VECTORS_PER_CORE_S = 908.0
JOB_START_S = 30.0  # Ray Data start, actors' start and model load, commit
SHARD_BYTES_PER_VECTOR_BEYOND_CODES = 6.2  # list id, id, row scale (compressed), at 65,536 lists
ENCODE_ACTOR_BYTES = 700 << 20  # an encode actor's private memory, flat in N
BLOCK_COPIES = 4  # an input block in an encode actor: read, converted, normalised, the beam's work
QUERY_CORE_S = 5e-3  # a query's fixed work: tables, probe, merge, re-rank
SCAN_S_PER_CODE = 143e-9  # the lookup-table scan, per code visited


def _free_disk(uri: str) -> int | None:
    """Free bytes on the local disk ``uri`` would be written to; None for object storage."""
    if "://" in uri and not uri.startswith("file://"):
        return None
    path = os.path.abspath(uri[len("file://"):] if uri.startswith("file://") else uri)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def resources(out_uri: str | None = None, cluster: dict | None = None) -> dict[str, Any]:
    """CPUs and memory of the Ray cluster (``cluster``: ``ray.cluster_resources()``) or, without
    one, of this machine; free disk where ``out_uri`` is written (None for object storage)."""
    if cluster:
        cpus, memory, where = float(cluster.get("CPU", 0)), cluster.get("memory"), "the Ray cluster"
    else:
        cpus, memory, where = float(os.cpu_count() or 1), available_memory_bytes(), "this machine"
    return {"where": where, "cpus": cpus, "memory_bytes": None if memory is None else int(memory),
            "disk_free_bytes": None if out_uri is None else _free_disk(out_uri)}


def encode_rate_per_core(cfg: QincoConfig, A: int | None = None, B: int | None = None) -> float:
    """Estimated vectors/s per CPU core of the encode job for a model and beam."""
    cfg = QincoConfig.from_dict({**cfg.to_dict(), **({} if A is None else {"A": A}), **({} if B is None else {"B": B})})
    return REFERENCE_VECTORS_PER_CORE_S * encode_flops_per_vector(REFERENCE_ENCODER) / encode_flops_per_vector(cfg)


def plan_encode(model_uri: str, data_uris: list[str], index_uri: str, *, workers: int, cpus_per_worker: float,
                gpus_per_worker: float = 0.0, shard_rows: int = 65536, A: int | None = None, B: int | None = None,
                fmt: str | None = None, columns: tuple[str | None, str | None] = (None, None),
                res: dict | None = None, options=None) -> dict[str, Any]:
    """The plan of an encode job (nothing is read but headers and the model's config)."""
    cfg = QincoConfig.from_dict(read_model_info(model_uri, options)["config"])
    inputs = plan_inputs(data_uris, fmt=fmt, options=options, vector_column=columns[0], id_column=columns[1])
    n = sum(i.count for i in inputs)
    res = res or resources(index_uri)
    problems = []
    if inputs and inputs[0].dim != cfg.dim:
        problems.append(f"the vectors have dimension {inputs[0].dim}, the model {cfg.dim}")
    shards = sum(-(-i.count // shard_rows) for i in inputs)
    code_bytes = cfg.code_bytes
    disk = int(n * (code_bytes + SHARD_BYTES_PER_VECTOR_BEYOND_CODES))
    block_bytes = shard_rows * cfg.dim * 4 * BLOCK_COPIES
    actor_mem = ENCODE_ACTOR_BYTES + block_bytes
    cpus = workers * cpus_per_worker
    cores = min(workers * max(1, int(cpus_per_worker)), max(1, int(res["cpus"])))
    rate = encode_rate_per_core(cfg, A, B)
    encode_s = None if gpus_per_worker else JOB_START_S + n / (rate * cores)
    if cpus > res["cpus"]:
        problems.append(f"{workers} actors of {cpus_per_worker:g} CPUs need {cpus:g} CPUs; {res['where']} has "
                        f"{res['cpus']:g}: use fewer --workers or a smaller --cpus-per-worker")
    if res["memory_bytes"] is not None and workers * actor_mem > res["memory_bytes"]:
        problems.append(f"{workers} actors of about {actor_mem / 2**30:.2f} GiB need {workers * actor_mem / 2**30:.2f} "
                        f"GiB; {res['where']} has {res['memory_bytes'] / 2**30:.2f} GiB free: use fewer --workers "
                        f"or a smaller --shard-rows")
    if res["disk_free_bytes"] is not None and disk > res["disk_free_bytes"]:
        problems.append(f"the shards need about {disk / 2**30:.2f} GiB; {storage.redact(index_uri)} is on a disk "
                        f"with {res['disk_free_bytes'] / 2**30:.2f} GiB free")
    return {"job": "encode", "index_uri": storage.redact(index_uri), "vectors": n, "files": len(inputs),
            "dim": inputs[0].dim if inputs else None, "code_bytes": code_bytes, "nlist": cfg.nlist,
            "shards": shards, "disk_bytes": disk, "actors": workers, "cpus_per_actor": cpus_per_worker,
            "actor_memory_bytes": actor_mem, "vectors_per_core_s": rate, "cores": cores,
            "encode_s": encode_s, "core_hours": n / rate / 3600, "resources": res, "problems": problems}


def plan_search(index_uri: str, queries_uri: str, params: SearchParams, *, workers: int, cpus_per_worker: float,
                memory_per_actor: int | None = None, version: str | None = None, max_queries: int | None = None,
                vector_column: str | None = None, res: dict | None = None, options=None) -> dict[str, Any]:
    """The plan of a query job (the manifest and the queries' header are read)."""
    m = load_manifest(index_uri, version=version, options=options)
    qi = vectors.info(queries_uri, options=options, columns=vectors.parquet_columns(vector_column))
    Q = qi.count if max_queries is None else min(qi.count, max_queries)
    res = res or resources(None)
    problems = []
    dim = int(m.model.get("config", {}).get("dim", qi.dim))
    if qi.dim != dim:
        problems.append(f"the queries have dimension {qi.dim}, the index {dim}")
    code_bytes = int(m.code["code_bytes"])
    nlist = int(m.code.get("nlist") or 0)
    try:
        groups = assign_shards([s.to_dict() for s in m.shards], workers, code_bytes, memory_per_actor)
    except ConfigError as e:
        problems.append(str(e))
        groups = assign_shards([s.to_dict() for s in m.shards], workers, code_bytes)
    rows = [sum(e["rows"] for e in g) for g in groups]
    need = [actor_bytes(r, code_bytes) for r in rows]
    per_query = m.total_rows * (min(params.nprobe, nlist) / nlist if nlist else 1.0)
    search_s = Q * (QUERY_CORE_S + per_query * SCAN_S_PER_CODE) / max(1, len(groups))
    cpus = len(groups) * cpus_per_worker
    if cpus > res["cpus"]:
        problems.append(f"{len(groups)} actors of {cpus_per_worker:g} CPUs need {cpus:g} CPUs; {res['where']} has "
                        f"{res['cpus']:g}")
    if res["memory_bytes"] is not None and sum(need) > res["memory_bytes"]:
        problems.append(f"the shard actors need {sum(need) / 2**30:.2f} GiB in all; {res['where']} has "
                        f"{res['memory_bytes'] / 2**30:.2f} GiB free: use --mmap-dir or a larger cluster")
    return {"job": "search", "index_uri": storage.redact(index_uri), "version": m.version, "vectors": m.total_rows,
            "shards": len(m.shards), "code_bytes": code_bytes, "nlist": nlist, "queries": Q,
            "actors": len(groups), "cpus_per_actor": cpus_per_worker, "actor_rows": rows,
            "actor_memory_bytes": max(need), "actor_base_bytes": ACTOR_BASE_BYTES,
            "codes_scanned_per_query": per_query, "search_s": search_s, "resources": res, "problems": problems}


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def _duration(s) -> str:
    if s is None:
        return "not in the cost model (GPU)"
    return f"{s:,.0f} s" if s < 3600 else f"{s / 3600:,.1f} h"


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as the lines ``--dry-run`` prints."""
    r = plan["resources"]
    if plan["job"] == "encode":
        lines = [f"encode into {plan['index_uri']}",
                 f"  vectors      {plan['vectors']:,} in {plan['files']} files, dimension {plan['dim']}",
                 f"  shards       {plan['shards']:,}, about {_gib(plan['disk_bytes'])} on disk "
                 f"({plan['code_bytes']:g}-byte codes, {plan['nlist']} lists)",
                 f"  actors       {plan['actors']} x {plan['cpus_per_actor']:g} CPUs, about "
                 f"{_gib(plan['actor_memory_bytes'])} each",
                 f"  encode time  {_duration(plan['encode_s'])} on {plan['cores']} cores "
                 f"(about {plan['vectors_per_core_s']:,.0f} vectors/s per core; {plan['core_hours']:,.2f} core-hours)"]
    else:
        lines = [f"search {plan['index_uri']} version {plan['version']}",
                 f"  vectors      {plan['vectors']:,} in {plan['shards']} shards ({plan['code_bytes']}-byte codes, "
                 f"{plan['nlist']} lists)",
                 f"  queries      {plan['queries']:,}, about {plan['codes_scanned_per_query']:,.0f} codes scanned each",
                 f"  actors       {plan['actors']} x {plan['cpus_per_actor']:g} CPUs, up to "
                 f"{_gib(plan['actor_memory_bytes'])} each (rows {', '.join(f'{x:,}' for x in plan['actor_rows'])})",
                 f"  search time  {_duration(plan['search_s'])}"]
    lines.append(f"  resources    {r['where']}: {r['cpus']:g} CPUs, {_gib(r['memory_bytes'])} memory free"
                 + ("" if r.get("disk_free_bytes") is None else f", {_gib(r['disk_free_bytes'])} disk free"))
    lines += [f"  CANNOT RUN:  {p}" for p in plan["problems"]] or ["  fits"]
    return "\n".join(lines)


def check_plan(plan: dict[str, Any]) -> None:
    """ConfigError naming every problem of a plan the resources cannot hold."""
    if plan["problems"]:
        raise ConfigError(f"the {plan['job']} job cannot run: " + "; ".join(plan["problems"]))

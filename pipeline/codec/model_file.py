"""A trained model on disk: a directory (local path or S3 prefix) with two files.

- ``model.safetensors``: every parameter and buffer of :class:`QINCo` (codebooks, networks,
  pre-selectors, ``mean_D``, ``scale``, IVF ``centroids_LD``, additive-decoder ``additive_MKD``,
  pairwise-decoder ``pairwise_pairs_P2`` (int64) and ``pairwise_PQD`` (float16); files written
  before the pairwise decoder have neither and load without it).
  Never a pickled module.
- ``config.json`` (written last, so its presence means the model is complete)::

    {"format": "qinco-model", "format_version": 1,
     "config": {...QincoConfig...},
     "normalisation": {"scale": float},
     "has_centroids": bool, "has_additive": bool, "pairwise_pairs": int,
     "weights": {"file": "model.safetensors", "sha256": hex, "bytes": int,
                 "tensors": {name: shape}},
     "code_version": {...}, "metadata": {...caller's: training config, data provenance,
                                          per-epoch metrics...}}

Public API:

- ``save_model(model, uri, metadata=None, options=None) -> dict`` (the config.json content)
- ``load_model(uri, device="cpu", options=None) -> QINCo``: validates format version, checksum
  and shapes; any problem raises ``CheckpointError`` naming the URI.
- ``read_model_info(uri, options=None) -> dict``: the parsed config.json
- ``model_identity(uri, options=None) -> dict``: ``{"model_uri", "format_version",
  "config_sha256", "weights_sha256"}`` for manifests and codes files.
- ``save_report(uri, report, options=None)``: a training run's report beside the model files.
- ``check_model_unchanged(manifest_model, version, options=None)``: refuse an index version
  whose model was replaced at its URI since it was encoded.

This is the codec's only module that touches storage (``pipeline.io.storage``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from safetensors.torch import load, save
import torch

from pipeline.codec.model import SIZED_BY_STATE, QINCo, QincoConfig, model_from_state
from pipeline.config import code_version
from pipeline.errors import CheckpointError, ConfigError, PipelineError
from pipeline.io import storage

log = logging.getLogger(__name__)

FORMAT = "qinco-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def _state_tensors(model: QINCo) -> dict[str, torch.Tensor]:
    """Every tensor on the CPU: float ones as float32, but the float16 pair tables, and integer ones
    as they are."""
    def stored(v: torch.Tensor) -> torch.Tensor:
        if v.is_floating_point() and v.dtype != torch.float16:
            v = v.float()
        return v.detach().to("cpu").contiguous()
    return {k: stored(v) for k, v in model.state_dict().items()}


def save_model(model: QINCo, uri: str, metadata: dict[str, Any] | None = None,
               options: storage.StorageOptions | None = None) -> dict[str, Any]:
    """Write ``model`` to directory ``uri`` (each file atomically, config.json last)."""
    tensors = _state_tensors(model)
    # a single metadata key: safetensors writes a map's keys in arbitrary order, and the file's
    # hash is the model's identity, so the bytes must depend on the weights only
    blob = save(tensors, metadata={"format": f"{FORMAT}/{FORMAT_VERSION}"})
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "normalisation": {"scale": float(model.scale)},
        "has_centroids": bool(model.centroids_LD.shape[0] > 0),
        "has_additive": bool(model.additive_MKD.shape[0] > 0),
        "pairwise_pairs": int(model.pairwise_pairs_P2.shape[0]),
        "weights": {
            "file": WEIGHTS_FILE,
            "sha256": hashlib.sha256(blob).hexdigest(),
            "bytes": len(blob),
            "tensors": {k: list(v.shape) for k, v in tensors.items()},
        },
        "code_version": code_version(),
        "metadata": metadata or {},
    }
    text = json.dumps(info, indent=2, sort_keys=True, default=_json_default)
    storage.write_bytes_atomic(storage.join(uri, WEIGHTS_FILE), blob, options)
    storage.write_bytes_atomic(storage.join(uri, CONFIG_FILE), text.encode("utf-8"), options)
    log.info("saved model (%d bytes of weights) to %s", len(blob), storage.redact(uri))
    return info


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _read(uri: str, name: str, options) -> bytes:
    path = storage.join(uri, name)
    try:
        if not storage.exists(path, options):
            raise CheckpointError(f"{storage.redact(path)}: model file is missing")
        return storage.read_bytes(path, options)
    except CheckpointError:
        raise
    except PipelineError as e:
        raise CheckpointError(f"{storage.redact(path)}: cannot read model file ({e})") from e


def read_model_info(uri: str, options: storage.StorageOptions | None = None) -> dict[str, Any]:
    """Parsed and version-checked ``config.json`` of the model at ``uri``."""
    return _parse_info(_read(uri, CONFIG_FILE, options), storage.redact(storage.join(uri, CONFIG_FILE)))


def _parse_info(raw: bytes, path: str) -> dict[str, Any]:
    try:
        info = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt model config ({e})") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a QINCo model config (format={info.get('format') if isinstance(info, dict) else None!r})")
    if info.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: model format version {info.get('format_version')!r} is not "
                              f"supported (this code reads version {FORMAT_VERSION})")
    return info


def load_model(uri: str, device: str | torch.device = "cpu",
               options: storage.StorageOptions | None = None) -> QINCo:
    """Load the model at ``uri`` (see module docstring); ``CheckpointError`` on any problem."""
    info = read_model_info(uri, options)
    wpath = storage.redact(storage.join(uri, WEIGHTS_FILE))
    try:
        cfg = QincoConfig.from_dict(info["config"])
    except (KeyError, TypeError, ValueError, PipelineError) as e:
        raise CheckpointError(f"{storage.redact(uri)}: invalid model config ({e})") from e
    blob = _read(uri, WEIGHTS_FILE, options)
    expected = info.get("weights", {}).get("sha256")
    if expected and hashlib.sha256(blob).hexdigest() != expected:
        raise CheckpointError(f"{wpath}: weights file is corrupt (sha256 does not match config.json)")
    try:
        tensors = load(blob)
    except Exception as e:  # safetensors raises its own error types on malformed headers
        raise CheckpointError(f"{wpath}: cannot parse weights ({e})") from e
    c, a = tensors.get("centroids_LD"), tensors.get("additive_MKD")
    if c is not None and c.shape[0] and tuple(c.shape) != (cfg.nlist, cfg.dim):
        raise CheckpointError(f"{wpath}: centroids_LD has shape {tuple(c.shape)}, config says "
                              f"({cfg.nlist}, {cfg.dim})")
    if a is not None and a.shape[0] and tuple(a.shape) != (cfg.M, cfg.K, cfg.dim):
        raise CheckpointError(f"{wpath}: additive_MKD has shape {tuple(a.shape)}, config says "
                              f"({cfg.M}, {cfg.K}, {cfg.dim})")
    p, t = tensors.get("pairwise_pairs_P2"), tensors.get("pairwise_PQD")
    if (p is None) != (t is None) or (p is not None and (p.ndim != 2 or p.shape[1] != 2 or tuple(t.shape) != (
            p.shape[0], cfg.K * cfg.K, cfg.dim))):
        raise CheckpointError(f"{wpath}: the pairwise decoder's tensors do not match each other or the config "
                              f"(pairs {None if p is None else tuple(p.shape)}, tables "
                              f"{None if t is None else tuple(t.shape)}, K={cfg.K}, dim={cfg.dim})")
    if p is not None and p.numel() and not bool(((p >= 0) & (p < cfg.M)).all()):
        raise CheckpointError(f"{wpath}: pairwise_pairs_P2 holds code positions outside [0, {cfg.M}): {p.tolist()}")
    want = QINCo(cfg).state_dict()
    for name in SIZED_BY_STATE:  # sized by the file (empty when not fitted)
        if name in tensors:
            want[name] = tensors[name]
        elif name in SIZED_BY_STATE[2:]:  # written before the pairwise decoder existed
            del want[name]
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    if missing or extra:
        raise CheckpointError(f"{wpath}: tensors do not match the config (missing {missing[:5]}, "
                              f"unexpected {extra[:5]})")
    for k, v in want.items():
        if tuple(v.shape) != tuple(tensors[k].shape):
            raise CheckpointError(f"{wpath}: tensor {k} has shape {tuple(tensors[k].shape)}, "
                                  f"the config implies {tuple(v.shape)}")
    model = model_from_state(cfg, tensors)
    return model.to(device).eval()


def model_identity(uri: str, options: storage.StorageOptions | None = None) -> dict[str, Any]:
    """Identity of a saved model: hashes of config.json and of the weights (from config.json)."""
    raw = _read(uri, CONFIG_FILE, options)
    info = _parse_info(raw, storage.redact(storage.join(uri, CONFIG_FILE)))
    return {
        "model_uri": storage.redact(uri),
        "format_version": info["format_version"],
        "config_sha256": hashlib.sha256(raw).hexdigest(),
        "weights_sha256": info["weights"]["sha256"],
    }


REPORT_FILE = "report.json"


def save_report(uri: str, report: dict[str, Any], options: storage.StorageOptions | None = None) -> str:
    """Write the training job's run report (parameters, counts, per-stage times, throughput,
    versions) as ``report.json`` beside the model files; loading the model ignores it."""
    path = storage.join(uri, REPORT_FILE)
    body = dict(report)
    body.setdefault("code_version", code_version())
    storage.write_bytes_atomic(path, json.dumps(body, indent=2, sort_keys=True, default=_json_default).encode(),
                               options)
    return path


def check_model_unchanged(manifest_model: dict, version: str, options=None) -> None:
    """Refuse to search a version whose model was replaced at its URI since it was encoded.

    The codes (and the shards' row scales) mean something only with the model that wrote them;
    the manifest records its weights' SHA-256 (and its config.json's, for manifests without it).
    A model retrained into the same URI would decode every code wrongly and silently.
    """
    uri = manifest_model["uri"]
    ident = model_identity(uri, options)
    if manifest_model.get("weights_sha256") is not None:
        what, have, want = "weights", ident["weights_sha256"], manifest_model["weights_sha256"]
    else:
        what, have, want = "config.json", ident["config_sha256"], str(manifest_model.get("sha256"))
    if have != want:
        raise ConfigError(
            f"the model at {storage.redact(uri)} has changed since index version {version} was encoded "
            f"({what} sha256 {have[:12]}..., the manifest says {want[:12]}...); re-encode the index with it "
            f"(qinco reencode --index INDEX --model {storage.redact(uri)}) or restore the model")

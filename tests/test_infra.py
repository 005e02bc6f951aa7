"""Static checks of the deployment configs under infra/ (no Docker, no Kubernetes, no AWS needed).

The KubeRay manifests are checked for the fields the KubeRay operator requires and for the rules
its admission validation enforces; the AWS cluster-launcher config goes through Ray's own
``prepare_config`` + ``validate_config``; the Dockerfile, manifests and launcher config must agree
with each other (one image, one Ray version: the one requirements.lock pins, within
pyproject.toml's range) and with the repository (entry-point scripts, CLI arguments, files copied
into the image). No credential may appear in any of them.
"""

from __future__ import annotations

import copy
import fnmatch
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
AWS_CLUSTER = INFRA / "aws" / "cluster.yaml"

KUBERAY_FILES = ["raycluster.yaml", "rayjob-train.yaml", "rayjob-encode.yaml", "rayjob-search.yaml",
                 "reencode-weekly.yaml"]
RAY_KINDS = {"RayCluster", "RayJob", "RayCronJob"}
GPU_RESOURCE = "nvidia.com/gpu"
CREDENTIAL_VARS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
MAX_RAYJOB_NAME = 47  # KubeRay's limit (names of derived RayCluster / submitter Job must fit in 63)
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
ENTRYPOINT_SCRIPT = re.compile(r"^python3?\s+(?P<path>\S*jobs/(?P<name>[a-z_]+)\.py)(?P<args>(\s.*)?)$", re.S)

# AWS access key ids (long-term AKIA / temporary ASIA) and secret-key assignments.
KEY_ID_RE = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
SECRET_ASSIGN_RE = re.compile(
    r"(?i)(aws_secret_access_key|secret_access_key|aws_session_token)\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{20,}")


# ----------------------------------------------------------------------------- helpers
def pinned_ray_version() -> str:
    """The Ray version the project is tested with: requirements.lock's pin, which must lie in the
    range pyproject.toml declares."""
    from packaging.requirements import Requirement

    version = locked("ray")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ray = [Requirement(d) for d in deps if Requirement(d).name == "ray"]
    assert ray, f"pyproject.toml: no ray dependency among {deps}"
    assert ray[0].specifier.contains(version), \
        f"requirements.lock's ray {version} is outside pyproject.toml's range {ray[0].specifier}"
    return version


def locked(name: str) -> str:
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.lower().startswith(name.lower() + "=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"requirements.lock: no pin for {name}")


def load_docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for i, d in enumerate(docs):
        assert isinstance(d, dict), f"{path}: document {i} is not a mapping"
    return docs


def kuberay_docs() -> list[tuple[str, dict]]:
    return [(f, d) for f in KUBERAY_FILES for d in load_docs(KUBERAY / f)]


def ray_clusters() -> dict[str, dict]:
    """Long-lived RayCluster objects by metadata.name."""
    return {d["metadata"]["name"]: d for _, d in kuberay_docs() if d["kind"] == "RayCluster"}


def job_spec(doc: dict) -> dict | None:
    """The RayJob spec of a RayJob, or the template a RayCronJob creates RayJobs from."""
    if doc["kind"] == "RayJob":
        return doc["spec"]
    if doc["kind"] == "RayCronJob":
        return doc["spec"]["jobTemplate"]
    return None


def cluster_specs() -> list[tuple[str, dict]]:
    """Every RayClusterSpec in the manifests: standalone clusters and those embedded in jobs."""
    out = []
    for f, d in kuberay_docs():
        if d["kind"] == "RayCluster":
            out.append((f"{f}:{d['metadata']['name']}", d["spec"]))
        spec = job_spec(d)
        if spec is not None and "rayClusterSpec" in spec:
            out.append((f"{f}:{d['metadata']['name']}", spec["rayClusterSpec"]))
    return out


def cluster_for_job(spec: dict) -> dict:
    if "rayClusterSpec" in spec:
        return spec["rayClusterSpec"]
    return ray_clusters()[spec["clusterSelector"]["ray.io/cluster"]]["spec"]


def groups(cspec: dict) -> list[tuple[str, dict]]:
    """(group name, group spec) for the head group and every worker group."""
    return [("head", cspec["headGroupSpec"])] + [(g["groupName"], g) for g in cspec.get("workerGroupSpecs", [])]


def gpus_per_pod(group: dict) -> int:
    c = group["template"]["spec"]["containers"][0]
    return int(str(c.get("resources", {}).get("limits", {}).get(GPU_RESOURCE, 0)))


def all_images() -> dict[str, str]:
    """Where -> image, over every pod template in the manifests and the AWS launcher config."""
    images = {}
    for where, cspec in cluster_specs():
        for name, g in groups(cspec):
            for c in g["template"]["spec"]["containers"]:
                images[f"{where}:{name}:{c['name']}"] = c["image"]
    docker = yaml.safe_load(AWS_CLUSTER.read_text())["docker"]
    for key in ("image", "head_image", "worker_image"):
        if key in docker:
            images[f"aws/cluster.yaml:docker.{key}"] = docker[key]
    return images


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, rest = line.partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


def leaked_credentials(text: str) -> list[str]:
    return KEY_ID_RE.findall(text) + [m.group(0) for m in SECRET_ASSIGN_RE.finditer(text)]


# ----------------------------------------------------------------------------- files
def test_all_infra_files_exist():
    missing = [p for p in [DOCKERFILE, AWS_CLUSTER, INFRA / "README.md", *(KUBERAY / f for f in KUBERAY_FILES)]
               if not p.is_file()]
    assert not missing, f"missing: {missing}"


@pytest.mark.parametrize("fname", KUBERAY_FILES)
def test_kuberay_documents_identity(fname):
    docs = load_docs(KUBERAY / fname)
    assert docs, f"{fname}: no YAML document"
    for d in docs:
        assert d.get("apiVersion") == "ray.io/v1", f"{fname}: apiVersion {d.get('apiVersion')!r}"
        assert d.get("kind") in RAY_KINDS, f"{fname}: kind {d.get('kind')!r}"
        name = d.get("metadata", {}).get("name", "")
        assert DNS1035.match(name), f"{fname}: metadata.name {name!r} is not a DNS-1035 label"
        assert len(name) <= MAX_RAYJOB_NAME, f"{fname}: metadata.name {name!r} longer than {MAX_RAYJOB_NAME}"
        assert isinstance(d.get("spec"), dict), f"{fname}: {name}: no spec"


# ----------------------------------------------------------------------------- RayCluster specs
def test_every_cluster_spec_has_required_fields_and_pinned_ray_version():
    version = pinned_ray_version()
    specs = cluster_specs()
    assert len(specs) >= 4, f"expected the RayCluster and 3 job clusters, found {[w for w, _ in specs]}"
    for where, cspec in specs:
        assert cspec.get("rayVersion") == version, f"{where}: rayVersion {cspec.get('rayVersion')!r} != {version}"
        head = cspec["headGroupSpec"]
        assert isinstance(head.get("rayStartParams"), dict), f"{where}: headGroupSpec.rayStartParams missing"
        workers = cspec.get("workerGroupSpecs")
        assert workers, f"{where}: no workerGroupSpecs"
        names = [g.get("groupName") for g in workers]
        assert all(names) and len(set(names)) == len(names), f"{where}: bad or duplicate groupName {names}"
        for name, g in groups(cspec):
            containers = g["template"]["spec"]["containers"]
            assert containers and all(c.get("image") and c.get("name") for c in containers), \
                f"{where}: {name}: containers need name and image"
            if name == "head":
                continue
            assert isinstance(g.get("rayStartParams"), dict), f"{where}: {name}: rayStartParams missing"
            counts = [g.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
            assert all(isinstance(x, int) and x >= 0 for x in counts), f"{where}: {name}: replicas {counts}"
            assert counts[0] <= counts[1] <= counts[2], f"{where}: {name}: need min <= replicas <= max, got {counts}"
            assert counts[2] >= 1, f"{where}: {name}: maxReplicas must be >= 1"


def test_gpu_groups_request_gpus_and_long_lived_cluster_has_cpu_search_group():
    for where, cspec in cluster_specs():
        for name, g in groups(cspec):
            res = g["template"]["spec"]["containers"][0].get("resources", {})
            if "gpu" in name:
                assert gpus_per_pod(g) >= 1, f"{where}: {name}: no {GPU_RESOURCE} limit"
                assert str(res.get("requests", {}).get(GPU_RESOURCE, res["limits"][GPU_RESOURCE])) == \
                    str(res["limits"][GPU_RESOURCE]), f"{where}: {name}: GPU request != limit"
            else:
                assert gpus_per_pod(g) == 0, f"{where}: {name}: non-GPU group requests {GPU_RESOURCE}"
    clusters = ray_clusters()
    assert clusters, "raycluster.yaml holds no RayCluster"
    for name, d in clusters.items():
        kinds = [gpus_per_pod(g) > 0 for _, g in groups(d["spec"])[1:]]
        assert any(kinds), f"RayCluster {name}: no GPU worker group (train/encode)"
        assert not all(kinds), f"RayCluster {name}: no CPU worker group (search)"


# ----------------------------------------------------------------------------- RayJob / RayCronJob specs
def _jobs() -> list[tuple[str, dict, dict]]:
    return [(f"{f}:{d['metadata']['name']}", d, job_spec(d)) for f, d in kuberay_docs() if job_spec(d) is not None]


def test_rayjob_cluster_mode_and_lifecycle_rules():
    jobs = _jobs()
    assert {d["kind"] for _, d, _ in jobs} == {"RayJob", "RayCronJob"}
    clusters = ray_clusters()
    for where, doc, spec in jobs:
        assert spec.get("entrypoint"), f"{where}: no entrypoint"
        inline, selector = "rayClusterSpec" in spec, "clusterSelector" in spec
        assert inline != selector, f"{where}: set exactly one of rayClusterSpec / clusterSelector"
        if selector:
            target = spec["clusterSelector"].get("ray.io/cluster")
            assert target in clusters, f"{where}: clusterSelector names {target!r}, not a RayCluster in infra/kuberay"
            # KubeRay rejects these in clusterSelector mode / without shutdown.
            assert spec.get("shutdownAfterJobFinishes") is False, f"{where}: shared cluster must not be shut down"
            assert not spec.get("ttlSecondsAfterFinished"), f"{where}: TTL needs shutdownAfterJobFinishes"
            assert not spec.get("backoffLimit"), f"{where}: backoffLimit is incompatible with clusterSelector"
            assert not spec.get("suspend"), f"{where}: suspend is incompatible with clusterSelector"
        else:
            assert spec.get("shutdownAfterJobFinishes") is True, f"{where}: per-job cluster must be shut down"
        if doc["kind"] == "RayJob":
            assert spec.get("jobId") == doc["metadata"]["name"], \
                f"{where}: spec.jobId must equal metadata.name (the submission id makes re-applies idempotent)"
        else:
            assert "jobId" not in spec, f"{where}: a fixed jobId would collide between scheduled runs"


def test_cron_schedule_is_a_five_field_cron_expression():
    crons = [(w, d) for w, d, _ in _jobs() if d["kind"] == "RayCronJob"]
    assert crons, "no RayCronJob"
    field = r"(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*"
    limits = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
    for where, d in crons:
        parts = str(d["spec"]["schedule"]).split()
        assert len(parts) == 5, f"{where}: schedule {d['spec']['schedule']!r} is not 5 fields"
        for part, (lo, hi) in zip(parts, limits):
            assert re.fullmatch(field, part), f"{where}: bad cron field {part!r}"
            for n in re.findall(r"(?<![/\d])\d+", part):
                assert lo <= int(n) <= hi, f"{where}: cron value {n} outside {lo}-{hi}"


def _entrypoints():
    return [pytest.param(where, spec["entrypoint"], id=where) for where, _, spec in _jobs()]


@pytest.mark.parametrize("where,entrypoint", _entrypoints())
def test_entrypoint_script_exists_in_repo_and_image(where, entrypoint):
    m = ENTRYPOINT_SCRIPT.match(" ".join(entrypoint.split()))
    assert m, f"{where}: entrypoint {entrypoint!r} is not `python .../jobs/<name>.py ARGS`"
    name = m.group("name")
    workdir = [a for i, a in dockerfile_instructions() if i == "WORKDIR"][-1]
    expected = f"{workdir.rstrip('/')}/jobs/{name}.py"
    assert m.group("path") in (expected, f"jobs/{name}.py"), \
        f"{where}: script {m.group('path')!r} is not where the image puts it ({expected})"
    if not (ROOT / "jobs" / f"{name}.py").is_file():
        if name == "reencode":
            pytest.xfail("jobs/reencode.py does not exist yet")
        pytest.fail(f"{where}: jobs/{name}.py does not exist")


@pytest.mark.parametrize("where,entrypoint", _entrypoints())
def test_entrypoint_arguments_are_accepted_by_the_cli(where, entrypoint):
    from pipeline.cli import build_parser

    m = ENTRYPOINT_SCRIPT.match(" ".join(entrypoint.split()))
    assert m, f"{where}: unparsable entrypoint"
    name, args = m.group("name"), shlex.split(m.group("args"))
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    if name not in sub.choices:
        pytest.skip(f"`qinco {name}` is not registered in pipeline/cli.py yet")
    try:
        parser.parse_args([name, *args])
    except SystemExit as e:
        pytest.fail(f"{where}: `qinco {name} {' '.join(args)}` rejected by the CLI (exit {e.code})")


def test_requested_gpu_workers_fit_the_cluster():
    checked = 0
    for where, _, spec in _jobs():
        args = shlex.split(" ".join(spec["entrypoint"].split()))
        opts = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}
        if "--gpus-per-worker" not in opts:
            continue
        need = int(opts.get("--workers", 1)) * float(opts["--gpus-per-worker"])
        have = sum(g["maxReplicas"] * gpus_per_pod(g) for _, g in groups(cluster_for_job(spec))[1:])
        assert have >= need, f"{where}: asks for {need:g} GPUs, the cluster can hold {have}"
        checked += 1
    assert checked >= 2, "train and encode jobs should both request GPU workers"


# ----------------------------------------------------------------------------- images / versions
def test_one_image_everywhere_tagged_with_the_pinned_ray_version():
    version = pinned_ray_version()
    images = all_images()
    assert any(k.startswith("aws/") for k in images), "aws/cluster.yaml has no docker.image"
    distinct = set(images.values())
    assert len(distinct) == 1, f"images differ: {sorted(distinct)}"
    image = distinct.pop()
    repo, _, tag = image.rpartition(":")
    assert repo and "/" not in tag and version in tag, f"image tag {tag!r} does not carry Ray {version}"


def test_lock_agrees_with_pyproject_and_dockerfile_torch():
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, deps):  # every locked direct dependency within its declared range
        assert dep.specifier.contains(locked(dep.name), prereleases=True), \
            f"requirements.lock's {dep.name} {locked(dep.name)} is outside pyproject.toml's {dep.specifier}"
    args = dict(a.split("=", 1) for i, a in dockerfile_instructions() if i == "ARG" and "=" in a)
    assert args.get("TORCH_VERSION") == locked("torch"), \
        f"Dockerfile TORCH_VERSION {args.get('TORCH_VERSION')!r} != requirements.lock torch {locked('torch')}"
    assert "download.pytorch.org/whl/cu" in args.get("TORCH_INDEX_URL", ""), "torch must come from a CUDA index"


# ----------------------------------------------------------------------------- Dockerfile
def test_dockerfile_base_copies_and_install_order():
    version = pinned_ray_version()
    instr = dockerfile_instructions()
    froms = [a for i, a in instr if i == "FROM"]
    assert froms, "Dockerfile has no FROM"
    base = froms[-1].split()[0]
    assert re.fullmatch(rf"rayproject/ray:{re.escape(version)}-py311(-(gpu|cu\d+))", base), \
        f"FROM {base!r}: expected rayproject/ray:{version}-py311-gpu (or -cuXXX)"
    runs = [(n, a) for n, (i, a) in enumerate(instr) if i == "RUN"]
    copies = [(n, a) for n, (i, a) in enumerate(instr) if i == "COPY"]
    lock_copy = next((n for n, a in copies if "requirements.lock" in a.split()), None)
    assert lock_copy is not None, "Dockerfile does not COPY requirements.lock"
    project = next((n for n, a in runs if re.search(r"pip install\s+-c requirements\.lock\s+\.(\s|$)", a)), None)
    assert project is not None, "Dockerfile does not `pip install -c requirements.lock .`"
    torch = next((n for n, a in runs if re.search(r"pip install\s+\S*torch==", a)), None)
    assert torch is not None and torch < project, "CUDA torch must be installed before the locked project install"
    assert lock_copy < project
    assert any(a.split()[-2:-1] == ["jobs/"] or "jobs/" in a.split()[:-1] for _, a in copies), \
        "Dockerfile does not COPY jobs/"


def test_dockerfile_copy_sources_exist_and_are_not_dockerignored():
    ignore = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
              if p.strip() and not p.startswith("#")] if (ROOT / ".dockerignore").exists() else []
    sources = []
    for i, a in dockerfile_instructions():
        if i == "COPY":
            parts = [p for p in a.split() if not p.startswith("--")]
            sources += parts[:-1]
    assert sources
    for src in sources:
        rel = src.rstrip("/")
        assert (ROOT / rel).exists(), f"COPY {src}: not in the repository"
        hits = [p for p in ignore if fnmatch.fnmatch(rel, p.rstrip("/")) or rel.startswith(p.rstrip("/") + "/")]
        assert not hits, f"COPY {src}: excluded from the build context by .dockerignore {hits}"


# ----------------------------------------------------------------------------- AWS launcher
def test_aws_cluster_config_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(AWS_CLUSTER.read_text())
    assert raw["provider"]["type"] == "aws"
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)

    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert any(v["resources"].get("GPU", 0) >= 1 for v in workers.values()), "no GPU worker type"
    assert any(v["resources"].get("GPU", 0) == 0 and v["resources"].get("CPU", 0) >= 1
               for v in workers.values()), "no CPU worker type for search"
    # The launcher's defaults install a Ray nightly wheel at boot; the image must be used as is.
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert not any("pip install" in c for c in cfg[key]), f"{key} installs packages: {cfg[key]}"

    # The same validation rejects a broken variant, so passing above means something.
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu" if "gpu" in bad["available_node_types"] else next(iter(workers))][
        "resources"]["GPU"] = -1
    with pytest.raises(Exception):
        validate_config(prepare_config(bad))


# ----------------------------------------------------------------------------- credentials
def test_secret_detector_catches_key_looking_strings():
    fake_id = "AKIA" + "IOSFODNN7EXAMPLE"
    fake_secret = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY"
    assert leaked_credentials(f"key: {fake_id}")
    assert leaked_credentials(f"AWS_SECRET_ACCESS_KEY={fake_secret}")
    assert not leaked_credentials("secretKeyRef: {name: qinco-s3, key: AWS_SECRET_ACCESS_KEY}")


def test_no_literal_credentials_anywhere_in_infra():
    files = [p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    files.append(ROOT / ".dockerignore")
    for p in files:
        if p.exists():
            found = leaked_credentials(p.read_text(errors="replace"))
            assert not found, f"{p.relative_to(ROOT)}: credential-looking text {found}"
    for f, d in kuberay_docs():
        assert d["kind"] != "Secret", f"{f}: Secrets are created out of band, never committed"


def test_every_ray_container_gets_s3_credentials_only_from_a_secret():
    for where, cspec in cluster_specs():
        for name, g in groups(cspec):
            for c in g["template"]["spec"]["containers"]:
                env = {e["name"]: e for e in c.get("env", [])}
                for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                    assert var in env, f"{where}: {name}: {var} not set (S3 access from this pod)"
                for var in CREDENTIAL_VARS & env.keys():
                    ref = env[var].get("valueFrom", {}).get("secretKeyRef")
                    assert "value" not in env[var] and ref and ref.get("name") and ref.get("key"), \
                        f"{where}: {name}: {var} must come from valueFrom.secretKeyRef"
    docker = yaml.safe_load(AWS_CLUSTER.read_text()).get("docker", {})
    opts = " ".join(str(o) for k in ("run_options", "head_run_options", "worker_run_options")
                    for o in docker.get(k, []))
    assert not any(v in opts for v in CREDENTIAL_VARS), "aws/cluster.yaml passes credentials to containers"

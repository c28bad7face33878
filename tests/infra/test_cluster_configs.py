"""The cluster configs in infra/cluster/, checked offline: what KubeRay v1.7 and the Ray 2.60 cluster launcher
require of them, and what the build asks of the cluster (render_slot, GPUs, one data root at one path).

KubeRay's CRD schemas have no `additionalProperties: false` and miss the operator's own rules
(cluster_and_storage.md section 1), so the manifests go through the checkers below, which allow only the fields
that reference lists. The Ray resources of each group are the ones Ray's KubeRay autoscaler derives, and the
launcher YAML goes through Ray's own schema and `validate_config(prepare_config(...))` (section 2).
"""

import ast
import copy
import json
import shlex
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config

from pipelines.build_config import BuildConfig

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "infra" / "cluster"
IMAGE = "ghcr.io/near-factory/near-factory:0.1.0"
ENTRYPOINT = "python pipelines/build_lh_slat.py --config /config/build.yaml"
HEAD, RENDER, ENCODER = "near-head", "near-render", "near-encoder"
DATA_CLAIM, BUILD_CONFIG_MAP = "near-data", "near-build-config"
OBJECT_STORE_SECRET, CATALOG_SECRET = "near-object-store", "near-catalog"
ACTOR_CPUS = 1
"""CPUs each render and encoder actor asks for (`pipelines/steps.py`, the workers of the step table)."""

# The fields cluster_and_storage.md section 1 lists (KubeRay v1.7 types); anything else is a typo to the API server.
CLUSTER_KEYS = {"rayVersion", "headGroupSpec", "workerGroupSpecs", "enableInTreeAutoscaling", "autoscalerOptions",
                "authOptions", "suspend"}
HEAD_GROUP_KEYS = {"template", "rayStartParams", "serviceType"}
WORKER_GROUP_KEYS = {"groupName", "minReplicas", "maxReplicas", "template", "replicas", "idleTimeoutSeconds",
                     "rayStartParams", "resources", "labels"}
WORKER_GROUP_REQUIRED = ("groupName", "minReplicas", "maxReplicas", "template")
JOB_KEYS = {"entrypoint", "runtimeEnvYAML", "rayClusterSpec", "clusterSelector", "submissionMode",
            "shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "entrypointNumCpus", "entrypointNumGpus",
            "entrypointResources", "activeDeadlineSeconds", "backoffLimit", "suspend", "deletionStrategy"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
TOKEN_AUTH_MIN_RAY = (2, 52)


# --- reading the manifests ---------------------------------------------------------------------------------------

def _load(name: str) -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((CLUSTER / name).read_text()))


def _only(name: str, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in _load(name) if d["kind"] == kind]
    return doc


def _groups(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Group name -> group spec; the head under HEAD."""
    return {HEAD: spec["headGroupSpec"], **{g.get("groupName", ""): g for g in spec.get("workerGroupSpecs", [])}}


def _ray_container(group: dict[str, Any]) -> dict[str, Any]:
    """The first container: the one KubeRay starts Ray in and the autoscaler reads resources from."""
    return group["template"]["spec"]["containers"][0]


def _mounts(group: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Mount path -> volume definition, for the Ray container."""
    volumes = {v["name"]: v for v in group["template"]["spec"].get("volumes", [])}
    return {m["mountPath"]: volumes.get(m["name"], {}) for m in _ray_container(group).get("volumeMounts", [])}


def _mount_paths(group: dict[str, Any], kind: str, match: Callable[[dict[str, Any]], bool]) -> list[str]:
    return [path for path, volume in _mounts(group).items() if kind in volume and match(volume[kind])]


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _gpus(container: dict[str, Any]) -> float:
    return float(str(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)))


def _custom_resources(params: dict[str, Any]) -> dict[str, Any]:
    """`rayStartParams.resources` read as KubeRay's shell and Ray's autoscaler read it: drop the outer quotes,
    then the backslashes, then parse JSON. Raises ValueError when it is not of that form."""
    raw = params.get("resources")
    if raw is None:
        return {}
    if not (isinstance(raw, str) and len(raw) > 1 and raw[0] == raw[-1] == '"'):
        raise ValueError(f"resources must be an escaped JSON string in double quotes, got {raw!r}")
    parsed = json.loads(raw[1:-1].replace("\\", ""))
    if not isinstance(parsed, dict):
        raise ValueError(f"resources must be a JSON object, got {raw!r}")
    return parsed


def _render_slots(spec: dict[str, Any]) -> int:
    return _custom_resources(_groups(spec)[RENDER].get("rayStartParams", {})).get("render_slot", 0)


def _capabilities(value: str) -> set[str]:
    return {c.strip() for c in value.split(",")}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2])


# --- the checkers: each returns its problems, empty when the manifest is fine ------------------------------------

def _start_params_problems(params: Any, where: str) -> list[str]:
    if not isinstance(params, dict):
        return [f"{where}: rayStartParams must be a map (KubeRay turns it into `ray start` flags), got {params!r}"]
    return [f"{where}: rayStartParams.{key} must be a string, got {value!r}"
            for key, value in params.items() if not isinstance(value, str)]


def _pod_problems(group: dict[str, Any], where: str) -> list[str]:
    containers = group.get("template", {}).get("spec", {}).get("containers", [])
    if not containers:
        return [f"{where}: the pod template has no containers"]
    problems = []
    if not (containers[0].get("name") and containers[0].get("image")):
        problems.append(f"{where}: the Ray container needs a name and an image")
    for container in containers:
        resources = container.get("resources", {})
        limit = resources.get("limits", {}).get("nvidia.com/gpu")
        request = resources.get("requests", {}).get("nvidia.com/gpu")
        if request is not None and str(request) != str(limit):
            problems.append(f"{where}: nvidia.com/gpu request {request!r} must equal its limit {limit!r}")
        if limit is not None and not str(limit).isdigit():
            problems.append(f"{where}: nvidia.com/gpu limit must be a whole number, got {limit!r}")
    return problems


def kuberay_problems(spec: dict[str, Any]) -> list[str]:
    """What KubeRay v1.7 refuses, drops or quietly alters in a RayCluster spec (also a RayJob's rayClusterSpec)."""
    problems = [f"spec.{key}: not a RayCluster field" for key in sorted(set(spec) - CLUSTER_KEYS)]
    if not isinstance(spec.get("rayVersion"), str):
        problems.append(f"spec.rayVersion must be set as a string, got {spec.get('rayVersion')!r}")
    elif spec.get("authOptions", {}).get("mode") == "token" and _version(spec["rayVersion"]) < TOKEN_AUTH_MIN_RAY:
        problems.append(f"spec.rayVersion {spec['rayVersion']} is below 2.52, which token auth needs")
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict) or "template" not in head:
        return [*problems, "spec.headGroupSpec.template is required"]
    problems += [f"headGroupSpec.{key}: not a head group field" for key in sorted(set(head) - HEAD_GROUP_KEYS)]
    problems += _start_params_problems(head.get("rayStartParams", {}), "headGroupSpec")
    problems += _pod_problems(head, "headGroupSpec")
    workers = spec.get("workerGroupSpecs", [])
    names = [w.get("groupName") for w in workers]
    if len(names) != len(set(names)):
        problems.append(f"workerGroupSpecs: group names must be distinct, got {names}")
    for i, group in enumerate(workers):
        where = f"workerGroupSpecs[{group.get('groupName', i)}]"
        problems += [f"{where}.{key}: not a worker group field" for key in sorted(set(group) - WORKER_GROUP_KEYS)]
        missing = [key for key in WORKER_GROUP_REQUIRED if key not in group]
        if missing:
            problems.append(f"{where}: {', '.join(missing)} required")
            continue
        # KubeRay raises a missing (or lower) replicas to minReplicas.
        counts = {"minReplicas": group["minReplicas"], "replicas": group.get("replicas", group["minReplicas"]),
                  "maxReplicas": group["maxReplicas"]}
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in counts.values()):
            problems.append(f"{where}: replica counts must be integers, got {counts}")
        elif not 0 <= counts["minReplicas"] <= counts["replicas"] <= counts["maxReplicas"]:
            problems.append(f"{where}: needs 0 <= minReplicas <= replicas <= maxReplicas, got {counts}")
        # Optional since KubeRay 1.4, but we always write it: it is where a group's Ray resources are declared.
        if "rayStartParams" not in group:
            problems.append(f"{where}: rayStartParams missing")
        problems += _start_params_problems(group.get("rayStartParams", {}), where)
        problems += _pod_problems(group, where)
    return problems


def factory_problems(spec: dict[str, Any]) -> list[str]:
    """What the build needs of the cluster: the three groups, render_slot and GPUs where it renders, graphics in
    the driver capabilities of GPU pods, one data root at one path, node-local scratch, the secrets."""
    groups = _groups(spec)
    missing = [name for name in (HEAD, RENDER, ENCODER) if name not in groups]
    if missing:
        return [f"groups {missing} missing"]
    problems = []
    for name, group in groups.items():
        container = _ray_container(group)
        if container.get("image") != IMAGE:
            problems.append(f"{name}: image {container.get('image')!r} is not the project image {IMAGE}")
        capabilities = _env(container).get("NVIDIA_DRIVER_CAPABILITIES", {}).get("value", "")
        if _gpus(container) and not _capabilities(capabilities) & {"graphics", "all"}:
            problems.append(f"{name}: a GPU pod needs graphics in NVIDIA_DRIVER_CAPABILITIES (EEVEE falls back to "
                            f"llvmpipe without it), got {capabilities!r}")
        envs_from = [e.get("secretRef", {}).get("name") for e in container.get("envFrom", [])]
        if OBJECT_STORE_SECRET not in envs_from:
            problems.append(f"{name}: object-store credentials (envFrom secretRef {OBJECT_STORE_SECRET}) missing")
    head, render, encoder = groups[HEAD], groups[RENDER], groups[ENCODER]
    if _gpus(_ray_container(head)) or head.get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append(f"{HEAD}: must take no GPU and num-cpus \"0\": it runs the driver only")
    catalog = _env(_ray_container(head)).get("NEAR_CATALOG_URI", {})
    if catalog.get("valueFrom", {}).get("secretKeyRef", {}).get("name") != CATALOG_SECRET:
        problems.append(f"{HEAD}: NEAR_CATALOG_URI must come from the {CATALOG_SECRET} Secret, got {catalog}")
    try:
        slots = _custom_resources(render.get("rayStartParams", {})).get("render_slot", 0)
    except ValueError as err:
        problems.append(f"{RENDER}: {err}")
        slots = 0
    if not (isinstance(slots, int) and slots > 0):
        problems.append(f"{RENDER}: must declare render_slot > 0 in rayStartParams.resources, got {slots!r}")
    if not _gpus(_ray_container(render)):
        problems.append(f"{RENDER}: needs an nvidia.com/gpu limit: EEVEE renders on the GPU")
    if not render.get("minReplicas") == render.get("replicas") == render.get("maxReplicas"):
        problems.append(f"{RENDER}: must be fixed-size (min = replicas = max): the driver starts one render actor "
                        "per render_slot present when it starts")
    if not _gpus(_ray_container(encoder)):
        problems.append(f"{ENCODER}: needs an nvidia.com/gpu limit")
    for what, kind, match in (("the data root", "persistentVolumeClaim", lambda v: v.get("claimName") == DATA_CLAIM),
                              ("scratch", "emptyDir", lambda v: True)):
        paths = {name: _mount_paths(group, kind, match) for name, group in groups.items()}
        if any(len(p) != 1 for p in paths.values()) or len({p[0] for p in paths.values()}) != 1:
            problems.append(f"{what} must be mounted once, at the same path, in every Ray container, got {paths}")
    return problems


def rayjob_problems(job: dict[str, Any]) -> list[str]:
    """KubeRay's RayJob checks (`validation.go`) that the CRD schema does not make, plus the cluster's own."""
    if (job.get("apiVersion"), job.get("kind")) != ("ray.io/v1", "RayJob"):
        return [f"not a ray.io/v1 RayJob: {job.get('apiVersion')} {job.get('kind')}"]
    spec = job["spec"]
    problems = [f"spec.{key}: not a RayJob field" for key in sorted(set(spec) - JOB_KEYS)]
    if not isinstance(spec.get("entrypoint"), str) or not spec["entrypoint"].strip():
        problems.append("spec.entrypoint must be a command")
    if ("rayClusterSpec" in spec) == ("clusterSelector" in spec):
        problems.append("spec needs exactly one of rayClusterSpec and clusterSelector")
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
        problems.append("spec.ttlSecondsAfterFinished > 0 needs shutdownAfterJobFinishes")
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in SUBMISSION_MODES:
        problems.append(f"spec.submissionMode must be one of {sorted(SUBMISSION_MODES)}, got {mode!r}")
    if "clusterSelector" in spec and (mode == "SidecarMode" or spec.get("backoffLimit", 0) > 0):
        problems.append("spec.clusterSelector rules out SidecarMode and backoffLimit > 0")
    if "rayClusterSpec" in spec:
        problems += [f"rayClusterSpec: {p}" for p in kuberay_problems(spec["rayClusterSpec"])]
    return problems


def _docker_options(options: list[str]) -> tuple[dict[str, str], set[str], list[str]]:
    """(-e variables, -v volumes, the other flags) of docker run options."""
    env, volumes, other = {}, set(), []
    for option in options:
        words = shlex.split(option)
        for flag, value in zip(words, words[1:]):
            if flag == "-e":
                env.update([value.split("=", 1)])
            elif flag == "-v":
                volumes.add(value)
        other += [w for w in words if w.startswith("--")]
    return env, volumes, other


def launcher_problems(config: dict[str, Any], cluster: dict[str, Any]) -> list[str]:
    """Ray's schema and config checks, then the same node types, resources, image and paths as `cluster`."""
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    problems = [f"schema: {'/'.join(map(str, e.path))}: {e.message}"
                for e in jsonschema.Draft7Validator(schema).iter_errors(config)]
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except (ValueError, KeyError, jsonschema.ValidationError) as err:
        problems.append(f"validate_config: {err}")
    if problems:
        return problems
    types, groups = config["available_node_types"], _groups(cluster)
    if config["head_node_type"] != HEAD or set(types) != set(groups):
        return [f"node types {sorted(types)} (head {config['head_node_type']}) must be the cluster's {sorted(groups)}"]
    env, volumes, _ = _docker_options(config["docker"].get("run_options", []))
    if config["docker"].get("image") != IMAGE:
        problems.append(f"docker.image {config['docker'].get('image')!r} is not the project image {IMAGE}")
    if env.get("RAY_AUTH_MODE") != "token":
        problems.append("docker.run_options must pin RAY_AUTH_MODE=token")
    for what, kind in (("the data root", "persistentVolumeClaim"), ("scratch", "emptyDir")):
        path = _mount_paths(groups[HEAD], kind, lambda v: True)[0]
        if f"{path}:{path}" not in volumes:
            problems.append(f"docker.run_options must mount {what} at {path}, as on the Kubernetes pods")
    if types[HEAD]["resources"].get("CPU") != 0 or types[HEAD]["resources"].get("GPU", 0):
        problems.append(f"{HEAD}: resources must be CPU 0 and no GPU: it runs the driver only")
    if types[RENDER]["resources"].get("render_slot") != _render_slots(cluster):
        problems.append(f"{RENDER}: render_slot {types[RENDER]['resources'].get('render_slot')} differs from the "
                        f"Kubernetes pods' {_render_slots(cluster)}")
    if types[RENDER].get("min_workers") != types[RENDER].get("max_workers"):
        problems.append(f"{RENDER}: must be fixed-size (min_workers = max_workers)")
    for name in (RENDER, ENCODER):
        if types[name]["resources"].get("GPU") != _gpus(_ray_container(groups[name])):
            problems.append(f"{name}: GPU {types[name]['resources'].get('GPU')} differs from the Kubernetes pods'")
        env, _, flags = _docker_options(types[name].get("docker", {}).get("worker_run_options", []))
        if "--gpus" not in flags or not _capabilities(env.get("NVIDIA_DRIVER_CAPABILITIES", "")) & {"graphics", "all"}:
            problems.append(f"{name}: worker_run_options need --gpus and graphics in NVIDIA_DRIVER_CAPABILITIES")
    return problems


# --- the manifests as written ------------------------------------------------------------------------------------

@pytest.fixture
def cluster() -> dict[str, Any]:
    return _only("raycluster.yaml", "RayCluster")


@pytest.fixture
def job() -> dict[str, Any]:
    return _only("rayjob.yaml", "RayJob")


@pytest.fixture
def launcher() -> dict[str, Any]:
    (config,) = _load("launcher.yaml")
    return config


def test_manifests_are_kinds_kuberay_serves(cluster: dict[str, Any]) -> None:
    assert (cluster["apiVersion"], cluster["kind"], cluster["spec"]["rayVersion"]) == ("ray.io/v1", "RayCluster",
                                                                                       "2.60.0")
    kinds = [(d["apiVersion"], d["kind"]) for d in _load("rayjob.yaml")]
    assert kinds == [("v1", "ConfigMap"), ("ray.io/v1", "RayJob")]   # the config exists before the job reads it
    claim = _only("storage.yaml", "PersistentVolumeClaim")
    assert (claim["metadata"]["name"], claim["spec"]["accessModes"]) == (DATA_CLAIM, ["ReadWriteMany"])


def test_raycluster_meets_kuberay_and_the_build(cluster: dict[str, Any]) -> None:
    assert kuberay_problems(cluster["spec"]) == []
    assert factory_problems(cluster["spec"]) == []
    assert cluster["spec"]["authOptions"] == {"mode": "token"}


def test_rayjob_runs_the_same_cluster(job: dict[str, Any], cluster: dict[str, Any]) -> None:
    assert rayjob_problems(job) == []
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_ray_derives_the_resources_the_build_asks_for(cluster: dict[str, Any]) -> None:
    """Ray's own reading of the RayCluster (the autoscaler's) agrees with ours: render_slot and a GPU on the render
    pods, GPUs on the encoder pods, nothing schedulable on the head."""
    cr = {**cluster, "metadata": {**cluster["metadata"], "namespace": "near"}}
    types = _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]
    assert set(types) == {"headgroup", RENDER, ENCODER}
    assert types["headgroup"]["resources"]["CPU"] == 0 and "GPU" not in types["headgroup"]["resources"]
    assert types[RENDER]["resources"]["render_slot"] == _render_slots(cluster["spec"]) > 0
    assert types[RENDER]["resources"]["GPU"] == 1      # one GPU per render pod: EGL ignores CUDA_VISIBLE_DEVICES
    assert types[ENCODER]["resources"]["GPU"] == _gpus(_ray_container(_groups(cluster["spec"])[ENCODER])) > 0


def test_entrypoint_is_the_build_script_reading_the_mounted_config(job: dict[str, Any]) -> None:
    assert job["spec"]["entrypoint"] == ENTRYPOINT
    python, script, *args = shlex.split(ENTRYPOINT)
    options = _script_options(ROOT / script)
    given = dict(zip(args[::2], args[1::2]))
    assert set(given) <= set(options) and {o for o, required in options.items() if required} <= set(given)
    config = PurePosixPath(given["--config"])
    head = _groups(job["spec"]["rayClusterSpec"])[HEAD]
    assert _mount_paths(head, "configMap", lambda v: v["name"] == BUILD_CONFIG_MAP) == [str(config.parent)]
    assert config.name in _only("rayjob.yaml", "ConfigMap")["data"]


def _script_options(script: Path) -> dict[str, bool]:
    """The options the script's argparse declares -> whether each is required, read from its source."""
    options = {}
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            required = any(k.arg == "required" and getattr(k.value, "value", False) for k in node.keywords)
            options[node.args[0].value] = required
    return options


def test_build_config_loads_and_fits_the_render_pods(tmp_path: Path, cluster: dict[str, Any]) -> None:
    data = yaml.safe_load(_only("rayjob.yaml", "ConfigMap")["data"]["build.yaml"])
    groups = _groups(cluster["spec"])
    data_mount = _mount_paths(groups[HEAD], "persistentVolumeClaim", lambda v: True)[0]
    scratch_mount = _mount_paths(groups[HEAD], "emptyDir", lambda v: True)[0]
    assert PurePosixPath(data["source"]["path"]).is_relative_to(data_mount)   # every node reads the sources
    config = BuildConfig.from_dict({**data, "source": {**data["source"], "path": str(tmp_path)}}, base=Path("/config"))
    assert PurePosixPath(config.data_root).is_relative_to(data_mount)
    assert PurePosixPath(config.scratch_dir) == PurePosixPath(scratch_mount)    # node-local, not the shared volume
    assert config.catalog_uri is None, "the catalog URI holds a password: it belongs in the near-catalog Secret"
    assert "render_slots" not in data["execution"], "cluster nodes declare render_slot; render_slots is local only"
    execution, render = config.execution, _ray_container(groups[RENDER])
    slots, actors = _render_slots(cluster["spec"]), config.execution.encoders_per_node
    # The render actors and the encoder actors pinned to their node share the render pod.
    assert slots * execution.render_gpus + actors * execution.encoder_gpus <= _gpus(render) + 1e-9
    assert (slots + actors) * ACTOR_CPUS <= int(render["resources"]["limits"]["cpu"])
    assert execution.encoder_gpus > 0
    assert execution.max_in_flight >= slots * groups[RENDER]["replicas"]     # every render slot can be busy


def test_build_takes_the_catalog_uri_from_the_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = "postgresql+psycopg2://near@near-catalog:5432/near"
    monkeypatch.setenv("NEAR_CATALOG_URI", uri)
    data = yaml.safe_load(_only("rayjob.yaml", "ConfigMap")["data"]["build.yaml"])
    config = BuildConfig.from_dict({**data, "source": {**data["source"], "path": str(tmp_path)}}, base=Path("/config"))
    assert config.catalog_uri == uri


def test_launcher_yaml_passes_ray_and_matches_the_cluster(launcher: dict[str, Any], cluster: dict[str, Any]) -> None:
    assert launcher_problems(launcher, cluster["spec"]) == []


# --- broken copies are refused ----------------------------------------------------------------------------------

def _group(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return _groups(spec)[name]


def _render_env(spec: dict[str, Any]) -> dict[str, Any]:
    return _env(_ray_container(_group(spec, RENDER)))["NVIDIA_DRIVER_CAPABILITIES"]


BROKEN_CLUSTERS: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("int start param", lambda s: _group(s, RENDER)["rayStartParams"].update({"num-gpus": 1}), "must be a string"),
    ("replicas over max", lambda s: _group(s, ENCODER).update(replicas=3), "minReplicas <= replicas <= maxReplicas"),
    ("no group name", lambda s: _group(s, ENCODER).pop("groupName"), "groupName required"),
    ("misspelled field", lambda s: _group(s, ENCODER).update(minReplica=0), "minReplica: not a worker group field"),
    ("misspelled spec", lambda s: s.update(workerGroupSpec=[]), "workerGroupSpec: not a RayCluster field"),
    ("token on old Ray", lambda s: s.update(rayVersion="2.51.0"), "token auth needs"),
    ("fractional GPU", lambda s: _ray_container(_group(s, ENCODER))["resources"].update(
        limits={"nvidia.com/gpu": "0.5"}, requests={"nvidia.com/gpu": "0.5"}), "whole number"),
    ("GPU request under limit", lambda s: _ray_container(_group(s, ENCODER))["resources"]["requests"].update(
        {"nvidia.com/gpu": 4}), "must equal its limit"),
    ("no render_slot", lambda s: _group(s, RENDER)["rayStartParams"].pop("resources"), "render_slot > 0"),
    ("unquoted render_slot", lambda s: _group(s, RENDER)["rayStartParams"].update(resources='{"render_slot": 8}'),
     "escaped JSON string"),
    ("render without graphics", lambda s: _render_env(s).update(value="compute,utility"), "graphics"),
    ("render without GPU", lambda s: [_ray_container(_group(s, RENDER))["resources"][k].pop("nvidia.com/gpu")
                                      for k in ("limits", "requests")], f"{RENDER}: needs an nvidia.com/gpu"),
    ("encoder without GPU", lambda s: [_ray_container(_group(s, ENCODER))["resources"][k].pop("nvidia.com/gpu")
                                       for k in ("limits", "requests")], f"{ENCODER}: needs an nvidia.com/gpu"),
    ("autoscaled render group", lambda s: _group(s, RENDER).update(minReplicas=0), "fixed-size"),
    ("head takes tasks", lambda s: _group(s, HEAD)["rayStartParams"].update({"num-cpus": "8"}), "driver only"),
    ("data root elsewhere", lambda s: _ray_container(_group(s, ENCODER))["volumeMounts"][0].update(
        mountPath="/mnt/data"), "the data root must be mounted once, at the same path"),
    ("other image", lambda s: _ray_container(_group(s, ENCODER)).update(image="rayproject/ray:2.60.0"),
     "not the project image"),
    ("catalog URI in plain text", lambda s: _env(_ray_container(_group(s, HEAD)))["NEAR_CATALOG_URI"].update(
        value="postgresql://near:pw@db/near", valueFrom={}), "near-catalog Secret"),
]


@pytest.mark.parametrize("mutate, expected", [b[1:] for b in BROKEN_CLUSTERS], ids=[b[0] for b in BROKEN_CLUSTERS])
def test_broken_cluster_is_refused(cluster: dict[str, Any], mutate: Callable[[dict[str, Any]], Any],
                                   expected: str) -> None:
    spec = copy.deepcopy(cluster["spec"])
    mutate(spec)
    problems = kuberay_problems(spec) + factory_problems(spec)
    assert any(expected in p for p in problems), problems


BROKEN_JOBS: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("two cluster fields", lambda s: s.update(clusterSelector={"ray.io/cluster": "near-factory"}), "exactly one"),
    ("no cluster field", lambda s: s.pop("rayClusterSpec"), "exactly one"),
    ("ttl without shutdown", lambda s: s.update(shutdownAfterJobFinishes=False), "needs shutdownAfterJobFinishes"),
    ("selector with retries", lambda s: s.update(clusterSelector={"ray.io/cluster": "near-factory"}, backoffLimit=1)
     or s.pop("rayClusterSpec"), "rules out SidecarMode and backoffLimit"),
    ("bad submission mode", lambda s: s.update(submissionMode="K8sJob"), "submissionMode must be one of"),
    ("broken cluster inside", lambda s: s["rayClusterSpec"].update(rayVersion=2.6), "rayVersion must be set"),
]


@pytest.mark.parametrize("mutate, expected", [b[1:] for b in BROKEN_JOBS], ids=[b[0] for b in BROKEN_JOBS])
def test_broken_rayjob_is_refused(job: dict[str, Any], mutate: Callable[[dict[str, Any]], Any],
                                  expected: str) -> None:
    broken = copy.deepcopy(job)
    mutate(broken["spec"])
    problems = rayjob_problems(broken)
    assert any(expected in p for p in problems), problems


def _types(config: dict[str, Any]) -> dict[str, Any]:
    return config["available_node_types"]


BROKEN_LAUNCHERS: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("string resource", lambda c: _types(c)[RENDER]["resources"].update(render_slot="8"), "is not of type 'integer'"),
    ("unknown key", lambda c: _types(c)[ENCODER].update(min_worker=0), "Additional properties"),
    ("no head type", lambda c: c.update(head_node_type="near-hed"), "head_node_type"),
    ("render_slot differs", lambda c: _types(c)[RENDER]["resources"].update(render_slot=12), "render_slot 12"),
    ("render without graphics", lambda c: _types(c)[RENDER]["docker"].update(worker_run_options=["--gpus all"]),
     "graphics in NVIDIA_DRIVER_CAPABILITIES"),
    ("data root elsewhere", lambda c: c["docker"]["run_options"].remove("-v /data:/data"), "the data root at /data"),
    ("auth not pinned", lambda c: c["docker"]["run_options"].remove("-e RAY_AUTH_MODE=token"), "RAY_AUTH_MODE"),
]


@pytest.mark.parametrize("mutate, expected", [b[1:] for b in BROKEN_LAUNCHERS], ids=[b[0] for b in BROKEN_LAUNCHERS])
def test_broken_launcher_is_refused(launcher: dict[str, Any], cluster: dict[str, Any],
                                    mutate: Callable[[dict[str, Any]], Any], expected: str) -> None:
    broken = copy.deepcopy(launcher)
    mutate(broken)
    problems = launcher_problems(broken, cluster["spec"])
    assert any(expected in p for p in problems), problems


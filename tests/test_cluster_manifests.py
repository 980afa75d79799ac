"""The cluster files validate against what will read them, and point at jobs and configs that exist.

- Every YAML document in cluster/kuberay/ validates against the KubeRay v1 CRD schema of its kind
  (../shared/kuberay/, KubeRay v1.7.0) the way the API server and ``kubectl apply`` (strict field
  validation) would: nulls dropped, workerGroupSpecs min/maxReplicas defaulted, unknown fields
  rejected, root metadata checked as ObjectMeta. Secrets and ConfigMaps get a minimal check.
- Every ``python -m jobs.X --config C [--key value]`` (RayJob entrypoints, container commands, the
  commands in cluster/README.md) names an existing jobs/X.py and an existing C that passes the
  job's own config validation, overrides included.
- Every RayService ``serveConfigV2`` equals configs/serve.yaml and passes Ray Serve's deploy
  schema, with unknown keys rejected.
- cluster/aws/tmr-ray.yaml validates against the cluster-launcher schema shipped inside ray.
- rayVersion, every image tag, the Dockerfile's base image and the installed ray agree.

Each validator returns a list of problems; the negative tests show each one can fail.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
KUBERAY_SCHEMAS = SHARED / "kuberay"
MANIFESTS = REPO / "cluster" / "kuberay"
LAUNCHER = REPO / "cluster" / "aws" / "tmr-ray.yaml"
DOCKERFILE = REPO / "cluster" / "Dockerfile"
CLUSTER_README = REPO / "cluster" / "README.md"
SERVE_CONFIG = REPO / "configs" / "serve.yaml"

CRD_FILES = {
    "RayCluster": "raycluster.v1.schema.json",
    "RayJob": "rayjob.v1.schema.json",
    "RayService": "rayservice.v1.schema.json",
}
# The RayJobs the issue asks for: job module -> values of its Config.task that must be covered.
MAIN_JOBS = {
    "jobs.generate_back_translations": set(),
    "jobs.pretrain_mde": set(),
    "jobs.finetune_extractor": {"ner", "re"},
    "jobs.run_pipeline": set(),
}
INT32_MAX = 2147483647
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
OBJECT_META_KEYS = {
    "name",
    "generateName",
    "namespace",
    "labels",
    "annotations",
    "finalizers",
    "ownerReferences",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
}
RAY_IN_TAG = re.compile(r"ray(\d+\.\d+\.\d+)")
# Core (non-Ray) kinds checked minimally: apiVersion v1, known top-level fields, ObjectMeta.
CORE_FIELDS = {
    "Secret": {"type", "immutable", "data", "stringData"},
    "ConfigMap": {"immutable", "data", "binaryData"},
    "PersistentVolumeClaim": {"spec"},
}
WORKDIR = "/home/ray/tmr-ray"


# --------------------------------------------------------------------------- loading


def load_documents(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path.relative_to(REPO)}: no YAML documents"
    return docs


def manifest_files() -> list[Path]:
    return sorted(MANIFESTS.glob("*.yaml")) + sorted(MANIFESTS.glob("*.yml"))


def all_documents() -> list[tuple[str, dict]]:
    """(``file#index``, document) for every document in cluster/kuberay/."""
    return [(f"{p.name}#{i}", doc) for p in manifest_files() for i, doc in enumerate(load_documents(p))]


def documents_of_kind(kind: str) -> list[tuple[str, dict]]:
    return [(where, doc) for where, doc in all_documents() if doc.get("kind") == kind]


# --------------------------------------------------------------------------- CRD validation


def drop_nulls(value: Any) -> Any:
    """The API server prunes null-valued keys before validating."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def strict_schema(schema: Any) -> Any:
    """A copy where every object schema with ``properties`` rejects unknown keys (kubectl Strict).

    Objects declared with ``additionalProperties`` (maps: labels, rayStartParams, resources) stay open.
    """
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in ("properties", "patternProperties", "definitions", "$defs"):
        if isinstance(out.get(key), dict):
            out[key] = {name: strict_schema(sub) for name, sub in out[key].items()}
    for key in ("items", "additionalProperties", "not", "additionalItems"):
        if isinstance(out.get(key), (dict, list)):
            out[key] = strict_schema(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if isinstance(out.get(key), list):
            out[key] = [strict_schema(s) for s in out[key]]
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


_VALIDATORS: dict[str, jsonschema.protocols.Validator] = {}


def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    if kind not in _VALIDATORS:
        schema = json.loads((KUBERAY_SCHEMAS / CRD_FILES[kind]).read_text())
        _VALIDATORS[kind] = jsonschema.Draft7Validator(strict_schema(schema))
    return _VALIDATORS[kind]


def cluster_specs(doc: dict) -> list[dict]:
    """The RayCluster specs inside a document (RayCluster.spec, RayJob.spec.rayClusterSpec, ...)."""
    spec = doc.get("spec") or {}
    kind = doc.get("kind")
    found = {
        "RayCluster": spec,
        "RayJob": spec.get("rayClusterSpec"),
        "RayService": spec.get("rayClusterConfig"),
    }
    return [found[kind]] if isinstance(found.get(kind), dict) else []


def apply_api_server_defaults(doc: dict) -> dict:
    """workerGroupSpecs min/maxReplicas are required by the schema but defaulted by the API server."""
    doc = copy.deepcopy(doc)
    for spec in cluster_specs(doc):
        for group in spec.get("workerGroupSpecs") or []:
            if isinstance(group, dict):
                group.setdefault("minReplicas", 0)
                group.setdefault("maxReplicas", INT32_MAX)
    return doc


def object_meta_problems(meta: Any, where: str) -> list[str]:
    """Root metadata as the API server checks ObjectMeta (the CRD schema says only ``type: object``)."""
    if not isinstance(meta, dict):
        return [f"{where}: metadata must be a mapping"]
    problems = [
        f"{where}: metadata.{k} is not an ObjectMeta field" for k in sorted(set(meta) - OBJECT_META_KEYS)
    ]
    name = meta.get("name")
    if not isinstance(name, str) or len(name) > 253 or not DNS1123_SUBDOMAIN.match(name):
        problems.append(
            f"{where}: metadata.name {name!r} is not a DNS-1123 subdomain (lowercase a-z0-9, '-', '.')"
        )
    for field in ("labels", "annotations"):
        mapping = meta.get(field, {})
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            problems.append(f"{where}: metadata.{field} must map strings to strings")
            continue
        for key in mapping:
            prefix, _, label = key.rpartition("/")
            if (
                not LABEL_NAME.match(label)
                or len(label) > 63
                or (prefix and not DNS1123_SUBDOMAIN.match(prefix))
            ):
                problems.append(f"{where}: metadata.{field} key {key!r} is not a qualified name")
        if field == "labels":
            for key, value in mapping.items():
                if len(value) > 63 or not LABEL_VALUE.match(value):
                    problems.append(f"{where}: label {key}={value!r} is not a valid label value")
    return problems


def manifest_problems(doc: Any, where: str) -> list[str]:
    """Everything `kubectl apply` (strict) would reject in one document, as readable lines."""
    if not isinstance(doc, dict):
        return [f"{where}: a manifest must be a mapping"]
    kind = doc.get("kind")
    if kind in CORE_FIELDS:
        problems = [] if doc.get("apiVersion") == "v1" else [f"{where}: {kind} needs apiVersion v1"]
        extra = set(doc) - {"apiVersion", "kind", "metadata"} - CORE_FIELDS[kind]
        problems += [f"{where}: unknown top-level field '{k}' in {kind}" for k in sorted(extra)]
        return problems + object_meta_problems(doc.get("metadata"), where)
    if kind not in CRD_FILES:
        return [
            f"{where}: kind {kind!r} is neither a KubeRay kind {sorted(CRD_FILES)} nor one of {sorted(CORE_FIELDS)}"
        ]
    if doc.get("apiVersion") != "ray.io/v1":
        return [f"{where}: {kind} needs apiVersion ray.io/v1, got {doc.get('apiVersion')!r}"]
    doc = apply_api_server_defaults(drop_nulls(doc))
    problems = [
        f"{where}: {'.'.join(str(p) for p in err.absolute_path) or '<root>'}: {err.message}"
        for err in sorted(crd_validator(kind).iter_errors(doc), key=lambda e: list(e.absolute_path))
    ]
    return problems + object_meta_problems(doc.get("metadata"), where)


# --------------------------------------------------------------------------- job invocations

SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}


def job_invocations(command: str) -> list[tuple[str, list[str]]]:
    """Every ``python -m jobs.X ARGS`` in a shell command line: (module, ARGS) pairs."""
    tokens = shlex.split(command)
    found = []
    for i, token in enumerate(tokens[:-2]):
        if (
            Path(token).name.startswith("python")
            and tokens[i + 1] == "-m"
            and tokens[i + 2].startswith("jobs.")
        ):
            args = []
            for arg in tokens[i + 3 :]:
                if arg in SHELL_OPERATORS:
                    break
                args.append(arg)
            found.append((tokens[i + 2], args))
    return found


def invocation_problems(module: str, args: list[str], where: str, repo: Path = REPO) -> list[str]:
    """Why ``python -m <module> <args>`` would not start, run from the repo root (the image WORKDIR)."""
    from jobs._config import ConfigError, load_config_file, parse_config

    problems = []
    job_file = repo / Path(*module.split(".")).with_suffix(".py")
    if not job_file.is_file():
        problems.append(f"{where}: {module}: no such job module ({job_file.relative_to(repo)} is missing)")
    config_args = [a for i, a in enumerate(args) if i > 0 and args[i - 1] == "--config"]
    if len(config_args) != 1:
        problems.append(f"{where}: {module} needs exactly one --config FILE, got {len(config_args)}")
    config_path = repo / config_args[0] if config_args else None
    if config_path is not None and not config_path.is_file():
        problems.append(f"{where}: {module}: config {config_args[0]} does not exist")
    if problems:
        return problems
    job = importlib.import_module(module)
    if not hasattr(job, "Config"):
        return [f"{where}: {module} has no Config dataclass"]
    rooted_args = [str(repo / a) if i > 0 and args[i - 1] == "--config" else a for i, a in enumerate(args)]
    try:
        load_config_file(job.Config, config_path)
        parse_config(job.Config, rooted_args, prog=module)  # the --key value overrides too
    except ConfigError as exc:
        return [f"{where}: {module} {' '.join(args)}: {exc}"]
    return []


def container_commands(value: Any) -> list[str]:
    """Command lines of every container (command + args) anywhere in a manifest."""
    found = []
    if isinstance(value, dict):
        if "image" in value and ("command" in value or "args" in value):
            argv = list(value.get("command") or []) + list(value.get("args") or [])
            found.append(" ".join(shlex.quote(a) for a in argv))
            found += [a for a in argv if "-m jobs." in a]  # `bash -c "python -m jobs..."`
        for sub in value.values():
            found += container_commands(sub)
    elif isinstance(value, list):
        for sub in value:
            found += container_commands(sub)
    return found


def readme_commands(text: str) -> list[str]:
    """Shell commands inside fenced code blocks of a Markdown file, continuation lines joined."""
    commands, in_block, current = [], False, ""
    for line in text.splitlines():
        if line.strip().startswith("```"):
            in_block, current = not in_block, ""
            continue
        if not in_block:
            continue
        stripped = line.strip()
        if stripped.startswith("#") and not current:
            continue
        current += " " + stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            commands.append(current.strip())
            current = ""
    return commands


# --------------------------------------------------------------------------- Ray Serve


def serve_config_problems(config: Any, where: str) -> list[str]:
    """Ray Serve's deploy schema, plus unknown keys (Serve ignores them: a typo would go unnoticed)."""
    from pydantic import ValidationError
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as exc:
        return [f"{where}: {exc}"]

    def unknown(mapping: dict, model: type, path: str) -> list[str]:
        known = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
        return [f"{where}: {path}{k}: not a field of {model.__name__}" for k in sorted(set(mapping) - known)]

    problems = unknown(config, ServeDeploySchema, "")
    for a, app in enumerate(config.get("applications") or []):
        problems += unknown(app, ServeApplicationSchema, f"applications[{a}].")
        for d, dep in enumerate(app.get("deployments") or []):
            problems += unknown(dep, DeploymentSchema, f"applications[{a}].deployments[{d}].")
    return problems


# --------------------------------------------------------------------------- launcher


def launcher_schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def launcher_problems(config: Any, where: str) -> list[str]:
    validator = jsonschema.Draft7Validator(launcher_schema())
    problems = [
        f"{where}: {'.'.join(str(p) for p in err.absolute_path) or '<root>'}: {err.message}"
        for err in validator.iter_errors(config)
    ]
    if problems:
        return problems
    node_types = config.get("available_node_types") or {}
    if config.get("head_node_type") not in node_types:
        problems.append(
            f"{where}: head_node_type {config.get('head_node_type')!r} is not in available_node_types"
        )
    return problems


# --------------------------------------------------------------------------- versions


def images_in(value: Any) -> list[str]:
    if isinstance(value, dict):
        found = [
            v for k, v in value.items() if k in ("image", "head_image", "worker_image") and isinstance(v, str)
        ]
        return found + [i for v in value.values() for i in images_in(v)]
    if isinstance(value, list):
        return [i for v in value for i in images_in(v)]
    return []


def dockerfile_base() -> tuple[str, str]:
    """(Ray version, Python tag) of the Dockerfile's FROM, with its ARG defaults substituted."""
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.M))
    (image,) = re.findall(r"^FROM (\S+)", text, flags=re.M)
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-(py\d+)-gpu", image)
    assert match, f"cluster/Dockerfile: FROM {image} is not rayproject/ray:<ray>-py<XY>-gpu"
    return match.group(1), match.group(2)


def version_problems(doc: dict, where: str, ray_version: str, python_tag: str) -> list[str]:
    problems = []
    for spec in cluster_specs(doc):
        if spec.get("rayVersion") != ray_version:
            problems.append(f"{where}: rayVersion {spec.get('rayVersion')!r} != {ray_version}")
    for image in images_in(doc):
        tag = image.rpartition(":")[2]
        found = RAY_IN_TAG.search(tag)
        if not found or found.group(1) != ray_version or python_tag not in tag:
            problems.append(
                f"{where}: image {image} does not carry ray{ray_version} and {python_tag} in its tag"
            )
    return problems


# =========================================================================== tests


def test_the_expected_manifests_exist():
    names = {p.name for p in manifest_files()}
    for name in (
        "raycluster.yaml",
        "rayservice.yaml",
        "rayjob-generate-back-translations.yaml",
        "rayjob-pretrain-mde.yaml",
        "rayjob-finetune-ner.yaml",
        "rayjob-finetune-re.yaml",
        "rayjob-finetune-text-to-image.yaml",
        "rayjob-finetune-grounder.yaml",
        "rayjob-pipeline.yaml",
        "rayjob-predict.yaml",
        "outputs-pvc.yaml",
        "settings.example.yaml",
    ):
        assert name in names, f"cluster/kuberay/{name} is missing"
    kinds = {doc.get("kind") for _, doc in all_documents()}
    assert {"RayCluster", "RayJob", "RayService", "Secret", "ConfigMap", "PersistentVolumeClaim"} <= kinds


@pytest.mark.parametrize("where,doc", all_documents(), ids=[w for w, _ in all_documents()])
def test_manifest_validates_against_its_schema(where, doc):
    assert manifest_problems(doc, where) == []


@pytest.mark.parametrize("sample", sorted((KUBERAY_SCHEMAS / "samples").glob("*.yaml")), ids=lambda p: p.name)
def test_upstream_samples_validate(sample):
    """Control: KubeRay's own samples pass, so the strict validator is not stricter than the API server."""
    for i, doc in enumerate(load_documents(sample)):
        assert manifest_problems(doc, f"{sample.name}#{i}") == []


def test_autoscaling_gpu_worker_group():
    ((where, cluster),) = documents_of_kind("RayCluster")
    spec = cluster["spec"]
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: in-tree autoscaler is off"
    assert "autoscalerOptions" in spec
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if any(
            "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
            for c in g["template"]["spec"]["containers"]
        )
    ]
    assert gpu_groups, f"{where}: no worker group asks for nvidia.com/gpu"
    for group in gpu_groups:
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 2, group["groupName"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"], "the head should be CPU only"


def every_container(value: Any) -> list[dict]:
    if isinstance(value, dict):
        own = value.get("containers") if isinstance(value.get("containers"), list) else []
        return own + [c for v in value.values() for c in every_container(v)]
    if isinstance(value, list):
        return [c for v in value for c in every_container(v)]
    return []


RAY_DOCUMENTS = [(w, d) for w, d in all_documents() if d.get("kind") in CRD_FILES]


@pytest.mark.parametrize("where,doc", RAY_DOCUMENTS, ids=[w for w, _ in RAY_DOCUMENTS])
def test_every_container_sets_requests_and_limits_and_reads_settings_from_secrets(where, doc):
    containers = every_container(doc)
    assert containers, f"{where}: no containers"
    for c in containers:
        res = c.get("resources", {})
        assert res.get("requests") and res.get("limits"), (
            f"{where}: container {c['name']} lacks requests/limits"
        )
        for var in c.get("env", []):
            assert "value" not in var or not re.search(r"KEY|SECRET|PASSWORD|TOKEN", var["name"]), (
                f"{where}: {var['name']} is inline; take it from a Secret"
            )
    for spec in cluster_specs(doc):
        ray_containers = [spec["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
            g["template"]["spec"]["containers"][0] for g in spec.get("workerGroupSpecs", [])
        ]
        for c in ray_containers:
            refs = {next(iter(ref)) + ":" + next(iter(ref.values()))["name"] for ref in c.get("envFrom", [])}
            assert {"configMapRef:tmr-ray-settings", "secretRef:tmr-ray-credentials"} <= refs, (
                f"{where}: {c['name']} must read S3/MLflow settings via envFrom"
            )


def resolved_task(module: str, args: list[str]) -> str | None:
    """The ``task`` a job would run with (finetune_extractor: ner|re), or None if it has none."""
    from jobs._config import parse_config

    rooted = [str(REPO / a) if i and args[i - 1] == "--config" else a for i, a in enumerate(args)]
    task = getattr(parse_config(importlib.import_module(module).Config, rooted, prog=module), "task", None)
    return None if task is None else str(getattr(task, "value", task))


def test_batch_pods_share_the_outputs_volume():
    """Relative `outputs/...` paths in the configs must mean the same files on every pod."""
    assert re.search(rf"^WORKDIR {WORKDIR}$", DOCKERFILE.read_text(), flags=re.M), (
        f"cluster/Dockerfile: WORKDIR is not {WORKDIR}"
    )
    ((_, claim),) = documents_of_kind("PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for where, doc in documents_of_kind("RayCluster") + documents_of_kind("RayJob"):
        for spec in cluster_specs(doc):
            pods = [spec["headGroupSpec"]["template"]["spec"]] + [
                g["template"]["spec"] for g in spec["workerGroupSpecs"]
            ]
            for pod in pods:
                claims = {
                    v["name"]: v["persistentVolumeClaim"]["claimName"]
                    for v in pod.get("volumes", [])
                    if "persistentVolumeClaim" in v
                }
                ray_container = pod["containers"][0]
                assert ray_container.get("workingDir") == WORKDIR, (
                    f"{where}: {ray_container['name']} workingDir"
                )
                mounts = {m["mountPath"]: m["name"] for m in ray_container.get("volumeMounts", [])}
                assert claims.get(mounts.get(f"{WORKDIR}/outputs")) == claim["metadata"]["name"], (
                    f"{where}: {ray_container['name']} does not mount {claim['metadata']['name']} at {WORKDIR}/outputs"
                )


def test_every_rayjob_runs_a_job_with_a_valid_config():
    problems, modules = [], {}
    for where, doc in documents_of_kind("RayJob"):
        invocations = job_invocations(doc["spec"]["entrypoint"])
        if not invocations:
            problems.append(f"{where}: entrypoint {doc['spec']['entrypoint']!r} runs no `python -m jobs.X`")
        for module, args in invocations:
            found = invocation_problems(module, args, where)
            problems += found
            if not found:
                modules.setdefault(module, set()).add(resolved_task(module, args))
    assert problems == [], "\n".join(problems)
    for module, tasks in MAIN_JOBS.items():
        assert module in modules, f"no RayJob runs {module}"
        assert tasks <= modules[module], f"RayJobs for {module} cover tasks {modules[module]}, need {tasks}"


def test_every_container_command_that_runs_a_job_is_valid():
    problems = []
    for where, doc in all_documents():
        for command in container_commands(doc):
            for module, args in job_invocations(command):
                problems += invocation_problems(module, args, where)
    assert problems == [], "\n".join(problems)


def test_commands_in_the_cluster_readme_are_valid():
    commands = [c for c in readme_commands(CLUSTER_README.read_text()) if "-m jobs." in c]
    assert commands, "cluster/README.md shows no `python -m jobs.X` command"
    problems = []
    for command in commands:
        for module, args in job_invocations(command):
            problems += invocation_problems(module, args, "cluster/README.md")
    assert problems == [], "\n".join(problems)


def test_rayservice_embeds_the_serve_config_and_serve_accepts_it():
    services = documents_of_kind("RayService")
    assert services
    assert SERVE_CONFIG.is_file(), "configs/serve.yaml is missing"
    expected = yaml.safe_load(SERVE_CONFIG.read_text())
    for where, doc in services:
        embedded = yaml.safe_load(doc["spec"]["serveConfigV2"])
        assert embedded == expected, (
            f"{where}: serveConfigV2 differs from configs/serve.yaml: run python cluster/sync_serve_config.py"
        )
        assert serve_config_problems(embedded, where) == []


def test_launcher_config_validates_against_rays_schema():
    config = yaml.safe_load(LAUNCHER.read_text())
    assert launcher_problems(config, LAUNCHER.name) == []
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    workers = [n for name, n in nodes.items() if name != config["head_node_type"]]
    assert any(n.get("min_workers", 0) == 0 and n.get("max_workers", 0) >= 2 for n in workers), (
        "no autoscaling worker type"
    )
    assert any(n["node_config"]["InstanceType"].startswith(("g", "p")) for n in workers), "no GPU worker type"
    assert not head["node_config"]["InstanceType"].startswith(("g", "p")), "the head should be a CPU instance"


def test_launcher_config_passes_rays_own_config_preparation():
    """Ray fills in the AWS defaults and validates again, as `ray up` does before touching AWS."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(yaml.safe_load(LAUNCHER.read_text())))


def test_versions_agree_everywhere():
    ray_version, python_tag = dockerfile_base()
    assert ray_version == ray.__version__, (
        f"cluster/Dockerfile uses Ray {ray_version}, installed is {ray.__version__}"
    )
    problems = []
    for where, doc in all_documents():
        problems += version_problems(doc, where, ray_version, python_tag)
    problems += version_problems(yaml.safe_load(LAUNCHER.read_text()), LAUNCHER.name, ray_version, python_tag)
    assert problems == [], "\n".join(problems)
    images = set(images_in([doc for _, doc in all_documents()])) | set(
        images_in(yaml.safe_load(LAUNCHER.read_text()))
    )
    assert len(images) == 1, f"every pod and node should run the one project image, found {sorted(images)}"


# --------------------------------------------------------------------------- the checks can fail


def cluster_doc() -> dict:
    ((_, doc),) = documents_of_kind("RayCluster")
    return copy.deepcopy(doc)


def test_negative_misspelled_field_is_rejected():
    doc = cluster_doc()
    doc["spec"]["workerGroupSpecs"][0]["maxReplica"] = doc["spec"]["workerGroupSpecs"][0].pop("maxReplicas")
    doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    problems = "\n".join(manifest_problems(doc, "typo"))
    assert "'maxReplica' was unexpected" in problems
    assert "'imagePullPolicyy' was unexpected" in problems


def test_negative_types_and_required_fields_are_enforced():
    doc = cluster_doc()
    doc["spec"]["workerGroupSpecs"][0]["replicas"] = "2"  # strings are not integers
    doc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # rayStartParams values are strings
    del doc["spec"]["workerGroupSpecs"][0]["groupName"]
    problems = "\n".join(manifest_problems(doc, "bad"))
    assert "'2' is not of type 'integer'" in problems
    assert "0 is not of type 'string'" in problems
    assert "'groupName' is a required property" in problems


def test_defaults_nulls_and_metadata():
    doc = cluster_doc()
    group = doc["spec"]["workerGroupSpecs"][0]
    del group["minReplicas"], group["maxReplicas"]  # defaulted by the API server
    group["scaleStrategy"] = None  # pruned by the API server
    assert manifest_problems(doc, "defaults") == []
    doc["metadata"] = {"name": "TMR_ray", "lables": {"a": "b"}, "labels": {"app": "x" * 64}}
    problems = "\n".join(manifest_problems(doc, "meta"))
    assert "metadata.lables is not an ObjectMeta field" in problems
    assert "'TMR_ray' is not a DNS-1123 subdomain" in problems
    assert "not a valid label value" in problems


def test_negative_secret_and_unknown_kind():
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "strinData": {}}
    assert "unknown top-level field 'strinData'" in "\n".join(manifest_problems(secret, "s"))
    assert "neither a KubeRay kind" in "\n".join(manifest_problems({"kind": "RayClusters"}, "k"))


def test_negative_bad_entrypoint_module_and_missing_config():
    ((module, args),) = job_invocations(
        "cd /x && python -m jobs.no_such_job --config configs/paper/nope.yaml | tee log"
    )
    assert (module, args) == ("jobs.no_such_job", ["--config", "configs/paper/nope.yaml"])
    problems = "\n".join(invocation_problems(module, args, "e"))
    assert "jobs/no_such_job.py is missing" in problems
    assert "config configs/paper/nope.yaml does not exist" in problems
    assert "needs exactly one --config" in "\n".join(
        invocation_problems("jobs.make_synthetic_benchmark", [], "e")
    )
    assert job_invocations("python -m ray.scripts --config x") == []


def test_negative_config_and_override_failing_the_jobs_validation(tmp_path):
    """A config file with an unknown key, and an unknown override, are both reported."""
    bad = tmp_path / "configs" / "bad.yaml"
    bad.parent.mkdir()
    bad.write_text("no_such_knob: 1\n")
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "make_synthetic_benchmark.py").touch()  # module file check uses tmp root
    problems = "\n".join(
        invocation_problems("jobs.make_synthetic_benchmark", ["--config", "configs/bad.yaml"], "c", tmp_path)
    )
    assert "unknown key 'no_such_knob'" in problems
    tiny = REPO / "configs" / "make_synthetic_benchmark.tiny.yaml"
    problems = "\n".join(
        invocation_problems(
            "jobs.make_synthetic_benchmark",
            ["--config", str(tiny.relative_to(REPO)), "--no_such_override", "3"],
            "o",
        )
    )
    assert "unknown key 'no_such_override'" in problems


def test_negative_serve_config():
    good = {
        "applications": [
            {"name": "a", "import_path": "serve.app:app", "deployments": [{"name": "D", "num_replicas": 1}]}
        ]
    }
    assert serve_config_problems(good, "s") == []
    typo = copy.deepcopy(good)
    typo["applications"][0]["deployments"][0]["num_replica"] = typo["applications"][0]["deployments"][0].pop(
        "num_replicas"
    )
    assert "num_replica: not a field of DeploymentSchema" in "\n".join(serve_config_problems(typo, "s"))
    wrong = copy.deepcopy(good)
    wrong["applications"][0]["deployments"][0]["num_replicas"] = "many"
    assert serve_config_problems(wrong, "s") != []
    missing = {"applications": [{"name": "a"}]}  # no import_path
    assert "import_path" in "\n".join(serve_config_problems(missing, "s"))


def test_negative_launcher_config():
    config = yaml.safe_load(LAUNCHER.read_text())
    typo = copy.deepcopy(config)
    typo["max_worker"] = typo.pop("max_workers")
    assert "'max_worker' was unexpected" in "\n".join(launcher_problems(typo, "l"))
    no_node_config = copy.deepcopy(config)
    del next(iter(no_node_config["available_node_types"].values()))["node_config"]
    assert "'node_config' is a required property" in "\n".join(launcher_problems(no_node_config, "l"))
    wrong_head = copy.deepcopy(config)
    wrong_head["head_node_type"] = "head.gpu.nope"
    assert "not in available_node_types" in "\n".join(launcher_problems(wrong_head, "l"))


def test_negative_version_mismatch():
    ray_version, python_tag = dockerfile_base()
    doc = cluster_doc()
    doc["spec"]["rayVersion"] = "2.59.0"
    doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] = (
        "rayproject/ray:2.59.0-py311-gpu"
    )
    problems = "\n".join(version_problems(doc, "v", ray_version, python_tag))
    assert "rayVersion '2.59.0'" in problems and "2.59.0-py311-gpu does not carry" in problems


def test_readme_command_extraction():
    text = "```bash\n# a comment\nray job submit --address http://x -- \\\n  python -m jobs.a --config c.yaml\n```\nprose python -m jobs.b\n"
    assert readme_commands(text) == ["ray job submit --address http://x -- python -m jobs.a --config c.yaml"]
    assert job_invocations(readme_commands(text)[0]) == [("jobs.a", ["--config", "c.yaml"])]

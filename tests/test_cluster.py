"""The cluster definitions in cluster/: what each must carry to run hero-rollouts on GPUs.

The launcher YAML is validated against the schema shipped in the installed ``ray`` wheel and by
Ray's own config checks; the KubeRay manifests, the image recipe and the cron example are parsed
and checked for the fields their behaviour depends on.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import torch
import yaml

from jobs.scheduled import build_parser, slot_id
from pipeline.cli import build_parser as generate_parser
from pipeline.cli import load as load_job_config

REPO = Path(__file__).resolve().parents[1]
CRD_SCHEMAS = REPO / "tests" / "data" / "kuberay"  # extract_schemas.py there made them
KUBERAY_VERSIONS = ("v1.6.2", "v1.7.0")
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
IMAGE_ROOT = "/opt/hero-rollouts"
CREDENTIAL_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
CREDENTIAL_TEXT = [
    re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"),  # AWS access key ids
    re.compile(r"aws_secret_access_key\s*[=:]\s*\S", re.IGNORECASE),
    re.compile(r"AWS_SECRET_ACCESS_KEY\s*=\s*\S"),
    re.compile(r"BEGIN [A-Z ]*PRIVATE KEY"),
    re.compile(r"\bpassword\s*[=:]\s*\S", re.IGNORECASE),
]
SHELL_SYNTAX = re.compile(r"[;&|$`<>()\\'\"]")


def load(path: Path):
    return yaml.safe_load(path.read_text())


def torch_base_version() -> str:
    return torch.__version__.split("+")[0]


# --- Ray cluster launcher -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def launcher():
    return load(CLUSTER / "ray-cluster.yaml")


@pytest.fixture(scope="module")
def launcher_schema():
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_launcher_config_matches_the_schema_in_the_ray_wheel(launcher, launcher_schema):
    jsonschema.validate(launcher, launcher_schema)


def test_launcher_config_passes_rays_own_checks(launcher):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(launcher)))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c["available_node_types"]["worker.gpu"]["resources"].update(GPU=0.5),
        lambda c: c["available_node_types"]["worker.gpu"].pop("node_config"),
        lambda c: c.update(setup_command=["typo"]),
    ],
    ids=["fractional-gpu", "no-node-config", "unknown-key"],
)
def test_the_schema_check_rejects_broken_configs(launcher, launcher_schema, mutate):
    broken = copy.deepcopy(launcher)
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, launcher_schema)


def test_launcher_has_a_cpu_head_and_autoscaling_single_gpu_workers(launcher):
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert any("--num-cpus=0" in command for command in launcher["head_start_ray_commands"])
    gpu_types = [node for name, node in types.items() if node["resources"].get("GPU")]
    assert gpu_types, "no GPU worker type"
    for node in gpu_types:
        assert node["resources"]["GPU"] == 1  # one world-model actor per GPU
        assert node["resources"]["CPU"] >= 2  # room for the prep and encode stages
        assert node.get("min_workers", 0) == 0 < node["max_workers"] <= launcher["max_workers"]
        assert node["node_config"]["InstanceType"].startswith(("g", "p"))
    assert launcher["idle_timeout_minutes"] > 0


def test_launcher_installs_the_package_with_the_gpu_extra_and_pinned_versions(launcher):
    setup = "\n".join(launcher["setup_commands"])
    assert re.search(r"hero-rollouts\[[^\]]*\bgpu\b", setup)
    assert f"torch=={torch_base_version()}" in setup
    assert f'"ray[default,data]=={ray.__version__}"' in setup
    assert launcher["file_mounts"]["~/hero-rollouts"] == "."
    assert ".gitignore" in launcher["rsync_filter"]


def test_launcher_nodes_share_token_auth_and_job_environment(launcher):
    assert launcher["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(command for command in launcher[key] if "ray start" in command)
        assert "RAY_AUTH_MODE=token" in start
        assert "AWS_REGION=" in start
        assert "--metrics-export-port=8080" in start
    nodes = launcher["available_node_types"].values()
    gpu_nodes = [node for node in nodes if node["resources"].get("GPU")]
    assert all("IamInstanceProfile" in node["node_config"] for node in gpu_nodes)


# --- KubeRay ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests():
    return {path.stem: load(path) for path in sorted(KUBERAY.glob("*.yaml"))}


@pytest.fixture(scope="module")
def cluster_specs(manifests):
    """Every RayCluster spec: the RayCluster's own and those embedded in RayJob / RayCronJob."""
    return {
        "raycluster": manifests["raycluster"]["spec"],
        "rayjob": manifests["rayjob"]["spec"]["rayClusterSpec"],
        "raycronjob": manifests["raycronjob"]["spec"]["jobTemplate"]["rayClusterSpec"],
    }


def test_manifests_are_the_kuberay_kinds(manifests):
    kinds = {name: (doc["apiVersion"], doc["kind"]) for name, doc in manifests.items()}
    assert kinds == {
        "raycluster": ("ray.io/v1", "RayCluster"),
        "rayjob": ("ray.io/v1", "RayJob"),
        "raycronjob": ("ray.io/v1", "RayCronJob"),
    }
    for doc in manifests.values():
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?", doc["metadata"]["name"])


def schema_errors(schema: dict, value, path: str = "") -> list[str]:
    """Where ``value`` breaks a Kubernetes structural schema: unknown fields (kubectl's strict
    validation refuses them), missing required fields, wrong types, values outside an enum."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if schema.get("x-kubernetes-int-or-string"):
        return [] if isinstance(value, (int, str)) and not isinstance(value, bool) else [f"{path}: not int or string"]
    if schema.get("x-pruned") and value not in ({}, [], None) and isinstance(value, (dict, list)):
        return [f"{path}: the extracted schema lacks this part; rerun tests/data/kuberay/extract_schemas.py"]
    kind = schema.get("type")
    python_types = {"object": dict, "array": list, "string": str, "integer": int, "boolean": bool, "number": (int, float)}
    if kind in python_types and (not isinstance(value, python_types[kind]) or (kind == "integer" and isinstance(value, bool))):
        return [f"{path}: expected {kind}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: {value!r} not in {schema['enum']}"]
    errors = []
    if isinstance(value, dict) and "properties" in schema:
        errors += [f"{path}.{key}: unknown field" for key in value if key not in schema["properties"]]
        errors += [f"{path}.{key}: required" for key in schema.get("required", []) if key not in value]
        for key, item in value.items():
            if key in schema["properties"]:
                errors += schema_errors(schema["properties"][key], item, f"{path}.{key}")
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            errors += schema_errors(schema["additionalProperties"], item, f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            errors += schema_errors(schema["items"], item, f"{path}[{index}]")
    return errors


@pytest.mark.parametrize("version", KUBERAY_VERSIONS)
def test_manifests_are_valid_for_kuberay_1_6_and_1_7(manifests, version):
    schemas = json.loads((CRD_SCHEMAS / f"crd-{version}.json").read_text())
    for name, doc in manifests.items():
        assert schema_errors(schemas[doc["kind"]], doc) == [], name


def test_the_schema_check_catches_what_kubectl_would_refuse(manifests):
    schemas = {v: json.loads((CRD_SCHEMAS / f"crd-{v}.json").read_text()) for v in KUBERAY_VERSIONS}
    with_time_zone = copy.deepcopy(manifests["raycronjob"])
    with_time_zone["spec"]["timeZone"] = "Etc/UTC"
    assert schema_errors(schemas["v1.6.2"]["RayCronJob"], with_time_zone) == [".spec.timeZone: unknown field"]
    assert schema_errors(schemas["v1.7.0"]["RayCronJob"], with_time_zone) == []
    broken = copy.deepcopy(manifests["rayjob"])
    broken["spec"]["backoffLimit"] = "two"
    del broken["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    assert schema_errors(schemas["v1.7.0"]["RayJob"], broken) == [
        ".spec.backoffLimit: expected integer, got str", ".spec.rayClusterSpec.headGroupSpec.template: required"]


def test_jobs_run_on_exactly_the_raycluster_spec(cluster_specs):
    assert cluster_specs["rayjob"] == cluster_specs["raycluster"]
    assert cluster_specs["raycronjob"] == cluster_specs["raycluster"]


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def test_cluster_spec_has_a_cpu_head_and_an_autoscaling_gpu_group(cluster_specs):
    spec = cluster_specs["raycluster"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_resources = head["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in {**head_resources["requests"], **head_resources["limits"]}
    (gpu_group,) = spec["workerGroupSpecs"]
    assert gpu_group["minReplicas"] == 0 < gpu_group["maxReplicas"]
    (worker,) = gpu_group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == "1"
    tolerations = gpu_group["template"]["spec"]["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    for group in [head, gpu_group]:
        pod = group["template"]["spec"]
        shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert [mounts[v["name"]] for v in shm] == ["/dev/shm"]  # Ray's object store


def test_all_pods_run_the_image_built_by_the_dockerfile(cluster_specs):
    images = {c["image"] for spec in cluster_specs.values() for c in containers(spec)}
    assert len(images) == 1
    (image,) = images
    assert re.fullmatch(r"[\w.\-/:]+/hero-rollouts:[\w.\-]+", image)


def test_object_store_endpoint_comes_from_config_and_credentials_only_from_secrets(cluster_specs):
    for spec in cluster_specs.values():
        envs = [c["env"] for c in containers(spec)]
        assert all(env == envs[0] for env in envs), "head and workers need the same storage env"
        by_name = {e["name"]: e for e in envs[0]}
        assert "configMapKeyRef" in by_name["AWS_ENDPOINT_URL"]["valueFrom"]
        assert "configMapKeyRef" in by_name["AWS_REGION"]["valueFrom"]
        secret_backed = [e for e in envs[0] if CREDENTIAL_NAME.search(e["name"])]
        assert {e["name"] for e in secret_backed} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        for entry in secret_backed:
            assert "value" not in entry
            assert entry["valueFrom"]["secretKeyRef"]["optional"] is True  # IRSA works without
    for doc_spec in (cluster_specs["rayjob"], cluster_specs["raycronjob"]):
        assert "runtimeEnvYAML" not in doc_spec


def entrypoint_tokens(entrypoint: str) -> list[str]:
    assert not SHELL_SYNTAX.search(entrypoint), "K8sJobMode pastes the entrypoint into a shell"
    return shlex.split(entrypoint)


def generate_options(tokens: list[str]):
    """Options of a ``python <image>/jobs/generate.py ...`` command, parsed by its own parser."""
    assert tokens[:2] == ["python", f"{IMAGE_ROOT}/jobs/generate.py"]
    options = generate_parser().parse_args(tokens[2:])
    assert options.config.startswith(f"{IMAGE_ROOT}/jobs/configs/")
    assert options.output.startswith("s3://") and options.output.endswith("/{run_id}")
    return options


def check_actor_pool_fits_the_gpu_group(options, spec: dict) -> None:
    (gpu_group,) = spec["workerGroupSpecs"]
    assert options.num_gpus == 1  # one world-model actor per GPU
    assert 1 <= options.actors <= gpu_group["maxReplicas"]  # one GPU per worker pod


def test_rayjob_runs_the_entrypoint_with_a_fixed_run_id_and_retries(manifests):
    spec = manifests["rayjob"]["spec"]
    options = generate_options(entrypoint_tokens(spec["entrypoint"]))
    assert options.run_id
    check_actor_pool_fits_the_gpu_group(options, spec["rayClusterSpec"])
    assert spec["backoffLimit"] >= 1
    assert spec["submitterConfig"]["backoffLimit"] >= 1
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["activeDeadlineSeconds"] > 0


def in_checkout(token: str) -> str:
    """A path inside the image, as the same path in this checkout."""
    return str(REPO) + token[len(IMAGE_ROOT):] if token.startswith(IMAGE_ROOT + "/") else token


def test_entrypoints_are_valid_jobs_with_the_config_they_name(manifests):
    """Every scheduled or cluster command, with its config file taken from this checkout, passes
    the job's own validation (the checks that exit with status 2 before any work)."""
    name, period, cron_command = raycronjob_exec(manifests)
    slot = slot_id(name, datetime(2026, 11, 22, tzinfo=timezone.utc), period)
    script = (CLUSTER / "cron" / "generate-slot.sh").read_text()
    cron_config = re.search(r'\$\{HERO_CONFIG:-([^}]+)\}', script)[1]
    commands = [
        entrypoint_tokens(manifests["rayjob"]["spec"]["entrypoint"]),
        [*cron_command, "--run-id", slot],  # as `jobs/scheduled.py exec` completes it
        ["python", "jobs/generate.py", "--config", str(REPO / cron_config), "--run-id", slot],
    ]
    for tokens in commands:
        config = load_job_config([in_checkout(token) for token in tokens[2:]])
        assert config.generate.num_gpus == 1, tokens  # one world-model actor per GPU


@pytest.fixture(scope="module")
def weight_paths(manifests) -> list[str]:
    """Local paths the GPU job config reads model weights from (nothing is downloaded)."""
    options = generate_options(entrypoint_tokens(manifests["rayjob"]["spec"]["entrypoint"]))
    config = load_job_config(["--config", in_checkout(options.config), "--run-id", "paths"])
    paths = [v for v in config.model.options.values() if isinstance(v, str) and v.startswith("/")]
    assert paths, "the GPU config names no local weights"
    return paths


def test_every_pod_mounts_the_model_weights(cluster_specs, weight_paths):
    for spec in cluster_specs.values():
        for container in containers(spec):
            mounts = [m["mountPath"].rstrip("/") + "/" for m in container["volumeMounts"]]
            for path in weight_paths:
                assert any(path.startswith(mount) for mount in mounts), (container["name"], path)


def test_launcher_nodes_sync_the_model_weights(launcher, weight_paths):
    targets = re.findall(r"aws s3 sync .*?s3://\S+ (/\S+)", "\n".join(launcher["setup_commands"]))
    for path in weight_paths:
        assert any(path.startswith(target.rstrip("/") + "/") for target in targets), path


def raycronjob_exec(manifests) -> tuple[str, int, list[str]]:
    """(schedule name, period minutes, job command) of the RayCronJob's exec entrypoint."""
    tokens = entrypoint_tokens(manifests["raycronjob"]["spec"]["jobTemplate"]["entrypoint"])
    assert tokens[:2] == ["python", f"{IMAGE_ROOT}/jobs/scheduled.py"]
    args = build_parser().parse_args(tokens[2:])
    assert args.command == "exec"
    command = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    return args.name, args.period_minutes, command


def test_raycronjob_gives_every_retry_of_a_tick_the_slots_run_id(manifests):
    """The run id comes from the launch time, never from the RayJob's name (random in KubeRay 1.6,
    the tick's minute in 1.7): every launch between the tick and its deadline gets the tick's slot."""
    cron = manifests["raycronjob"]
    name, period, command = raycronjob_exec(manifests)
    options = generate_options(command)
    assert options.run_id is None  # the slot chooses it
    check_actor_pool_fits_the_gpu_group(options, cron["spec"]["jobTemplate"]["rayClusterSpec"])
    minute, hour = (int(field) for field in cron["spec"]["schedule"].split()[:2])
    tick = datetime(2026, 11, 22, hour, minute, tzinfo=timezone.utc)
    deadline = cron["spec"]["jobTemplate"]["activeDeadlineSeconds"]
    launches = [tick + timedelta(seconds=s) for s in (0, 60, deadline // 2, deadline)]
    assert {slot_id(name, at, period) for at in launches} == {slot_id(name, tick, period)}


def test_raycronjob_schedule_retries_and_deadline_fit_its_period(manifests):
    spec = manifests["raycronjob"]["spec"]
    _, period, _ = raycronjob_exec(manifests)
    assert daily_schedule(spec["schedule"]) and period == 1440
    assert "timeZone" not in spec  # KubeRay 1.6 has no such field; the operator's zone is UTC
    job = spec["jobTemplate"]
    assert job["backoffLimit"] >= 1
    assert job["submitterConfig"]["backoffLimit"] >= 1
    assert job["shutdownAfterJobFinishes"] is True
    assert 0 < job["activeDeadlineSeconds"] < period * 60  # a tick ends before the next starts


# --- cron ---------------------------------------------------------------------------------------


CRON_FIELDS = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def cron_field_ok(field: str, low: int, high: int) -> bool:
    """A crontab time field: lists of *, n, a-b, each optionally /step, within bounds."""
    for part in field.split(","):
        match = re.fullmatch(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?", part)
        if not match:
            return False
        values = [int(v) for v in match.group(2, 3) if v is not None]
        if any(not low <= v <= high for v in values) or match[4] == "0":
            return False
    return True


def daily_schedule(schedule: str) -> bool:
    minute, hour, *rest = schedule.split()
    return minute.isdigit() and hour.isdigit() and rest == ["*", "*", "*"]


def crontab() -> tuple[dict[str, str], list[tuple[str, str]]]:
    """(environment assignments, [(schedule, command)]) of the example crontab."""
    env, entries = {}, []
    for line in (CLUSTER / "cron" / "crontab").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if re.match(r"[A-Z_]+=", line):
            key, _, value = line.partition("=")
            env[key] = value
            continue
        fields = line.split(None, 5)
        entries.append((" ".join(fields[:5]), fields[5]))
    return env, entries


def test_cron_field_check_rejects_bad_fields():
    assert cron_field_ok("*/15", 0, 59) and cron_field_ok("1-5,7", 0, 7)
    assert not cron_field_ok("60", 0, 59) and not cron_field_ok("*/0", 0, 59)
    assert not cron_field_ok("mon", 0, 7)


def test_crontab_runs_the_slot_script_daily(manifests):
    env, entries = crontab()
    assert len(entries) == 1
    assert env["HERO_OUTPUT"].endswith("/{run_id}")  # one output prefix per slot
    schedule, command = entries[0]
    assert all(cron_field_ok(f, *bounds) for f, bounds in zip(schedule.split(), CRON_FIELDS))
    assert daily_schedule(schedule)
    assert command.split()[0].endswith("cluster/cron/generate-slot.sh")
    script = (CLUSTER / "cron" / "generate-slot.sh").read_text()
    defaults = dict(re.findall(r'\$\{(HERO_[A-Z_]+):-([^}$]*)\}', script))
    name, period, _ = raycronjob_exec(manifests)
    # Cron and the RayCronJob give a day the same slot id, so either can resume the other's run.
    assert (defaults["HERO_SCHEDULE_NAME"], int(defaults["HERO_PERIOD_MINUTES"])) == (name, period)


def test_cron_script_is_executable_bash():
    script = CLUSTER / "cron" / "generate-slot.sh"
    assert os.access(script, os.X_OK)
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    subprocess.run(["bash", "-n", str(script)], check=True)


# --- image recipe -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (CLUSTER / "Dockerfile").read_text()


def build_args(dockerfile: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, flags=re.MULTILINE))


def test_image_is_cuda_based_with_pinned_torch_and_ray(dockerfile):
    args = build_args(dockerfile)
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:")
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}$", dockerfile, flags=re.MULTILINE)
    assert args["TORCH_VERSION"] == torch_base_version()
    assert args["RAY_VERSION"] == ray.__version__
    assert args["PYTHON_VERSION"] == "3.11"
    assert '"torch==${TORCH_VERSION}"' in dockerfile
    assert '"ray[default,data]==${RAY_VERSION}"' in dockerfile


def test_image_installs_the_package_with_the_gpu_extra(dockerfile):
    assert "gpu" in build_args(dockerfile)["EXTRAS"].split(",")
    assert f'"{IMAGE_ROOT}[${{EXTRAS}}]"' in dockerfile
    assert "--no-build-isolation-package flash-attn" in dockerfile
    assert re.search(rf"^WORKDIR {IMAGE_ROOT}$", dockerfile, flags=re.MULTILINE)


def test_image_installs_dependencies_before_copying_the_source(dockerfile):
    lines = dockerfile.splitlines()
    dependencies = next(i for i, line in enumerate(lines) if "-r pyproject.toml" in line)
    source = lines.index(f"COPY . {IMAGE_ROOT}")
    assert "--no-build-isolation-package flash-attn" in lines[dependencies]
    assert not any(line.startswith("COPY .") for line in lines[:dependencies])  # only pyproject.toml, README.md
    assert dependencies < source and "--no-deps" in lines[source + 1]


def test_image_runs_kuberay_probes_as_a_non_root_user(dockerfile):
    assert re.search(r"apt-get install[^\n]*\bwget\b", dockerfile)  # KubeRay's health probes
    users = re.findall(r"^USER (\S+)$", dockerfile, flags=re.MULTILINE)
    assert users and users[-1] not in {"root", "0"}


def test_image_build_context_leaves_out_local_state():
    ignored = set((CLUSTER / "Dockerfile.dockerignore").read_text().split())
    assert {".git", ".venv"} <= ignored


# --- every file in cluster/ ---------------------------------------------------------------------


def test_credential_patterns_catch_credentials():
    samples = ["AKIAABCDEFGHIJKLMNOP", "aws_secret_access_key = abc", "password: hunter2"]
    assert all(any(p.search(s) for p in CREDENTIAL_TEXT) for s in samples)


@pytest.mark.parametrize(
    "path", sorted(p.relative_to(REPO) for p in CLUSTER.rglob("*") if p.is_file()), ids=str
)
def test_no_credentials_in_cluster_files(path):
    text = (REPO / path).read_text()
    assert not [p.pattern for p in CREDENTIAL_TEXT if p.search(text)]

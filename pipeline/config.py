"""Job configuration: YAML file plus command-line overrides, validated before any work starts.

Every field has a default that runs (the embedded default job). A bad value raises
:class:`ConfigError` naming the dotted key; ``jobs/generate.py`` turns it into exit status 2.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from pipeline.manifest import SAFE_ID, SAFE_ID_RULE
from pipeline.redact import redact_config
from pipeline.storage import is_local_uri

DEFAULT_MODEL = "toyworld"  # the embedded default's world model: trained here, shipped in the package
DEFAULT_OUTPUT_ROOT = "~/hero-rollouts"
FINGERPRINT_KEYS = ("limit", "model", "accel", "generate.steps", "sink.rows_per_shard")


class ConfigError(ValueError):
    """A configuration value that cannot run; ``key`` is the dotted name of the offending setting."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"config key '{key}': {reason}")
        self.key = key
        self.reason = reason


class OutputError(Exception):
    """The output location cannot be used as it is; ``path`` names the offending file or folder
    (see :mod:`pipeline.sink.layout`). Found before any work; exit status 2, like ConfigError."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"output {path}: {reason}")
        self.path = path
        self.reason = reason


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, validate_assignment=True)


class ModelConfig(_Section):
    """Which world model the actors load: ``hero.models.load_model(name, **options)``."""

    name: str = DEFAULT_MODEL
    options: dict[str, Any] = Field(default_factory=dict)


class AccelConfig(_Section):
    """Which accelerator the actors apply to the model's transformer: HERO's default preset unless
    asked otherwise (``none`` for full compute, ``hero-fast``, diffusers' caches, ...)."""

    name: str = "hero"
    options: dict[str, Any] = Field(default_factory=dict)


class GenerateConfig(_Section):
    """The actor pool: actors, rollouts per model call, resources per actor. Ray Data restarts an actor
    whose process dies and retries its batch, so a lost actor costs time, never samples."""

    actors: int = Field(1, ge=1)
    batch_size: int = Field(1, ge=1)
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(0.5, gt=0, description="CPUs per actor (logical; fractional on a laptop)")
    steps: int | None = Field(None, ge=1, description="denoising steps for every row (None: the row's or the model's)")


class AuditConfig(_Section):
    """Quality audit (:mod:`pipeline.audit`): re-generate about ``fraction`` of the rows, chosen by
    a hash of their id and ``seed``, at full compute (accelerator off) and record the accelerator's
    drift against it (PSNR, depth AbsRel, pose error) in their meta.json and in summary.json."""

    fraction: float = Field(0.0, ge=0, le=1, description="share of rows audited, e.g. 0.01; 0 turns it off")
    seed: int = Field(0, ge=0)


class SinkConfig(_Section):
    """Shards and storage: rows per shard (the unit of commit and resume), retries, fsspec options,
    and how the run shares its output prefix (see pipeline/sink/)."""

    rows_per_shard: int = Field(4, ge=1, le=100_000)
    retries: int = Field(5, ge=0, le=20)
    retry_backoff_s: float = Field(0.5, ge=0)
    storage_options: dict[str, Any] = Field(default_factory=dict)
    adopt_foreign: bool = Field(False, description="write into an output holding files this run did not write "
                                                   "(they are never modified, deleted or indexed)")
    lease_s: float = Field(300.0, ge=1, description="seconds a driver's lease on the output lasts unrenewed")
    compact_every: int = Field(1000, ge=1, description="commit records per commit-log segment")
    parallel_reads: int = Field(32, ge=1, le=512, description="commit-log objects read at once")


class RayConfig(_Section):
    """Where to run: ``address`` of a cluster (None: ``RAY_ADDRESS`` or a new local instance)."""

    address: str | None = None
    num_cpus: int = Field(4, ge=1, description="logical CPUs of a new local instance")
    prep_num_cpus: float = Field(0.5, gt=0)
    encode_num_cpus: float = Field(0.5, gt=0)


class JobConfig(_Section):
    """A generation job. ``input``/``output`` of None mean the shipped manifest and a local folder."""

    run_id: str | None = None
    input: str | None = None
    input_allow_empty: bool = Field(False, description="run an input without rows (else exit 2: a wrong prefix?)")
    output: str | None = None
    limit: int | None = Field(None, ge=1)
    model: ModelConfig = Field(default_factory=ModelConfig)
    accel: AccelConfig = Field(default_factory=AccelConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    sink: SinkConfig = Field(default_factory=SinkConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    _manifest_digest: str | None = PrivateAttr(default=None)

    @field_validator("run_id")
    @classmethod
    def _safe_run_id(cls, value: str | None) -> str | None:
        if value is not None and not SAFE_ID.fullmatch(value):
            raise ValueError(f"must be {SAFE_ID_RULE}")
        return value

    def fingerprint(self) -> str:
        """Hash of what gets generated (the manifest's content and the settings that shape its
        samples, not how fast or where): the default run id, and what a finished run is checked against."""
        values = dict(self.fingerprint_values(), manifest=self.manifest_digest())
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]

    def manifest_digest(self) -> str:
        """The digest of the input manifest's content (:func:`pipeline.plan.manifest_digest`),
        computed once; an unusable input is a ConfigError naming ``input``, one the store cannot
        serve now raises :class:`pipeline.sources.InputUnavailable`."""
        if self._manifest_digest is None:
            from pipeline.plan import manifest_digest
            from pipeline.sources import InputError

            try:
                self._manifest_digest = manifest_digest(self.input, self.sink.storage_options)
            except InputError as exc:
                raise ConfigError("input", str(exc)) from None
        return self._manifest_digest

    def fingerprint_values(self) -> dict[str, Any]:
        """The settings that shape the samples, as recorded in run.json (resume requires a match)."""
        dumped = self.model_dump(mode="json")
        values = {}
        for key in FINGERPRINT_KEYS:
            node: Any = dumped
            for part in key.split("."):
                node = node[part]
            values[key] = node
        return redact_config(values)  # stored in run.json; a rotated credential is the same run

    def public_dict(self) -> dict[str, Any]:
        """The config as written into run.json/summary.json/meta.json, credentials masked."""
        return redact_config(self.model_dump(mode="json"))


def resolve(config: JobConfig, inside_ray_job: bool | None = None) -> JobConfig:
    """Fill in input, run id and output; refuse relative local output inside a Ray job."""
    from pipeline.sources import default_manifest

    inside_ray_job = bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")) if inside_ray_job is None else inside_ray_job
    resolved = config.model_copy(deep=True)
    if resolved.input is None:
        resolved.input = default_manifest()
    if resolved.run_id is None:
        resolved.run_id = f"{resolved.model.name}-{resolved.accel.name}-{resolved.fingerprint()}"
        if not SAFE_ID.fullmatch(resolved.run_id):
            raise ConfigError("run_id", f"derived run id {resolved.run_id!r} is not {SAFE_ID_RULE}; set --run-id")
    output = resolved.output or f"{DEFAULT_OUTPUT_ROOT}/{{run_id}}"
    output = output.replace("{run_id}", resolved.run_id)
    if is_local_uri(output):
        path = Path(os.path.expanduser(output.removeprefix("file://")))
        if not path.is_absolute() and inside_ray_job:
            raise ConfigError("output", f"relative path {output!r} would land in the job's temporary copy of "
                                        "the working directory; give an absolute path or a URI")
        output = str(path.absolute())
    resolved.output = output
    return resolved


def _set_key(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(key, f"'{part}' is not a section")
        node = child
    node[parts[-1]] = value


def build_config(file: str | None = None, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Load ``file`` (YAML), apply dotted-key ``overrides``, validate; raise ConfigError naming the key."""
    tree: dict[str, Any] = {}
    if file is not None:
        try:
            with open(file, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except FileNotFoundError:
            raise ConfigError("config", f"file {file!r} not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError("config", f"{file}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError("config", f"{file}: expected a mapping at the top level")
        tree = loaded or {}
    for key, value in (overrides or {}).items():
        _set_key(tree, key, value)
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        key = ".".join(str(p) for p in error["loc"]) or "config"
        reason = "unknown key" if error["type"] == "extra_forbidden" else error["msg"].removeprefix("Value error, ")
        raise ConfigError(key, f"{reason} (got {error.get('input')!r})" if error["type"] != "extra_forbidden" else reason) from None


def parse_value(text: str) -> Any:
    """A ``--set key=value`` value: YAML scalars (numbers, booleans, null, lists) or a plain string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text

"""Extract the KubeRay CRD schemas our manifests are checked against (tests/test_cluster.py).

    python tests/data/kuberay/extract_schemas.py <kuberay checkout> v1.6.2 v1.7.0

For each tag, reads ``ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs,raycronjobs}.yaml``
and keeps each CRD's ``openAPIV3Schema`` only along the paths that ``cluster/kuberay/*.yaml`` use:
every object on such a path keeps all of its property names (so an unknown field is still caught),
properties the manifests do not use become stubs marked ``x-pruned``. Writes
``tests/data/kuberay/crd-<tag>.json``. Rerun it when the manifests start using new fields.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
MANIFESTS = HERE.parents[2] / "cluster" / "kuberay"
CRDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayCronJob": "raycronjobs"}
STUB_KEYS = ("type", "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields")


def stub(schema: dict) -> dict:
    return {**{k: schema[k] for k in STUB_KEYS if k in schema}, "x-pruned": True}


def prune(schema: dict, value) -> dict:
    """``schema`` kept along the paths ``value`` uses."""
    kept = {k: v for k, v in schema.items() if k not in ("properties", "items", "additionalProperties", "description")}
    if isinstance(value, dict) and "properties" in schema:
        kept["properties"] = {name: prune(sub, value[name]) if name in value else stub(sub)
                              for name, sub in schema["properties"].items()}
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        kept["additionalProperties"] = merge([prune(schema["additionalProperties"], v) for v in value.values()]
                                             or [stub(schema["additionalProperties"])])
    elif isinstance(value, list) and "items" in schema:
        kept["items"] = merge([prune(schema["items"], v) for v in value] or [stub(schema["items"])])
    elif any(k in schema for k in ("properties", "items", "additionalProperties")):
        return stub(schema)
    return kept


def merge(schemas: list[dict]) -> dict:
    """One schema keeping what any of ``schemas`` (prunings of the same schema) kept."""
    full = [s for s in schemas if not s.get("x-pruned")]
    if not full:
        return schemas[0]
    merged = dict(full[0])
    if "properties" in merged:
        merged["properties"] = {name: merge([s["properties"][name] for s in full]) for name in merged["properties"]}
    for key in ("items", "additionalProperties"):
        if key in merged:
            merged[key] = merge([s[key] for s in full])
    return merged


def main(checkout: str, *tags: str) -> None:
    manifests = [yaml.safe_load(p.read_text()) for p in sorted(MANIFESTS.glob("*.yaml"))]
    for tag in tags:
        out = {}
        for kind, plural in CRDS.items():
            text = subprocess.run(["git", "-C", checkout, "show", f"{tag}:ray-operator/config/crd/bases/ray.io_{plural}.yaml"],
                                  check=True, capture_output=True, text=True).stdout
            schema = yaml.safe_load(text)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
            out[kind] = merge([prune(schema, doc) for doc in manifests if doc["kind"] == kind])
        (HERE / f"crd-{tag}.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])

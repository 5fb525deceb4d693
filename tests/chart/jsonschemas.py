#!/usr/bin/env python3
"""Writes kubeconform JSON schemas for every kind the API server serves (built-in kinds and
installed CRDs) from its OpenAPI v2 document, so manifests are validated offline against the
exact Kubernetes version of the local control plane.

    kubectl get --raw /openapi/v2 | jsonschemas.py OUT_DIR

Writes OUT_DIR/<kind>[-<group's first label>]-<version>.json (kubeconform's default names,
e.g. deployment-apps-v1.json, service-v1.json), each standalone (every referenced definition included) and strict: objects reject
properties their schema does not name, as kubeconform -strict expects.
"""
import copy
import json
import os
import sys

INT_OR_STRING = {"oneOf": [{"type": "string"}, {"type": "integer"}]}
QUANTITY = {"oneOf": [{"type": "string"}, {"type": "number"}]}


def strict(node):
    """A schema node with int-or-string and quantities as JSON schema alternatives, and
    closed objects."""
    if not isinstance(node, dict):
        return node
    if node.get("format") == "int-or-string":
        return dict(INT_OR_STRING)
    if isinstance(node.get("$ref"), str):
        return {"$ref": node["$ref"]}
    out = dict(node)
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: strict(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if isinstance(out.get(key), list):
            out[key] = [strict(n) for n in out[key]]
    return out


def refs(node, found):
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/definitions/"):
            name = ref[len("#/definitions/"):]
            if name not in found:
                found.add(name)
                refs(DEFS[name], found)
        for v in node.values():
            refs(v, found)
    elif isinstance(node, list):
        for v in node:
            refs(v, found)


doc = json.load(sys.stdin)
DEFS = {}
for name, schema in doc["definitions"].items():
    if name == "io.k8s.apimachinery.pkg.api.resource.Quantity":
        DEFS[name] = dict(QUANTITY)
    else:
        DEFS[name] = strict(schema)

out_dir = sys.argv[1]
os.makedirs(out_dir, exist_ok=True)
written = 0
for name, schema in DEFS.items():
    for gvk in doc["definitions"][name].get("x-kubernetes-group-version-kind", []):
        if gvk["kind"].endswith("List") or gvk["version"] == "__internal":
            continue
        needed = set()
        refs(schema, needed)
        standalone = copy.deepcopy(schema)
        standalone["$schema"] = "http://json-schema.org/draft-07/schema#"
        standalone["definitions"] = {n: DEFS[n] for n in sorted(needed)}
        group = f'-{gvk["group"].split(".")[0]}' if gvk["group"] else ""
        path = os.path.join(out_dir, f'{gvk["kind"].lower()}{group}-{gvk["version"]}.json')
        with open(path, "w") as f:
            json.dump(standalone, f)
        written += 1
print(f"wrote {written} schemas to {out_dir}", file=sys.stderr)

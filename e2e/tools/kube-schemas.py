#!/usr/bin/env python3
"""JSON schemas for kubeconform, offline, from pinned sources.

  kube-schemas.py swagger SWAGGER_JSON OUT_DIR   Kubernetes' own kinds, from the swagger.json of
                                                 the pinned k8s.io/kubernetes module
  kube-schemas.py crds OUT_DIR CRD...            custom resources, from their CRDs (one per
                                                 .json file; YAML files need PyYAML)

Both write OUT_DIR/<group>/<kind>_<version>.json (the core group's directory is "v1"), the
layout of kubeconform's schema location
  OUT_DIR/{{ .Group }}/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json
The schemas are "strict" the way kubeconform's published ones are (kubeconform's
openapi2jsonschema.py): every object with properties refuses other properties, int-or-string
and quantities take a number or a string, optional fields may be null. Swagger references are
resolved into a "definitions" section of each file, holding only what the kind reaches.
"""
import json
import os
import sys

INT_OR_STRING = {"oneOf": [{"type": "string"}, {"type": "integer"}]}
QUANTITY = {"oneOf": [{"type": "string"}, {"type": "number"}]}
REF_PREFIX = "#/definitions/"


def strict(node, required=()):
    """Refuses unknown properties, types int-or-string and quantities, lets optional fields be null."""
    if isinstance(node, list):
        return [strict(x) for x in node]
    if not isinstance(node, dict):
        return node
    if node.get("format") == "int-or-string" or node.get("x-kubernetes-int-or-string"):
        return dict(INT_OR_STRING)
    out = {}
    for key, value in node.items():
        if key == "properties" and isinstance(value, dict):
            req = set(node.get("required", []))
            out[key] = {
                name: nullable(strict(prop), name in req) for name, prop in value.items()
            }
        else:
            out[key] = strict(value)
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def nullable(prop, required):
    """An optional field may be null (helm renders `key:` with nothing as null)."""
    if required or not isinstance(prop.get("type"), str):
        return prop
    return {**prop, "type": [prop["type"], "null"]}


def reachable(definitions, root):
    """Names of the definitions `root` refers to, transitively."""
    seen, todo = set(), [root]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith(REF_PREFIX):
                name = ref[len(REF_PREFIX):]
                if name not in seen:
                    seen.add(name)
                    todo.append(definitions[name])
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
    return seen


def write(out_dir, group, kind, version, schema):
    directory = os.path.join(out_dir, group or version)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{kind.lower()}_{version}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(schema, f, separators=(",", ":"))


def from_swagger(swagger_path, out_dir):
    with open(swagger_path, encoding="utf-8") as f:
        definitions = json.load(f)["definitions"]
    definitions["io.k8s.apimachinery.pkg.api.resource.Quantity"] = dict(QUANTITY)
    definitions = {name: strict(d) for name, d in definitions.items()}
    count = 0
    for name, definition in definitions.items():
        for gvk in definition.get("x-kubernetes-group-version-kind", []):
            if gvk["kind"].endswith("List") and "items" in definition.get("properties", {}):
                continue
            schema = dict(definition)
            schema["$schema"] = "http://json-schema.org/draft-07/schema#"
            schema["definitions"] = {n: definitions[n] for n in reachable(definitions, definition)}
            # A manifest names its own kind and apiVersion; the swagger leaves them open.
            props = dict(schema.get("properties", {}))
            api_version = f"{gvk['group']}/{gvk['version']}" if gvk["group"] else gvk["version"]
            props["apiVersion"] = {"type": "string", "enum": [api_version]}
            props["kind"] = {"type": "string", "enum": [gvk["kind"]]}
            schema["properties"] = props
            write(out_dir, gvk["group"], gvk["kind"], gvk["version"], schema)
            count += 1
    return count


def from_crds(out_dir, paths):
    count = 0
    for path in paths:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".json"):
                docs = [json.load(f)]
            else:
                import yaml  # only CRDs given as YAML need PyYAML

                docs = [d for d in yaml.safe_load_all(f) if d]
        for crd in docs:
            if crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            for version in spec.get("versions", []):
                schema = version.get("schema", {}).get("openAPIV3Schema")
                if schema is None:
                    continue
                schema = strict(schema)
                # The API server adds these to every custom resource; a CRD's schema may omit them.
                props = schema.setdefault("properties", {})
                api_version = f"{spec['group']}/{version['name']}"
                props.setdefault("apiVersion", {"type": "string", "enum": [api_version]})
                props.setdefault("kind", {"type": "string", "enum": [spec["names"]["kind"]]})
                props.setdefault("metadata", {"type": "object"})
                schema["$schema"] = "http://json-schema.org/draft-07/schema#"
                write(out_dir, spec["group"], spec["names"]["kind"], version["name"], schema)
                count += 1
    return count


def main(argv):
    if len(argv) >= 3 and argv[0] == "swagger":
        count = from_swagger(argv[1], argv[2])
    elif len(argv) >= 2 and argv[0] == "crds":
        count = from_crds(argv[1], argv[2:])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    if count == 0:
        print("kube-schemas.py: no schema written", file=sys.stderr)
        return 1
    print(f"kube-schemas.py: {count} schemas", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Validates Kubernetes manifests (`cargo xtask check` passes deploy/kubernetes/*.yaml) against
pinned schemas: Kubernetes' own (the kubernetes-validate package, strict: an unknown field is
an error) and agent-sandbox's CRDs (agent-sandbox-v0.5.6.json beside this file, made strict the
same way). A kind neither knows is an error too: every document must be checked.

    validate.py FILE...

Prints one line per document; exits 1 if any is invalid.
"""

import copy
import json
import pathlib
import sys

import jsonschema
import kubernetes_validate
import yaml

KUBERNETES = "1.35.0"
CRDS = json.loads((pathlib.Path(__file__).parent / "agent-sandbox-v0.5.6.json").read_text())


def strict(schema):
    """The schema with every object that lists its properties closed to others, as the API
    server's field validation (`kubectl apply --validate=strict`) treats a CRD's pruned fields;
    `metadata` (a bare object in a CRD) is left open."""
    schema = copy.deepcopy(schema)

    def close(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


def check(doc):
    """None if `doc` is valid, else why not."""
    if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
        return "not a Kubernetes object (no apiVersion or kind)"
    key = f"{doc['apiVersion']}/{doc['kind']}"
    if key in CRDS["schemas"]:
        try:
            jsonschema.validate(doc, strict(CRDS["schemas"][key]))
        except jsonschema.ValidationError as e:
            where = "/".join(str(p) for p in e.absolute_path) or "(top)"
            return f"{where}: {e.message}"
        return None
    try:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = "/".join(str(p) for p in e.path) or "(top)"
        return f"{where}: {e.message}"
    except kubernetes_validate.SchemaNotFoundError:
        return f"no schema for {key} (Kubernetes {KUBERNETES} or agent-sandbox {CRDS['release']})"
    return None


def main():
    failed = False
    for name in sys.argv[1:]:
        try:
            docs = [d for d in yaml.safe_load_all(pathlib.Path(name).read_text()) if d is not None]
        except yaml.YAMLError as e:
            print(f"{name}: not YAML: {e}")
            failed = True
            continue
        for doc in docs:
            what = f"{name}: {doc.get('kind', '?')} {doc.get('metadata', {}).get('name', '?')}" if isinstance(doc, dict) else name
            problem = check(doc)
            print(f"{what}: {'ok' if problem is None else 'INVALID: ' + problem}")
            failed |= problem is not None
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

"""Vendor the OpenAPI schemas of KubeRay's CRDs, for the offline manifest tests.

    python infra/schemas/vendor_kuberay.py path/to/kuberay/helm-chart/kuberay-operator/crds

Keeps only what validation reads: the served ``v1`` version's ``openAPIV3Schema``, without its
``description`` texts and its ``status`` (the operator writes that, never a manifest), as compact
JSON; the CRDs themselves are 1-1.4 MB of YAML each. tests/integration/test_infra_manifests.py
validates infra/kuberay/ against these files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CRDS = ("ray.io_rayclusters", "ray.io_rayjobs")


def stripped(node):
    if isinstance(node, dict):
        # A property may be named "description" too: only the text (a string) goes.
        return {key: stripped(value) for key, value in node.items()
                if not (key == "description" and isinstance(value, str))}
    if isinstance(node, list):
        return [stripped(value) for value in node]
    return node


def main(crd_dir: Path) -> None:
    for name in CRDS:
        crd = yaml.safe_load((crd_dir / f"{name}.yaml").read_text())
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schema = stripped(version["schema"]["openAPIV3Schema"])
        schema["properties"].pop("status", None)
        out = HERE / f"{name}.v1.json"
        out.write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n")
        print(f"{out}: {out.stat().st_size} bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

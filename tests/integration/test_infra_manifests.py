"""The cluster manifests in infra/, checked offline against the schemas their tools use.

KubeRay's ``RayCluster`` and ``RayJob`` (infra/kuberay/) against the OpenAPI schemas of KubeRay
v1.7.0's CRDs (vendored in infra/schemas/ by infra/schemas/vendor_kuberay.py), made strict the way
``kubectl apply`` is (an unknown field is an error, not silently pruned), plus the Kubernetes-level
facts a schema cannot see: every Secret a manifest names is defined with that key, images are
pinned, token auth is on everywhere, credentials only ever come from Secrets. Ray's cluster launcher
config (infra/ray-cluster.yaml) goes through the same preparation and schema check as ``ray up``.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import REPO

INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
SCHEMAS = {"RayCluster": "ray.io_rayclusters.v1.json", "RayJob": "ray.io_rayjobs.v1.json"}
# KubeRay's own limits on names (ray-operator/controllers/ray/utils/constant.go): pods and services
# get suffixes; names are DNS-1035 labels.
NAME_LIMITS = {"RayCluster": 53, "RayJob": 47}
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
OBJECT_STORE_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
# RFC 5737's documentation ranges: an address there is a placeholder by definition.
DOCUMENTATION_NETS = [ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")]


def manifests() -> list[dict]:
    return [doc for path in sorted(KUBERAY.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(kind: str) -> list[dict]:
    return [doc for doc in manifests() if doc["kind"] == kind]


def strict(schema: dict) -> dict:
    """The schema as the API server applies it with strict field validation: an object schema that
    lists its properties and does not preserve unknown fields admits no other key."""
    schema = copy.deepcopy(schema)

    def visit(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    # A manifest's metadata is the API server's to check (the CRD says only "object").
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def schema_errors(doc: dict) -> list[str]:
    schema = strict(json.loads((INFRA / "schemas" / SCHEMAS[doc["kind"]]).read_text()))
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(doc)]


def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """(group name, pod spec) of a RayCluster's head and worker groups."""
    spec = doc["spec"]
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, group["template"]["spec"]) for name, group in groups]


def env_of(container: dict) -> dict[str, dict]:
    return {var["name"]: var for var in container.get("env", [])}


# ---------------------------------------------------------------- KubeRay


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_kuberay_manifests_match_the_crd_schemas(kind):
    docs = by_kind(kind)
    assert docs, f"no {kind} in {KUBERAY}"
    for doc in docs:
        assert doc["apiVersion"] == "ray.io/v1"
        assert schema_errors(doc) == [], doc["metadata"]["name"]
        name = doc["metadata"]["name"]
        assert DNS_1035.match(name) and len(name) <= NAME_LIMITS[kind], name


def test_the_schema_check_catches_a_typo_and_a_wrong_type():
    cluster = by_kind("RayCluster")[0]
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpecs"][0]["replica"] = typo["spec"]["workerGroupSpecs"][0].pop("replicas")
    assert any("'replica' was unexpected" in e for e in schema_errors(typo))
    wrong = copy.deepcopy(cluster)
    wrong["spec"]["authOptions"]["mode"] = "password"
    assert any("authOptions.mode" in e for e in schema_errors(wrong))


def test_every_referenced_secret_key_is_defined():
    defined = {doc["metadata"]["name"]: set(doc.get("stringData", {})) | set(doc.get("data", {}))
               for doc in by_kind("Secret")}
    referenced = set()
    for cluster in by_kind("RayCluster"):
        referenced.add((cluster["spec"]["authOptions"]["secretName"], "auth_token"))  # KubeRay's key
        for _, pod in pod_specs(cluster):
            for container in pod["containers"]:
                for var in container.get("env", []):
                    ref = var.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        referenced.add((ref["name"], ref["key"]))
    assert referenced, "the manifests reference no Secret"
    missing = sorted((name, key) for name, key in referenced if key not in defined.get(name, set()))
    assert missing == [], f"Secrets (name, key) referenced but not defined in {KUBERAY}: {missing}"
    # The Secret file is a template: its values are placeholders, never a credential.
    for secret in by_kind("Secret"):
        assert set(secret["stringData"].values()) == {"REPLACE_ME"}, secret["metadata"]["name"]


def test_token_auth_and_object_store_credentials_on_every_ray_container():
    import ray

    for cluster in by_kind("RayCluster"):
        auth = cluster["spec"]["authOptions"]
        assert auth["mode"] == "token"
        # Token auth needs Ray >= 2.52 (KubeRay refuses less); the image installs this project's Ray.
        assert cluster["spec"]["rayVersion"] == ray.__version__
        for group, pod in pod_specs(cluster):
            for container in pod["containers"]:
                env = env_of(container)
                assert env["RAY_AUTH_MODE"]["value"] == "token", group
                assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
                    "name": auth["secretName"], "key": "auth_token"}, group
                for var in OBJECT_STORE_VARS:
                    assert "value" not in env[var] and env[var]["valueFrom"]["secretKeyRef"]["key"] == var, (group, var)


def test_images_are_pinned_and_gpu_workers_ask_for_gpus():
    for cluster in by_kind("RayCluster"):
        for group, pod in pod_specs(cluster):
            for container in pod["containers"]:
                image = container["image"]
                tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
                assert "@sha256:" in image or tag not in ("", "latest"), (group, image)
        groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
        for group in groups.values():
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
        assert gpu["limits"]["nvidia.com/gpu"] == gpu["requests"]["nvidia.com/gpu"] == "1"
        assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_the_rayjob_runs_the_pipeline_on_the_cluster_with_an_object_store_workspace():
    from lmforge.config.loader import load_config

    clusters = {doc["metadata"]["name"] for doc in by_kind("RayCluster")}
    for job in by_kind("RayJob"):
        assert job["spec"]["clusterSelector"]["ray.io/cluster"] in clusters
        command = shlex.split(job["spec"]["entrypoint"])
        assert command[:2] == ["lmforge", "run"]
        # The image copies the repository's configs/ under its (runtime stage's, the last) WORKDIR: the config
        # named must load.
        workdir = re.findall(r"^WORKDIR (\S+)$", (REPO / "docker" / "Dockerfile").read_text(), re.M)[-1]
        config = Path(command[2])
        assert config.is_relative_to(workdir), (config, workdir)
        load_config(REPO / config.relative_to(workdir))
        env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
        assert env["LMFORGE_HOME"].startswith("s3://")


# ---------------------------------------------------------------- Ray's cluster launcher


def test_ray_cluster_launcher_config_passes_rays_own_checks():
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = (INFRA / "ray-cluster.yaml").read_text()
    config = yaml.safe_load(text)
    validate_config(prepare_config(config))  # what `ray up` runs first; raises on any schema error
    docker = config["docker"]
    assert ":" in docker["image"] and not docker["image"].endswith(":latest")
    assert "--env=RAY_AUTH_MODE=token" in docker["run_options"]
    home = next(o for o in docker["run_options"] if o.startswith("--env=LMFORGE_HOME="))
    assert home.split("=", 2)[2].startswith("s3://")
    assert any(target.endswith("/.ray/auth_token") for target in config["file_mounts"])
    assert not re.search(r"AWS_SECRET_ACCESS_KEY|RAY_AUTH_TOKEN=", text), "secrets belong in files, not here"


def test_launcher_addresses_are_marked_placeholders():
    text = (INFRA / "ray-cluster.yaml").read_text()
    provider = yaml.safe_load(text)["provider"]
    for address in [provider["head_ip"], *provider["worker_ips"]]:
        assert any(ipaddress.ip_address(address) in net for net in DOCUMENTATION_NETS), address
    lines = text.splitlines()
    first_ip_line = next(i for i, line in enumerate(lines) if "head_ip:" in line)
    assert "REPLACE" in "\n".join(lines[max(0, first_ip_line - 3):first_ip_line]), "say that the addresses are to be replaced"


def test_vendored_schemas_are_compact_and_say_where_they_come_from():
    for name in SCHEMAS.values():
        path = INFRA / "schemas" / name
        assert path.stat().st_size < 400_000 and "\n" not in path.read_text().rstrip("\n")
    assert "v1.7.0" in (INFRA / "README.md").read_text()


def test_unknown_manifest_files_are_not_left_unchecked():
    kinds = {doc["kind"] for doc in manifests()}
    assert kinds <= {"RayCluster", "RayJob", "Secret"}, kinds
    assert Path(KUBERAY / "raycluster.yaml").is_file() and Path(KUBERAY / "rayjob.yaml").is_file()

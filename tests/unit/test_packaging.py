"""Static checks of what cannot run here: Docker images and the compose stack (no Docker engine
on CI), plus the README's promises about its two commands."""

from __future__ import annotations

import re
import shlex

import yaml
from conftest import REPO

from lmforge.cli import build_parser


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_services_are_complete():
    services = _compose()["services"]
    assert {"postgres", "minio", "prefect-server", "prefect-worker", "mlflow", "ray-head", "ray-worker",
            "serve"} <= set(services)
    named = set(_compose().get("volumes") or {})
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            assert (REPO / svc["build"]["context"] / svc["build"]["dockerfile"]).exists(), name
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            assert source in named or (REPO / source).exists(), vol


def test_compose_lmforge_commands_parse_with_our_cli():
    """The image has no ENTRYPOINT: a service's command is a whole command line; lmforge's parse."""
    parser = build_parser()
    for name, svc in _compose()["services"].items():
        command = svc.get("command") or []
        if "build" in svc and svc.get("entrypoint") is None and command[:1] == ["lmforge"]:
            args = parser.parse_args(command[1:])  # raises SystemExit on a bad command
            assert args.handler is not None, name


def test_dockerfile_copies_existing_paths():
    text = (REPO / "docker" / "Dockerfile").read_text()
    sources = [src for line in text.splitlines() if line.startswith("COPY") and "--from=" not in line
               for src in shlex.split(line)[1:-1]]
    assert sources, "Dockerfile copies nothing"
    for src in sources:
        assert (REPO / src).exists(), f"Dockerfile copies missing {src}"
    assert re.search(r"^FROM python:3\.11", text, re.M)
    assert re.search(r"^USER (?!root|0\b)", text, re.M)  # never run the server as root
    assert not re.search(r"^ENTRYPOINT", text, re.M)  # compose commands are whole command lines


def test_readme_names_the_two_commands_and_ci_calls_make_test():
    readme = (REPO / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    assert "make test" in (REPO / ".ci" / "run").read_text()
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^run:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "torch==2.13.0" in makefile


def test_every_engine_package_is_in_the_distribution():
    """A package missing from the distribution works in the editable dev install but not in the image.

    pyproject finds packages by their ``__init__.py``; a folder of modules without one is left out.
    """
    import tomllib

    found = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert "lmforge*" in found["include"] and {"flows", "tasks"} <= set(found["include"])
    for module in (REPO / "src").rglob("*.py"):
        package = ".".join(module.parent.relative_to(REPO / "src").parts)
        assert (module.parent / "__init__.py").exists(), f"{package} has no __init__.py, so no wheel holds it"


# ---------------------------------------------------------------- install drift (issue 20, item 10)

def _check_script_constant(name: str):
    """A literal constant of .ci/plain_install_check.py (read, not imported: the script runs a venv build)."""
    import ast

    tree = ast.parse((REPO / ".ci" / "plain_install_check.py").read_text())
    (value,) = [ast.literal_eval(node.value) for node in tree.body
                if isinstance(node, ast.AnnAssign | ast.Assign) and ast.unparse(node).startswith(name)]
    return value


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _plain_install_closure() -> set[str]:
    """Distributions that a plain ``pip install .`` brings, walked through the installed metadata.

    An extra is followed only when spelled exactly as its distribution declares it, as pip 23.2 (the one
    Python 3.11 bundles) does: ``justext`` asks for ``lxml[html_clean]``, lxml declares ``html-clean``, and
    that pip drops the extra with a warning, so ``lxml_html_clean`` comes only when lmforge names it.
    """
    from importlib import metadata

    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    env: dict[str, str] = {**default_environment(), "extra": ""}
    todo = [Requirement(line) for line in _pyproject()["project"]["dependencies"]]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:  # not installed here: a leaf of the walk
            seen.add((canonicalize_name(req.name), frozenset()))
            continue
        extras = frozenset(req.extras & set(dist.metadata.get_all("Provides-Extra") or []))
        if (canonicalize_name(req.name), extras) in seen:
            continue
        seen.add((canonicalize_name(req.name), extras))
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({**env, "extra": e}) for e in ("", *extras)):
                todo.append(sub)
    return {name for name, _ in seen}


def test_a_plain_install_brings_everything_html_extraction_imports():
    """Issue 20, item 10: HTML extraction (web, feeds, local .html) in a plain install, no extras.

    The extraction runs in a fresh interpreter; every distribution whose modules it loaded must be a
    dependency of a plain install. (The CI's .ci/plain_install_check proves the same in a fresh venv.)
    """
    import json
    import subprocess
    import sys
    from importlib import metadata

    from packaging.utils import canonicalize_name

    code = ("import json, sys; before = set(sys.modules); from lmforge.collection.html import main_text; "
            "text = main_text(sys.stdin.read())[1]; "
            "print(json.dumps({'text': text, 'loaded': sorted({m.split('.')[0] for m in set(sys.modules) - before})}))")
    page = _check_script_constant("PAGE")  # the page the CI check extracts in its fresh venv
    out = subprocess.run([sys.executable, "-c", code], input=page, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "two high tides" in result["text"] and "Copyright" not in result["text"], result["text"]
    owners = metadata.packages_distributions()
    closure = _plain_install_closure()
    missing = {}
    for module in result["loaded"]:
        dists = {canonicalize_name(d) for d in owners.get(module, [])} - {"lmforge"}
        if dists and not dists & closure:
            missing[module] = sorted(dists)
    assert not missing, f"HTML extraction imports modules no plain install brings (add to [project.dependencies]): {missing}"


def _lock() -> dict[str, str]:
    """requirements.lock as {canonical name: pinned version}."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"requirements.lock: {line!r} is not an exact pin"
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def test_the_lock_pins_every_dependency_make_install_installs():
    """A dependency added to pyproject.toml without `make lock` would install unpinned (or not at all)."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = _pyproject()["project"]
    makefile = (REPO / "Makefile").read_text()
    extras = re.search(r"^LOCK_EXTRAS\s*:?=\s*(.+)$", makefile, re.M)
    assert extras, "Makefile: LOCK_EXTRAS (the extras that `make install` and the lock cover) is missing"
    wanted = list(project["dependencies"])
    for extra in extras.group(1).split():
        wanted += project["optional-dependencies"][extra]
    pins = _lock()
    env = {**default_environment(), "extra": ""}
    for line in wanted:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not in requirements.lock: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}: run `make lock`")
    torch = re.search(r"^TORCH_SPEC\s*\?=\s*torch==(\S+)$", makefile, re.M)
    assert torch and pins["torch"] == f"{torch.group(1)}+cpu", "the lock and the Makefile must pin the same CPU torch"
    assert "lxml-html-clean" in pins


def test_make_install_installs_from_the_lock():
    makefile = (REPO / "Makefile").read_text()
    install = makefile.split("$(STAMP):", 1)[1].split("\n\n", 1)[0]
    assert "requirements.lock" in install and "--no-deps" in install, install
    assert re.search(r"^lock:", makefile, re.M), "Makefile: no `make lock` target"


def test_ci_checks_a_plain_install_between_lint_and_tests():
    ci = (REPO / ".ci" / "run").read_text()
    check = REPO / ".ci" / "plain_install_check"
    assert check.is_file() and check.stat().st_mode & 0o111, "the plain-install check is missing or not executable"
    assert ci.index("make lint") < ci.index("plain_install_check") < ci.index("make test")


def test_the_plain_install_check_names_real_modules_and_what_they_need():
    """Modules the check skips are listed with what they need; a stale entry would hide a real failure."""
    needs = _check_script_constant("NEEDS")
    extras = set(_pyproject()["project"]["optional-dependencies"])
    for module, need in needs.items():
        path = REPO / "src" / (module.replace(".", "/") + ".py")
        assert path.is_file(), f"{module} is listed in .ci/plain_install_check.py but does not exist"
        assert need in extras | {"cuda"}, f"{module} needs {need!r}: neither an extra of pyproject.toml nor 'cuda'"

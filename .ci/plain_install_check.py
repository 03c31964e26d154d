"""What a plain install of lmforge promises, checked: run by .ci/plain_install_check with the python of a
fresh virtual environment that holds only ``pip install .`` (no extras) and the CPU torch.

It imports every module of the installed ``lmforge``, ``flows`` and ``tasks`` packages, except those in
``NEEDS``, and extracts the main text of a small HTML page as the web, feed and local ``.html`` sources do
(trafilatura, whose boilerplate remover ``justext`` needs ``lxml_html_clean``). Exit status 1, with each
failure named, when anything is missing.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import traceback
from pathlib import Path

# Modules that need more than a plain install, with what they need: an extra of pyproject.toml
# (`pip install 'lmforge[NAME]'`) or "cuda" (a CUDA build of torch, which brings triton). Each is
# imported only where that is present.
NEEDS: dict[str, str] = {
    "lmforge.serving.kernels.decode_attention": "cuda",
    "lmforge.serving.kernels.layer": "cuda",
    "lmforge.serving.kernels.quant": "cuda",
}

PAGE = """<html><head><title>Tides</title></head><body>
<nav><a href="/">Home</a> | <a href="/about">About</a></nav>
<article><h1>How tides work</h1>
<p>The moon's gravity pulls the ocean toward it, raising a bulge of water on the side of the earth that faces it.</p>
<p>A second bulge forms on the far side, where the moon pulls the earth away from the water, so most coasts see
two high tides and two low tides every lunar day of about twenty-four hours and fifty minutes.</p>
<p>When the sun and the moon line up, at new and full moon, their pulls add and the tides run highest.</p>
</article><footer>Copyright 2026. All rights reserved.</footer></body></html>"""


def module_names() -> list[str]:
    """Every module of the installed packages (``__main__`` modules run a program when imported: left out)."""
    names = []
    for top in ("lmforge", "flows", "tasks"):
        package = importlib.import_module(top)
        names.append(top)
        names += [info.name for info in pkgutil.walk_packages(package.__path__, f"{top}.", onerror=lambda _: None)]
    return [name for name in names if name.rsplit(".", 1)[-1] != "__main__"]


def import_failures() -> dict[str, str]:
    failures = {}
    for name in module_names():
        if name in NEEDS:
            continue
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, by module, and the check fails
            failures[name] = "".join(traceback.format_exception_only(exc)).strip()
    return failures


def main() -> int:
    import lmforge

    # An editable or source-tree lmforge would hide what the wheel lacks.
    if Path(sys.prefix) not in Path(lmforge.__file__).resolve().parents:
        print(f"lmforge was imported from {lmforge.__file__}, not from the fresh venv at {sys.prefix}")
        return 1
    failures = import_failures()
    for name, error in failures.items():
        print(f"  cannot import {name}: {error}")
    try:
        from lmforge.collection.html import main_text

        text = main_text(PAGE)[1]
    except Exception as exc:  # noqa: BLE001 - reported as the HTML extraction's failure
        failures["HTML extraction"] = repr(exc)
        print(f"  HTML extraction failed: {''.join(traceback.format_exception(exc))}")
    else:
        if "two high tides" not in text or "Copyright" in text:
            failures["HTML extraction"] = text
            print(f"  HTML extraction kept the wrong text: {text!r}")
    skipped = ", ".join(f"{name} (needs {need})" for name, need in NEEDS.items())
    print(f"{len(module_names()) - len(NEEDS)} modules imported, HTML extracted; not imported: {skipped}"
          if not failures else f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""`make install` takes torch's CPU build from PyTorch's CPU wheel index, after an installed torch or a local
wheel (no index asked), and the plain-install check takes it the same way (one recipe: install-torch)."""

from __future__ import annotations

import re

from conftest import REPO


def test_torch_comes_from_the_cpu_index_after_what_the_machine_holds():
    makefile = (REPO / "Makefile").read_text()
    index = re.search(r"^TORCH_INDEX \?= (\S+)$", makefile, re.M)
    assert index and index.group(1).endswith("/whl/cpu")
    recipe = makefile.split("\ninstall-torch:\n", 1)[1].split("\n\n", 1)[0]
    local, remote = recipe.index("--no-index --no-deps"), recipe.index('--index-url "$(TORCH_INDEX)"')
    assert local < remote and "||" in recipe[local:remote]
    install = makefile.split("\n$(STAMP):", 1)[1].split("\n\n", 1)[0]
    assert "$(MAKE) --no-print-directory install-torch" in install
    assert "install-torch" in (REPO / ".ci" / "plain_install_check").read_text()

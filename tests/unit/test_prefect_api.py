"""The first `lmforge run`: Prefect's temporary server gets the time a busy machine needs unless the user
set it, and a Prefect home it cannot write is named with its fix before any server starts."""

from __future__ import annotations

import pytest
from prefect.settings import PREFECT_HOME, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

from flows.prefect_api import BUSY_MACHINE_STARTUP_S, check_prefect_home, startup_timeout
from lmforge.core.errors import OrchestrationError


def test_the_startup_timeout_is_ours_unless_the_user_set_one():
    assert startup_timeout() == BUSY_MACHINE_STARTUP_S > 20  # Prefect's default failed on a busy machine
    with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 7}):
        assert startup_timeout() == 7


def test_a_prefect_home_that_cannot_be_written_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with temporary_settings({PREFECT_HOME: blocker / "prefect"}), pytest.raises(OrchestrationError) as err:
        check_prefect_home()
    assert str(blocker / "prefect") in err.value.cause
    assert "PREFECT_HOME" in err.value.fix and "PREFECT_API_URL" in err.value.fix
    with temporary_settings({PREFECT_HOME: tmp_path / "fresh"}):
        assert check_prefect_home() == tmp_path / "fresh"

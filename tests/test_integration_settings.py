"""The integrations' settings from the environment (arguments first)."""

from __future__ import annotations

import pytest

from mppools import ConfigurationError
from mppools.integrations import settings_from_env


def test_environment_fills_what_the_arguments_leave_open() -> None:
    env = {"MPPOOLS_LIMIT": "3", "MPPOOLS_NAME": "web", "MPPOOLS_ACQUIRE_TIMEOUT": "5",
           "MPPOOLS_IDLE_TIMEOUT": "none", "MPPOOLS_HOLD_QUANTUM": "0.05",
           "MPPOOLS_BACKEND": "memory", "MPPOOLS_LEND": "off"}
    limit, name, kwargs = settings_from_env(environ=env)
    assert (limit, name) == (3, "web")
    assert kwargs == {"acquire_timeout": 5.0, "idle_timeout": None, "hold_quantum": 0.05,
                      "backend": "memory", "lend": False}
    assert settings_from_env(environ={"MPPOOLS_LEND": "1"})[2] == {"lend": True}
    limit, name, kwargs = settings_from_env(2, "api", {"backend": "posix"}, environ=env)
    assert (limit, name, kwargs["backend"]) == (2, "api", "posix")


@pytest.mark.parametrize(("var", "value"), [("MPPOOLS_LIMIT", "three"),
                                             ("MPPOOLS_HOLD_QUANTUM", "none"),
                                             ("MPPOOLS_HOLD_QUANTUM", "fast"),
                                             ("MPPOOLS_LEND", "maybe")])
def test_bad_environment_values_are_refused(var: str, value: str) -> None:
    with pytest.raises(ConfigurationError, match=var):
        settings_from_env(environ={var: value})

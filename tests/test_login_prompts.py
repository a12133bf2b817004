"""Who answers authentication's questions without a terminal: SSH_ASKPASS with OpenSSH's rules."""

from __future__ import annotations

import pytest

from remote_kernel.service import askpass_env
from remote_kernel.service.prompts import askpass_program


@pytest.mark.parametrize(("env", "terminal", "expected"), [
    ({}, False, None),
    ({"SSH_ASKPASS": "/a"}, False, None),  # no display, not forced
    ({"SSH_ASKPASS": "/a", "DISPLAY": ":0"}, False, "/a"),
    ({"SSH_ASKPASS": "/a", "WAYLAND_DISPLAY": "w"}, False, "/a"),
    ({"SSH_ASKPASS": "/a", "DISPLAY": ":0"}, True, None),  # unset REQUIRE: a terminal wins
    ({"SSH_ASKPASS": "/a", "DISPLAY": ":0", "SSH_ASKPASS_REQUIRE": "prefer"}, True, "/a"),
    ({"SSH_ASKPASS": "/a", "SSH_ASKPASS_REQUIRE": "prefer"}, False, None),  # prefer needs a display
    ({"SSH_ASKPASS": "/a", "SSH_ASKPASS_REQUIRE": "force"}, True, "/a"),
    ({"SSH_ASKPASS": "/a", "DISPLAY": ":0", "SSH_ASKPASS_REQUIRE": "never"}, False, None),
])
def test_ssh_askpass_is_used_when_openssh_would_use_it(env: dict[str, str], terminal: bool,
                                                        expected: str | None) -> None:
    assert askpass_program(env, terminal=terminal) == expected


def test_only_what_askpass_needs_is_sent_to_the_service() -> None:
    env = {"SSH_ASKPASS": "/a", "DISPLAY": ":0", "HOME": "/h", "SSH_AUTH_SOCK": "/s", "XAUTHORITY": ""}
    assert askpass_env(env) == {"SSH_ASKPASS": "/a", "DISPLAY": ":0"}

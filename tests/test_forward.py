"""Forwarded ports (issue 18 part 3): a remote TCP port reached on 127.0.0.1 through the kernel's
own link (forward.py, tunnel.py, remote/agent.py), never through SSH port forwarding."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_config import only_problem, write

from remote_kernel.config import load_config
from remote_kernel.entry import HostEntry, KernelEntry
from remote_kernel.forward import format_forward, parse_forward

# --- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("written", "parsed"), [
    (8787, (8787, 8787)), ("6006", (6006, 6006)), ("8888:9999", (8888, 9999)), (" 1 : 65535 ", (1, 65535)),
])
def test_a_forward_is_a_remote_port_or_remote_colon_local(written: object, parsed: tuple[int, int]) -> None:
    assert parse_forward(written) == parsed


@pytest.mark.parametrize("written", [0, 65536, True, 8787.0, "", "http", "8787:", ":8787", "1:2:3", "99999", [8787]])
def test_anything_else_is_not_a_forward(written: object) -> None:
    with pytest.raises(ValueError, match="65535"):
        parse_forward(written)


def test_forward_is_stored_as_written_and_inherited_from_the_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [defaults]
        forward = [8787]
        [kernels.inherits]
        host = "alice@lab"
        [kernels.own]
        host = "alice@lab"
        forward = [8787, "6006", "8888:9999"]
    """)
    entries = load_config(path).entries()
    assert entries["inherits"].forward == ("8787",)
    assert entries["own"].forward == ("8787", "6006", "8888:9999")
    assert [parse_forward(item) for item in entries["own"].forward] == [(8787, 8787), (6006, 6006), (8888, 9999)]
    assert format_forward(8888, 9999) == "8888:9999"


@pytest.mark.parametrize("written", ["[0]", "[70000]", '["8787:x"]', "[true]", "[8787.5]", "8787"])
def test_a_bad_forward_names_the_key_and_its_line(tmp_path: Path, written: str) -> None:
    problem = only_problem(write(tmp_path, f'[kernels.k]\nhost = "alice@lab"\n\nforward = {written}\n'))
    assert problem.key.startswith("kernels.k.forward") and problem.line == 4
    assert '"REMOTE:LOCAL"' in problem.message and "65535" in problem.message


def test_an_entry_without_forwards_keeps_its_stored_form() -> None:
    entry = KernelEntry(name="k", host=HostEntry(name="h"), display_name="k")
    assert "forward" not in entry.to_dict()
    wider = KernelEntry(name="k", host=HostEntry(name="h"), display_name="k", forward=("8787",))
    assert KernelEntry.from_dict(wider.to_dict()) == wider and wider.fingerprint() != entry.fingerprint()

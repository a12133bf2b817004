"""Stage one of the remote agent (remote/spawn.py) and the session's first frame, without SSH.

Stage one avoids importing protocol.py and json (they cost the kernel's start ~5-8 ms), so it keeps
its own copies of a few constants and a small JSON writer: these tests hold them to the originals.
The real path (sshd, agent, ipykernel) is exercised by test_launch.py and test_resilience.py.
"""

from __future__ import annotations

import json
import marshal
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from remote_kernel import bootstrap
from remote_kernel import protocol as P
from remote_kernel.remote import agent as agent_module
from remote_kernel.remote import spawn


def test_stage_one_constants_match_the_protocol() -> None:
    assert spawn.FRAME_HEADER.format == P.HEADER.format
    assert (spawn.HELLO, spawn.BOOT) == (P.HELLO, P.BOOT)
    assert spawn.IPC_PORTS == P.IPC_PORTS


@given(st.dictionaries(st.text(), st.one_of(st.text(), st.integers(min_value=-(2**63), max_value=2**63))))
def test_json_object_writes_what_json_reads(fields: dict[str, str | int]) -> None:
    assert json.loads(spawn.json_object(fields)) == fields


def test_agent_input_ends_with_a_boot_frame_stage_one_can_read(tmp_path: Path) -> None:
    request = {"mode": "start", "key": "k\n\"é", "argv": ["{python}", "-m", "x"], "env": {"A": "1"},
               "reconnect_grace": 2.5, "replace": None, "flag": True}
    data = bootstrap.agent_input(request)
    payload = bootstrap.agent_payload()
    assert data.startswith(payload)
    kind, _sid, _seq, length = P.HEADER.unpack_from(data, len(payload))
    assert (kind, length) == (P.BOOT, len(data) - len(payload) - P.HEADER.size)
    # The format every Python 3 reads (the remote python may be older than ours).
    assert marshal.loads(data[len(payload) + P.HEADER.size:]) == request  # noqa: S302 - our own bytes
    assert P.BOOT_MARSHAL_VERSION == 2


def test_the_bootstrap_runs_the_agent_under_python_minus_s() -> None:
    """The whole program, as sshd would run it, in `list` mode (no kernel): stage one reads the
    BOOT frame, the agent answers on stdout."""
    payload = bootstrap.agent_payload()
    result = subprocess.run(
        [sys.executable, "-S", "-c", bootstrap.BOOTSTRAP, str(len(payload))],
        input=bootstrap.agent_input({"mode": "list"}), capture_output=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    answer = json.loads(result.stdout.decode())
    assert isinstance(answer["agents"], list)


def test_a_first_frame_that_is_not_boot_is_refused() -> None:
    payload = bootstrap.agent_payload()
    result = subprocess.run(
        [sys.executable, "-S", "-c", bootstrap.BOOTSTRAP, str(len(payload))],
        input=payload + P.hello({"mode": "list"}, 0), capture_output=True, timeout=30, check=False,
    )
    assert result.returncode == P.EXIT_BAD_REQUEST
    assert b"unexpected first frame 20" in result.stderr


def _reap(process: spawn.KernelProcess, timeout: float = 10.0) -> int:
    code = process.wait(timeout)
    for fd in (process.stdout, process.stderr):
        os.close(fd)
    assert code is not None, "the child did not exit"
    return code


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_spawn_kernel_runs_the_command_in_its_own_session_with_default_sigpipe() -> None:
    script = 'echo "$$ $(cut -d" " -f6 /proc/$$/stat)"; grep SigIgn /proc/self/status; echo err >&2'
    process = spawn.spawn_kernel(["sh", "-c", script], dict(os.environ))
    out, err = _read_all(process.stdout), _read_all(process.stderr)
    assert _reap(process) == 0
    lines = out.decode().split("\n")
    pid, sid = lines[0].split()
    assert pid == sid == str(process.pid)  # the session (and process group) leader
    ignored = int(lines[1].split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1)), "the kernel inherited Python's SIG_IGN for SIGPIPE"
    assert err == b"err\n"


def test_spawn_kernel_finds_the_command_on_the_kernel_env_path(tmp_path: Path) -> None:
    tool = tmp_path / "my-kernel"
    tool.write_text("#!/bin/sh\nexit 7\n")
    tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"}
    assert _reap(spawn.spawn_kernel(["my-kernel"], env)) == 7


def test_spawn_kernel_reports_what_cannot_run(tmp_path: Path) -> None:
    with pytest.raises(spawn.AgentError, match="cannot run no-such-kernel-xyz: not found on PATH"):
        spawn.spawn_kernel(["no-such-kernel-xyz"], dict(os.environ))
    not_executable = tmp_path / "kernel"
    not_executable.write_text("#!/bin/sh\n")
    with pytest.raises(spawn.AgentError, match="Permission denied"):
        spawn.spawn_kernel([str(not_executable)], dict(os.environ))


def test_kernel_process_reports_a_signal_as_a_negative_code() -> None:
    process = spawn.spawn_kernel(["sleep", "30"], dict(os.environ))
    assert process.poll() is None
    assert process.wait(0.05) is None
    os.killpg(process.pid, signal.SIGKILL)
    began = time.monotonic()
    assert _reap(process) == -signal.SIGKILL
    assert time.monotonic() - began < 5


def _older_pythons() -> list[str]:
    """Interpreters older than ours on this machine (the agent promises Python 3.8+)."""
    import glob
    import shutil

    found = {shutil.which(f"python3.{minor}") for minor in (8, 9, 10)}
    pyenv = os.environ.get("PYENV_ROOT")
    if pyenv:
        found |= set(glob.glob(f"{pyenv}/versions/3.[89].*/bin/python3.[89]"))
    # pyenv's shims fail for versions that are not selected: only real interpreters.
    return sorted(path for path in found if path and "/shims/" not in path)


@pytest.mark.parametrize("python", _older_pythons() or [pytest.param("", marks=pytest.mark.skip(
    reason="no Python 3.8-3.10 on this machine; the agent's syntax is still checked by test_agent_parses_as_3_8"))])
def test_the_agent_runs_on_an_older_python(python: str) -> None:
    """Both stages under an old remote Python: start a stand-in kernel that never opens its
    sockets; the agent must stop it at startup_timeout, report EXITED and clean up."""
    payload = bootstrap.agent_payload()
    request = {"mode": "start", "name": "old", "key": "k", "argv": ["sleep", "30"], "env": {}, "token": "t",
               "reconnect_grace": 3, "startup_timeout": 1.0, "replace": None}
    agent = subprocess.Popen([python, "-S", "-c", bootstrap.BOOTSTRAP, str(len(payload))], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert agent.stdin is not None and agent.stdout is not None and agent.stderr is not None
    agent.stdin.write(bootstrap.agent_input(request))
    agent.stdin.flush()
    decoder, exited = P.FrameDecoder(), None
    deadline = time.monotonic() + 15
    while exited is None and time.monotonic() < deadline:
        chunk = os.read(agent.stdout.fileno(), 65536)
        if not chunk:
            break
        for kind, _sid, seq, frame_payload in decoder.feed(chunk):
            if kind == P.EXITED:
                exited = json.loads(frame_payload)
                agent.stdin.write(P.encode(P.ACK, 0, seq))
                agent.stdin.flush()
    agent.stdin.close()
    assert agent.wait(timeout=15) == 0, agent.stderr.read().decode()
    assert exited is not None and "startup_timeout" in exited["reason"], exited
    assert exited["code"] == -signal.SIGTERM


def test_agent_parses_as_3_8() -> None:
    import ast

    package = Path(bootstrap.__file__).parent
    for path in ("remote/spawn.py", "protocol.py", "remote/agent.py"):
        ast.parse((package / path).read_text(encoding="utf-8"), feature_version=(3, 8))


# --- iopub framing: whole messages dropped when the backlog is full (issue 16 item 5) ------------

GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x01" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31
READY = b"\x04\x19\x05READY\x0bSocket-Type\x00\x00\x00\x03PUB"


def jupyter_message(number: int, lines: int, padding: int) -> list[bytes]:
    header = json.dumps({"msg_id": f"m{number}", "msg_type": "stream", "session": "s1"}).encode()
    parent = json.dumps({"msg_id": f"cell{number % 3}"}).encode()
    text = "".join(f"{number} {'x' * padding}\n" for _ in range(lines))
    content = json.dumps({"name": "stdout", "text": text}).encode()
    return [b"stream.stdout", agent_module.DELIMITER, b"f" * 64, header, parent, b"{}", content]


def split_messages(data: bytes) -> list[bytes]:
    """The messages of a ZMTP stream after its greeting and READY, each as its raw bytes."""
    assert data.startswith(GREETING + READY)
    pos, start, messages = len(GREETING + READY), len(GREETING + READY), []
    while pos < len(data):
        flags = data[pos]
        size = int.from_bytes(data[pos + 1:pos + 9], "big") if flags & 2 else data[pos + 1]
        pos += (9 if flags & 2 else 2) + size
        if not flags & 1:
            messages.append(data[start:pos])
            start = pos
    assert pos == len(data), "the stream ends inside a frame"
    return messages


@given(
    shape=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 400)), min_size=1, max_size=12),
    cuts=st.lists(st.integers(1, 700), min_size=1, max_size=40),
    window=st.tuples(st.integers(0, 40), st.integers(0, 40)),
)
def test_the_iopub_framer_drops_whole_messages_and_counts_their_lines(
    shape: list[tuple[int, int]], cuts: list[int], window: tuple[int, int]
) -> None:
    originals = [agent_module.zmtp_message(jupyter_message(n, lines, pad)) for n, (lines, pad) in enumerate(shape)]
    stream = GREETING + READY + b"".join(originals)
    chunks: list[bytes] = []
    pos = 0
    while pos < len(stream):  # the stream cut at arbitrary places, as reads return it
        size = cuts[len(chunks) % len(cuts)]
        chunks.append(stream[pos:pos + size])
        pos += size
    notice = agent_module.zmtp_message([b"notice"])
    reports: list[tuple[int, int]] = []

    def resume(framer: agent_module.IopubFramer) -> bytes:
        reports.append((framer.dropped, framer.lines))
        framer.dropped = framer.lines = 0
        return notice

    framer = agent_module.IopubFramer()
    out = b"".join(framer.feed(chunk, 0 if window[0] <= i < window[1] else 1 << 30, resume)
                   for i, chunk in enumerate(chunks))
    reports.append((framer.dropped, framer.lines))
    relayed = split_messages(out)
    kept = [message for message in relayed if message != notice]
    assert kept == [m for m in originals if m in kept], "kept messages are whole, in order, once"
    lost = [n for n, m in enumerate(originals) if m not in kept]
    assert sum(d for d, _ in reports) == len(lost)
    assert sum(lines for _, lines in reports) == sum(shape[n][0] for n in lost)
    if window[0] >= window[1]:
        assert out == stream


def test_a_stream_that_is_not_zmtp_3_is_relayed_untouched() -> None:
    framer = agent_module.IopubFramer()
    data = b"\xff" + b"\x00" * 8 + b"\x7f\x01" + b"anything at all" * 10  # ZMTP 2: another framing
    assert framer.feed(data, 0, lambda _: b"") == data
    assert framer.broken


def test_list_mode_looks_in_runtime_dir_and_in_the_temporary_directory() -> None:
    """`ps`/`gc` pass the entry's runtime_dir; kernels started before it was set stay visible."""
    import shutil
    import tempfile

    roots = [Path(tempfile.mkdtemp(prefix="rk-", dir="/tmp")) for _ in range(2)]  # short: <= 40 chars
    try:
        for root, name in zip(roots, ("k-in-runtime-dir", "k-in-tmpdir"), strict=True):
            (root / f"remote-kernel-{os.getuid()}" / name).mkdir(mode=0o700, parents=True)
            (root / f"remote-kernel-{os.getuid()}").chmod(0o700)
        payload = bootstrap.agent_payload()
        result = subprocess.run(
            [sys.executable, "-S", "-c", bootstrap.BOOTSTRAP, str(len(payload))],
            input=bootstrap.agent_input({"mode": "list", "runtime_dir": str(roots[0])}), capture_output=True,
            timeout=30, check=False, env={**os.environ, "TMPDIR": str(roots[1])},
        )
        assert result.returncode == 0, result.stderr.decode()
        names = sorted(Path(agent["dir"]).name for agent in json.loads(result.stdout)["agents"])
        assert names == ["k-in-runtime-dir", "k-in-tmpdir"]
    finally:
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------ one table of remote exit codes


def test_every_copy_of_a_remote_exit_code_is_the_protocol_table_s() -> None:
    from remote_kernel import launcher

    assert (spawn.EXIT_BAD_REQUEST, spawn.EXIT_NOT_FOUND) == (P.EXIT_BAD_REQUEST, P.EXIT_NOT_FOUND)
    assert bootstrap.CWD_FAILED_EXIT == P.EXIT_CWD_FAILED
    assert launcher.ATTACH_EXIT_GONE == P.EXIT_ATTACH_GONE
    assert set(P.REMOTE_EXITS) == {P.EXIT_BAD_REQUEST, P.EXIT_SHORT_INPUT, P.EXIT_NOT_OUR_DIR,
                                   P.EXIT_ATTACH_GONE, P.EXIT_JOB_FAILED, P.EXIT_CWD_FAILED, P.EXIT_NOT_FOUND}


def test_a_session_whose_program_does_not_arrive_whole_exits_with_the_short_input_code() -> None:
    payload = bootstrap.agent_payload()
    result = subprocess.run(
        [sys.executable, "-S", "-c", bootstrap.BOOTSTRAP, str(len(payload))],
        input=payload[: len(payload) // 2], capture_output=True, timeout=30, check=False,
    )
    assert result.returncode == P.EXIT_SHORT_INPUT


def test_attaching_to_a_directory_that_is_not_ours_exits_with_its_code(tmp_path: Path) -> None:
    payload = bootstrap.agent_payload()
    result = subprocess.run(
        [sys.executable, "-S", "-c", bootstrap.BOOTSTRAP, str(len(payload))],
        input=bootstrap.agent_input({"mode": "attach", "dir": str(tmp_path)}), capture_output=True,
        timeout=30, check=False,
    )
    assert result.returncode == P.EXIT_NOT_OUR_DIR
    assert b"is not one of our kernel directories" in result.stderr


# ------------------------------------------------------------------ the agent's states


def test_the_agent_states_have_one_table_where_every_state_can_end_and_exited_is_final() -> None:
    table = P.AGENT_TRANSITIONS
    assert set(table) == set(P.AgentState)
    assert table[P.AgentState.EXITED] == frozenset()
    assert all(P.AgentState.EXITED in table[state] for state in P.AgentState if state is not P.AgentState.EXITED)
    assert P.AgentState.STARTING not in set().union(*table.values())  # nothing goes back to starting


def _agent_in(state: P.AgentState) -> agent_module.Agent:
    agent = agent_module.Agent({"token": "t"})
    agent.state = state
    return agent


def test_a_stop_after_the_kernel_exited_changes_nothing_and_sends_nothing() -> None:
    agent = _agent_in(P.AgentState.EXITED)
    agent._stop_kernel("too late")
    assert agent.state is P.AgentState.EXITED
    assert len(agent.outbox) == 0
    assert "reason" not in agent.exit_info


def test_a_stop_while_starting_or_ready_moves_to_exiting_once() -> None:
    for state in (P.AgentState.STARTING, P.AgentState.READY):
        agent = _agent_in(state)
        agent._stop_kernel("first")
        agent._stop_kernel("second")
        assert agent.state is P.AgentState.EXITING
        assert agent.exit_info["reason"] == "first"


def test_an_exiting_agent_never_becomes_ready_again() -> None:
    agent = _agent_in(P.AgentState.EXITING)
    assert not agent._enter(P.AgentState.READY)
    assert agent.state is P.AgentState.EXITING


def test_the_agent_state_travels_as_plain_text_in_its_hello() -> None:
    agent = _agent_in(P.AgentState.READY)
    assert json.loads(P.encode_json(agent._hello_fields()))["state"] == "ready"

"""The OpenSSH baseline as a kernelspec launcher: one ``ssh -L`` x5 running a remote ipykernel.

Jupyter writes the connection file (the five local ports and the key) and runs this script as the
kernel. It picks five ports for the remote kernel (TCP on 127.0.0.1 there), sends the remote
connection file on ssh's stdin (the key never appears on a command line) and becomes ``ssh``
(exec): one process, one connection, one login that both forwards the ports and runs the kernel,
which is the leanest way OpenSSH can do it. Signals from Jupyter reach ssh itself, so this
baseline interrupts in message mode only.

    python openssh_kernel.py CONNECTION_FILE SETTINGS_JSON

SETTINGS_JSON: {"host", "port", "user", "key", "known_hosts", "python", "remote_dir", "ssh"}, and
optionally "control_path": the socket of a ControlMaster started beforehand (``ssh -M -S PATH -N``);
this kernel's session and forwards then ride that master's connection (``ControlMaster=no``: never
become a master itself, fail if the master is gone), as a user with a warm ControlMaster has it.
The bench's "remote" host is this machine, so free remote ports are probed locally.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (all bound at once, so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def ssh_argv(settings: dict[str, str], local: dict[str, int], remote: dict[str, int], command: str) -> list[str]:
    forwards: list[str] = []
    for channel in CHANNELS:
        forwards += ["-L", f"127.0.0.1:{local[channel]}:127.0.0.1:{remote[channel]}"]
    if settings.get("control_path"):
        forwards += ["-o", "ControlMaster=no", "-o", f"ControlPath={settings['control_path']}"]
    return [
        settings["ssh"], "-F", "none", "-T",
        "-i", settings["key"], "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={settings['known_hosts']}", "-o", "StrictHostKeyChecking=yes",
        "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
        "-p", str(settings["port"]), *forwards, f"{settings['user']}@{settings['host']}", command,
    ]


def main() -> int:
    connection_file, settings_file = sys.argv[1], sys.argv[2]
    with open(connection_file, encoding="utf-8") as handle:
        info = json.load(handle)
    with open(settings_file, encoding="utf-8") as handle:
        settings = json.load(handle)
    local = {channel: int(info[f"{channel}_port"]) for channel in CHANNELS}
    remote = dict(zip(CHANNELS, free_ports(len(CHANNELS)), strict=True))
    remote_info = {**info, "transport": "tcp", "ip": "127.0.0.1", **{f"{c}_port": p for c, p in remote.items()}}
    payload = json.dumps(remote_info).encode()
    remote_file = shlex.quote(os.path.join(settings["remote_dir"], f"kernel-{os.getpid()}.json"))
    # JPY_PARENT_PID=$PPID (the sshd session): the kernel exits by itself if the session dies.
    command = (f"umask 077 && head -c {len(payload)} > {remote_file} && "
               f"JPY_PARENT_PID=$PPID exec {shlex.quote(settings['python'])} -m ipykernel_launcher -f {remote_file}")
    read_end, write_end = os.pipe()  # the payload fits in the pipe buffer: write it all, then exec
    os.write(write_end, payload)
    os.close(write_end)
    os.dup2(read_end, 0)
    os.close(read_end)
    argv = ssh_argv(settings, local, remote, command)
    os.execv(argv[0], argv)  # noqa: S606 - become ssh: Jupyter's signals and exit status are ssh's
    return 1  # not reached


if __name__ == "__main__":
    raise SystemExit(main())

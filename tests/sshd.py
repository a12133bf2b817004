"""A private, throw-away OpenSSH sshd on 127.0.0.1 for tests and benchmarks.

Everything lives in one directory: generated host and client keys, authorized_keys, a known_hosts
for the client side, sshd_config and the log. sshd runs in the foreground (``-D``) as our child,
so we own its PID and can stop it, or kill one of its per-connection children to simulate a
network drop. Works as root (CI) and as an ordinary user (who can then log in only as themselves).

Pitfalls handled here (see ../shared/tools/sshd_up.sh): sshd must be started by absolute path (it
re-executes itself); as root it needs /run/sshd; the keys sit under /tmp, so StrictModes is off;
a locked account ("!" in /etc/shadow) is refused with ``UsePAM no``, so PAM is turned on only then.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from remote_kernel.entry import HostEntry

SSHD_BIN = Path("/usr/sbin/sshd")
START_TIMEOUT = 10.0
LOCALHOST = "127.0.0.1"


def sshd_available() -> bool:
    return SSHD_BIN.is_file() and os.access(SSHD_BIN, os.X_OK)


def free_port(host: str = LOCALHOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def generate_key(path: Path, key_type: str = "ed25519", passphrase: str = "") -> Path:
    """Create an OpenSSH key pair at ``path`` (+ ``.pub``); RSA is 2048 bits to keep tests fast."""
    args = ["ssh-keygen", "-q", "-t", key_type, "-N", passphrase, "-C", f"rk-test-{path.name}"]
    if key_type == "rsa":
        args += ["-b", "2048"]
    path.unlink(missing_ok=True)
    subprocess.run([*args, "-f", str(path)], check=True, capture_output=True, timeout=30)
    return path


def _proc_ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ")"
    return int(stat.rsplit(")", 1)[1].split()[1])


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid``, read from /proc (no psutil needed)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _proc_ppid(int(entry.name)) == pid:
            found.append(int(entry.name))
    return sorted(found)


def descendants_of(pid: int) -> list[int]:
    found: list[int] = []
    todo = children_of(pid)
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children_of(child))
    return found


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if not process_gone(pid)]
        if alive:
            time.sleep(0.05)
    return alive


def process_gone(pid: int) -> bool:
    """True when ``pid`` has exited (a zombie counts: nobody may reap re-parented processes)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _account_is_locked(user: str) -> bool:
    try:
        for line in Path("/etc/shadow").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name == user:
                return rest.startswith("!")
    except OSError:
        pass
    return False


class SSHServer:
    """One private sshd. ``start()`` it, connect with ``host_entry()``, ``stop()`` it."""

    def __init__(self, directory: Path, *, extra_config: str = "", isolated_home: bool = True) -> None:
        self.dir = Path(directory)
        self.extra_config = extra_config
        self.host = LOCALHOST
        self.port = 0
        self.user = getpass.getuser()
        self.client_key = self.dir / "id_ed25519"
        self.known_hosts = self.dir / "known_hosts"
        self.host_key = self.dir / "ssh_host_ed25519_key"
        self.authorized_keys = self.dir / "authorized_keys"
        self.config_path = self.dir / "sshd_config"
        self.log_path = self.dir / "sshd.log"
        # The login's $HOME: sshd's SetEnv overrides the passwd home, so the "remote" shell, IPython
        # history and friends write here and never into the real home directory.
        self.remote_home: Path | None = self.dir / "home" if isolated_home else None
        self.host_key_pub = ""
        self._proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> SSHServer:
        """Start sshd; after a ``stop()`` it comes back on the same port with the same keys."""
        if not sshd_available():
            raise RuntimeError(f"{SSHD_BIN} not found: apt-get install -y openssh-server")
        self._prepare_files()
        restart = self.port != 0
        for attempt in range(3):  # a free port can be taken between probing and binding
            if not restart:
                self.port = free_port(self.host)
                self.known_hosts.write_text(self.known_hosts_line())
            self._write_config()
            if self._launch():
                return self
            if "Address already in use" not in self.log_tail() or attempt == 2:
                break
            time.sleep(0.2 if restart else 0)
        raise RuntimeError(f"sshd did not come up on {self.host}:{self.port}:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM the listener, then its per-connection children (what they started is left to
        its own devices, like on a real server whose sshd goes away)."""
        if self._proc is None:
            return
        # collect the sessions first: once the listener is gone they are re-parented to init
        sessions = self.session_pids()
        proc, self._proc = self._proc, None
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        for pid in sessions:
            _signal(pid, signal.SIGTERM)
        for pid in _wait_gone(sessions, 3.0):
            _signal(pid, signal.SIGKILL)

    def __enter__(self) -> SSHServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("sshd is not running")
        return self._proc.pid

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def session_pids(self) -> list[int]:
        """The per-connection sshd children; SIGKILL one to simulate a dropped network."""
        return children_of(self.pid) if self.is_running() else []

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- what clients need -----------------------------------------------------------------------

    def host_entry(self, **overrides: Any) -> HostEntry:
        fields: dict[str, Any] = {
            "name": self.host,
            "hostname": self.host,
            "port": self.port,
            "user": self.user,
            "identity_file": str(self.client_key),
            "known_hosts": str(self.known_hosts),
        }
        fields.update(overrides)
        return HostEntry(**fields)

    def ssh_config_block(self, alias: str) -> str:
        """A ``~/.ssh/config`` Host block reaching this server as ``alias``."""
        return (
            f"Host {alias}\n"
            f"    HostName {self.host}\n"
            f"    Port {self.port}\n"
            f"    User {self.user}\n"
            f"    IdentityFile {self.client_key}\n"
            f"    UserKnownHostsFile {self.known_hosts}\n"
            "    IdentitiesOnly yes\n"
            "    StrictHostKeyChecking yes\n"
            "    BatchMode yes\n"
        )

    def known_hosts_line(self, name: str | None = None) -> str:
        return f"{name or f'[{self.host}]:{self.port}'} {self.host_key_pub}\n"

    def add_client_key(self, name: str, key_type: str = "ed25519", passphrase: str = "") -> Path:
        """Generate another client key and authorize it; returns the private key path."""
        key = generate_key(self.dir / name, key_type, passphrase)
        self.authorize(key.with_name(key.name + ".pub"))
        return key

    def authorize(self, public_key: Path) -> None:
        with self.authorized_keys.open("a") as out:
            out.write(public_key.read_text())

    # -- internals -------------------------------------------------------------------------------

    def _prepare_files(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        if not self.host_key.exists():
            generate_key(self.host_key)
        if not self.client_key.exists():
            generate_key(self.client_key)
        self.host_key_pub = " ".join(self.host_key.with_suffix(".pub").read_text().split()[:2])
        if not self.authorized_keys.exists():
            self.authorized_keys.write_text(self.client_key.with_suffix(".pub").read_text())
            self.authorized_keys.chmod(0o600)
        if self.remote_home is not None:
            self.remote_home.mkdir(mode=0o700, exist_ok=True)
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir

    def _write_config(self) -> None:
        lines = [
            "# generated by tests/sshd.py: a private test sshd",
            f"Port {self.port}",
            f"ListenAddress {self.host}",
            f"HostKey {self.host_key}",
            f"PidFile {self.dir / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            f"AllowUsers {self.user}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "HostbasedAuthentication no",
            f"UsePAM {'yes' if os.geteuid() == 0 and _account_is_locked(self.user) else 'no'}",
            "StrictModes no",  # the key files sit under /tmp
            "PermitRootLogin prohibit-password",
            "PermitUserRC no",  # never run the real ~/.ssh/rc
            "PermitUserEnvironment no",
            "AllowTcpForwarding yes",
            "X11Forwarding no",
            "PrintMotd no",
            "PrintLastLog no",
            "UseDNS no",
            "MaxStartups 200:30:400",
            "MaxSessions 200",
            "MaxAuthTries 10",
            "LoginGraceTime 30",
            "Subsystem sftp internal-sftp",
            "LogLevel VERBOSE",
        ]
        if self.remote_home is not None:
            lines.append(f"SetEnv HOME={self.remote_home}")
        # sshd keeps the first value it reads for most keywords, so extra lines go before our
        # defaults; a Match block lasts until the end of the file, so it goes after them.
        extra, match, match_block = self.extra_config.strip().partition("\nMatch ")
        if extra.startswith("Match "):
            extra, match, match_block = "", "Match ", extra[len("Match ") :]
        text = "\n".join([extra, *lines, match.strip() + " " + match_block if match else ""])
        self.config_path.write_text(text.strip() + "\n")

    def _command(self) -> list[str]:
        """How sshd is started (a subclass may wrap it, e.g. in a mount namespace)."""
        return [str(SSHD_BIN), "-D", "-e", "-f", str(self.config_path)]

    def _launch(self) -> bool:
        self.log_path.write_text("")
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a Ctrl-C aimed at pytest must not kill the server first
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            if _port_accepts(self.host, self.port):
                return True
            time.sleep(0.02)
        self.stop()
        return False


def _port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False

"""`remote-kernel doctor`: walk the path a kernel launch takes and say, step by step, what is wrong.

Each step is ok / warn / fail (or skip, when a step it needs failed, or it does not apply) with its
figure (a time, a version, a path, a file:line) and, when not ok, the fix. The steps: the config
file; how ~/.ssh/config resolved the host (file:line of each value, Include files, the jump chain
or ProxyCommand); DNS; TCP; the SSH handshake, host key (the known_hosts line that matched) and
authentication (what the server offers, what worked), traced inside ``ssh.connect``; then, through
the same dispatcher, ``cd`` and setup lines as a kernel (remote/probe.py): the login shell and any
bytes it prints on stdout, the python, ipykernel, pyzmq and IPC support, the private directory's
base, the clock; and for a kernel a full round trip (start, ``1+1``, shutdown) timed phase by phase.

Nothing here prints (commands/doctor_cmd.py does), and every step is bounded in time: a host that
never answers fails its step after the connect timeout and the steps after it are skipped.
"""

from __future__ import annotations

import ipaddress
import shlex
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from remote_kernel import bootstrap
from remote_kernel.entry import DEFAULT_PYTHON, HostEntry, KernelEntry
from remote_kernel.errors import ConfigError, HostKeyError, RemoteKernelError
from remote_kernel.protocol import EXIT_NOT_FOUND

_T = TypeVar("_T")

CONNECT_TIMEOUT = 15.0  # per connection step (as inventory.CONNECT_TIMEOUT); --timeout changes it
IMPORT_TIMEOUT = 30.0  # the probe's `import ipykernel, zmq` (a cold conda env on NFS is slow)
CALL_TIMEOUT = 30.0  # a kernel_info or `1+1` round trip of an already running kernel
SHUTDOWN_TIMEOUT = 15.0  # the agent gives the kernel 3 s between SIGTERM and SIGKILL
CLOCK_WARN = 2.0  # seconds of skew worth a warning (the estimate is good to a few tens of ms)
FREE_FAIL_MIB, FREE_WARN_MIB = 1, 16  # the kernel's files are a few KiB; sockets need an inode
STEPS = ("config", "ssh config", "dns", "tcp", "ssh handshake", "host key", "auth", "login shell", "python",
         "ipykernel", "pyzmq", "private dir", "clock", "port forwarding", "kernel round trip")
HOST_STEPS = STEPS[:-1]
STATUS_RANK = {"skip": 0, "ok": 1, "warn": 2, "fail": 3}


@dataclass
class Step:
    """One step's verdict: ``status`` ok/warn/fail/skip, ``figure`` what was found (one line),
    ``details`` more lines for the full view, ``fix`` what to do when it is not ok."""

    name: str
    status: str
    figure: str
    fix: str = ""
    details: list[str] = field(default_factory=list)
    ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Report:
    """Every step for one kernel or host, in the order a launch takes them."""

    subject: str  # "kernel lab-py311" or "host lab"
    host: str  # the host's label
    kernels: list[str]
    steps: list[Step] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def status(self) -> str:
        return max((s.status for s in self.steps), key=STATUS_RANK.__getitem__, default="ok").replace("skip", "ok")

    @property
    def ok(self) -> bool:
        return self.status != "fail"

    def first_problem(self) -> Step | None:
        worst = [s for s in self.steps if s.status == self.status and s.status in ("fail", "warn")]
        return worst[0] if worst else None

    def to_dict(self) -> dict[str, Any]:
        return {"subject": self.subject, "host": self.host, "kernels": self.kernels, "status": self.status,
                "ok": self.ok, "seconds": round(self.seconds, 3), "steps": [s.to_dict() for s in self.steps]}


class _Walk:
    """The steps taken so far for one host; ``finish`` puts them in launch order and marks each
    step never reached as skipped, naming the failure that stopped the walk."""

    def __init__(self, report: Report, order: tuple[str, ...], on_step: Callable[[Step], None] | None) -> None:
        self.report = report
        self.order = order
        self.on_step = on_step
        self.blocker = ""
        self.began = time.monotonic()

    def record(self, step: Step) -> None:
        self.report.steps.append(step)
        if self.on_step is not None:
            self.on_step(step)

    def add(self, name: str, status: str, figure: str, fix: str = "", *, details: Iterable[str] = (),
            ms: float | None = None) -> bool:
        """Record a step; True unless it failed."""
        self.record(Step(name, status, figure, fix, list(details), None if ms is None else round(ms, 1)))
        if status == "fail" and not self.blocker:
            self.blocker = name
        return status != "fail"

    def skip(self, name: str, reason: str) -> None:
        self.record(Step(name, "skip", f"skipped: {reason}"))

    def finish(self) -> Report:
        taken = list(self.report.steps)
        ordered: list[Step] = []
        for name in self.order:
            mine = [s for s in taken if s.name == name or s.name.startswith(name + " (")]
            if not mine:
                self.skip(name, f"{self.blocker or 'an earlier step'} failed")
                mine = [self.report.steps[-1]]
            ordered += mine
        ordered += [s for s in taken if s not in ordered]
        self.report.steps = ordered
        self.report.seconds = time.monotonic() - self.began
        return self.report


def _ms_since(began: float) -> float:
    return (time.monotonic() - began) * 1000


def _bounded(call: Callable[[], _T], timeout: float, what: str) -> _T:
    """``call()`` on a daemon thread, given up after ``timeout`` (getaddrinfo has no timeout)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, raised there
            box["error"] = exc

    thread = threading.Thread(target=run, name=f"rk-doctor-{what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"{what} took more than {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


# -- config ------------------------------------------------------------------------------------


def config_step(explicit: str | None, *, required: bool) -> tuple[Step, Any]:
    """The config file: found and valid (with its loaded contents), or why not. ``required``:
    False for an ad-hoc target, which needs no file."""
    from remote_kernel.config import discover_config_path, load_config

    try:
        loaded = load_config(discover_config_path(explicit))
    except ConfigError as exc:
        missing = "no config file found" in exc.message
        if missing and not required:
            return Step("config", "skip", "no config file (an ad-hoc target needs none)"), None
        return Step("config", "fail", exc.message.splitlines()[0], exc.hint or "fix the problems listed",
                    details=[str(p) for p in exc.problems]), None
    kernels, hosts = len(loaded.model.kernels), len(loaded.model.hosts)
    return Step("config", "ok", f"{loaded.path}: {kernels} kernel{'s' * (kernels != 1)}, "
                                f"{hosts} host{'s' * (hosts != 1)}, valid"), loaded


# -- resolution and the network ----------------------------------------------------------------


_SHOWN_KEYWORDS = ("hostname", "port", "user", "identityfile", "identitiesonly", "proxyjump", "proxycommand",
                   "userknownhostsfile", "hostkeyalias", "stricthostkeychecking")
# What a [hosts] table or a target sets over ~/.ssh/config (hostname is only the name looked up there).
_EXPLICIT_FIELDS = ("port", "user", "identity_file", "known_hosts", "proxy_jump")


def _resolve_step(walk: _Walk, host: HostEntry) -> Any:
    from remote_kernel import ssh

    try:
        resolved = ssh.resolve_host(host)
        origins = ssh.ssh_config_origins(host)
    except RemoteKernelError as exc:
        walk.add("ssh config", "fail", exc.message.splitlines()[0], exc.hint or "fix ~/.ssh/config",
                 details=exc.message.splitlines()[1:])
        return None
    walk.add("ssh config", "ok", resolved.describe(), details=_resolution_details(host, resolved, origins))
    return resolved


def _resolution_details(host: HostEntry, resolved: Any, origins: Any) -> list[str]:
    from remote_kernel import ssh

    lines = [f"ssh_config: {origins.path}" + ("" if origins.files else " (none: ssh's defaults)")
             + f", looked up as {host.hostname or host.name!r}"]
    lines += [f"  Include: {path}" for path in origins.files[1:]]
    lines += [f"  {keyword} from {origins.values[keyword]}" for keyword in _SHOWN_KEYWORDS
              if keyword in origins.values]
    explicit = [name for name in _EXPLICIT_FIELDS if getattr(host, name)]
    if explicit:
        lines.append(f"set in remote-kernels.toml or the target (these win): {', '.join(explicit)}")
    hops = ssh.hop_chain(resolved)
    if len(hops) > 1:
        lines.append("jump chain: " + " -> ".join(f"{hop.alias} ({hop.user}@{hop.address})" for hop in hops))
    if hops[0].proxy_command:
        lines.append(f"ProxyCommand: {hops[0].proxy_command}")
    lines.append(f"identity files: {', '.join(resolved.identity_files) or 'none (ssh-agent keys only)'}")
    lines.append(f"known_hosts: {', '.join(resolved.known_hosts) or 'none'} (as {resolved.known_hosts_name!r})")
    return lines


def _network_steps(walk: _Walk, first: Any, timeout: float, names: Iterable[str]) -> bool:
    """DNS and TCP to the first hop (the one we reach directly)."""
    if first.proxy_command:
        reason = f"not used: the ProxyCommand makes the connection ({first.proxy_command})"
        walk.add("dns", "skip", reason)
        walk.add("tcp", "skip", reason)
        return True
    address = _dns_step(walk, first, timeout, names)
    return address is not None and _tcp_step(walk, first, address, timeout)


def _dns_step(walk: _Walk, hop: Any, timeout: float, names: Iterable[str]) -> Any:
    try:
        ipaddress.ip_address(hop.hostname.split("%")[0])
    except ValueError:
        pass
    else:
        walk.add("dns", "ok", f"{hop.hostname} is an address: no lookup")
        return hop.hostname
    began = time.monotonic()
    try:
        found = _bounded(lambda: socket.getaddrinfo(hop.hostname, hop.port, type=socket.SOCK_STREAM),
                         timeout, "dns")
    except (OSError, TimeoutError) as exc:
        from remote_kernel.suggest import did_you_mean

        guess = did_you_mean(hop.alias, names)
        walk.add("dns", "fail", f"cannot resolve {hop.hostname!r}: {getattr(exc, 'strerror', None) or exc}",
                 "check the host name (hostname in remote-kernels.toml, HostName in ~/.ssh/config) and your "
                 "DNS or VPN" + (f"; {guess}" if guess else ""), ms=_ms_since(began))
        return None
    addresses = sorted({str(info[4][0]) for info in found})
    walk.add("dns", "ok", f"{hop.hostname} -> {', '.join(addresses)}", ms=_ms_since(began))
    return addresses[0] if len(addresses) == 1 else hop.hostname


def _tcp_step(walk: _Walk, hop: Any, address: str, timeout: float) -> bool:
    began = time.monotonic()
    try:
        socket.create_connection((address, hop.port), timeout=timeout).close()
    except ConnectionRefusedError:
        return walk.add("tcp", "fail", f"connection to {hop.address} refused", f"is sshd running on {hop.address}? "
                        "Check the port (port in remote-kernels.toml, Port in ~/.ssh/config)", ms=_ms_since(began))
    except TimeoutError:
        return walk.add("tcp", "fail", f"no answer from {hop.address} within {timeout:g} s",
                        "check the address and port, VPN and firewall; a ProxyJump may be needed",
                        ms=_ms_since(began))
    except OSError as exc:
        return walk.add("tcp", "fail", f"cannot connect to {hop.address}: {exc.strerror or exc}",
                        "check the network route to it", ms=_ms_since(began))
    took = _ms_since(began)
    return walk.add("tcp", "ok", f"{hop.address} in {took:.1f} ms", ms=took)


# -- SSH ---------------------------------------------------------------------------------------


def _ssh_steps(walk: _Walk, resolved: Any, timeout: float) -> Any:
    """Connect with the steps traced; the handshake, host key and auth steps; the connection."""
    from remote_kernel import ssh

    hops = [hop.label for hop in ssh.hop_chain(resolved)]
    error: RemoteKernelError | None = None
    conn = None
    with ssh.traced() as events:
        try:
            conn = ssh.connect(resolved, timeout=timeout)
        except RemoteKernelError as exc:
            error = exc
    failed_at = _failed_step(events, hops, error) if error is not None else ""
    for name, describe in (("ssh handshake", _handshake_figure), ("host key", _host_key_figure),
                           ("auth", _auth_figure)):
        if name == failed_at and error is not None:
            walk.add(name, "fail", error.message.splitlines()[0], error.hint or "",
                     details=error.message.splitlines()[1:])
            return None
        figure, details = describe(events, hops)
        walk.add(name, "ok", figure, details=details)
    return conn


def _failed_step(events: list[dict[str, Any]], hops: list[str], error: RemoteKernelError) -> str:
    """Which step ``error`` ended: the first one some hop did not complete."""
    if isinstance(error, HostKeyError):
        return "host key"
    done = {(event["event"], event["hop"]) for event in events}
    for hop in hops:
        for event, step in (("handshake", "ssh handshake"), ("host_key", "host key"), ("auth", "auth")):
            if (event, hop) not in done:
                return step
    return "auth"


def _events(events: list[dict[str, Any]], kind: str, hops: list[str]) -> list[dict[str, Any]]:
    return [event for event in events if event["event"] == kind and event["hop"] in hops]


def _per_hop(parts: list[str], hops: list[str], events: list[dict[str, Any]]) -> str:
    """One part for a direct connection; ``hop: part`` each for a chain."""
    if len(hops) == 1:
        return parts[0] if parts else "-"
    return "; ".join(f"{_alias(event['hop'])}: {part}" for event, part in zip(events, parts, strict=False))


def _alias(label: str) -> str:
    """``alice@lab:22 (lab)`` -> ``lab``: a hop as the config names it."""
    return label[label.rindex(" (") + 2:-1] if label.endswith(")") and " (" in label else label


def _handshake_figure(events: list[dict[str, Any]], hops: list[str]) -> tuple[str, list[str]]:
    found = _events(events, "handshake", hops)
    parts = [f"{event['ms']:.0f} ms, {event['cipher']}" for event in found]
    sockets = _events(events, "socket", hops)
    if len(sockets) == 1 and sockets[0]["via"] == "direct":
        sockets = []  # the tcp step said it
    details = [f"{_alias(event['hop'])}: connected "
               f"{'through ' + _alias(event['via']) if event['via'] != 'direct' else 'directly'}"
               f" in {event['ms']:.1f} ms" for event in sockets]
    return _per_hop(parts, hops, found), details


def _host_key_figure(events: list[dict[str, Any]], hops: list[str]) -> tuple[str, list[str]]:
    keys = {event["hop"]: f"{event['key_type']} {event['fingerprint']}" for event in _events(events, "handshake", hops)}
    found = _events(events, "host_key", hops)
    parts = [f"{keys.get(event['hop'], 'key')} matches {event['match']}" if "match" in event
             else f"{keys.get(event['hop'], 'key')} recorded in {event['recorded']} (accept-new)" for event in found]
    return _per_hop(parts, hops, found), []


def _auth_figure(events: list[dict[str, Any]], hops: list[str]) -> tuple[str, list[str]]:
    offered = {event["hop"]: event["methods"] for event in _events(events, "auth_offered", hops)}
    found = _events(events, "auth", hops)
    parts = []
    for event in found:
        used = event["method"] + (f" with {event['key']}" if event.get("key") else "")
        methods = offered.get(event["hop"])
        parts.append(used + (f" (server offers: {', '.join(methods)})" if methods else ""))
    return _per_hop(parts, hops, found), []


# -- the remote side ---------------------------------------------------------------------------


@dataclass
class _Probe:
    """What remote/probe.py said, and what came before it."""

    noise: bytes  # stdout bytes before the probe's marker: rc files or setup lines printed them
    found: dict[str, Any] | None
    stderr: str
    exit_status: int | None
    answered_at: float  # local time.time() when the answer was in


def _probe_source() -> str:
    return (Path(__file__).parent / "remote" / "probe.py").read_text(encoding="utf-8")


def _run_probe(conn: Any, entry: KernelEntry) -> _Probe:
    from remote_kernel.remote import probe

    spawn_source = (Path(__file__).parent / "remote" / "spawn.py").read_text(encoding="utf-8")
    request = {"env": dict(entry.env), "import_timeout": IMPORT_TIMEOUT, "spawn_source": spawn_source,
               "runtime_dir": entry.runtime_dir}
    result = bootstrap.run_program(conn, entry, _probe_source(), request=request,
                                   timeout=entry.startup_timeout + IMPORT_TIMEOUT + 5)
    answered = time.time()
    marker = (probe.MARKER + "\n").encode()
    noise, seen, rest = result.stdout.partition(marker)
    found = None
    if seen:
        try:
            found = _last_json_line(rest)
        except ValueError:
            found = None
    return _Probe(noise if seen else result.stdout, found, result.stderr.decode("utf-8", "replace"),
                  result.exit_status, answered)


def _last_json_line(text: bytes) -> dict[str, Any]:
    """The probe's last stdout line as a JSON object (ValueError when it is not one)."""
    import json

    lines = text.decode("utf-8", "replace").strip().splitlines()
    value = json.loads(lines[-1]) if lines else None
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")  # noqa: TRY004 - "not the answer", as json's own ValueError
    return value


def _login_noise(conn: Any, timeout: float) -> bytes:
    """What the login shell alone prints on stdout for a command (``true``), bounded."""
    channel = conn.open_exec("true")
    out = bytearray()
    try:
        channel.shutdown_write()
        channel.set_blocking(False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = channel.recv(65536)
            except BlockingIOError:
                time.sleep(0.02)
                continue
            if not chunk:
                break
            out += chunk
    finally:
        channel.close()
    return bytes(out)


def _remote_steps(walk: _Walk, conn: Any, entries: list[KernelEntry], *, strict_kernel: bool,
                  timeout: float) -> bool:
    """The probe for each entry: login shell, private dir and clock once, python and its
    packages per entry. True when every entry's python can run a kernel."""
    all_good = True
    for index, entry in enumerate(entries):
        suffix = f" ({entry.name})" if len(entries) > 1 else ""
        answer = _run_probe(conn, entry)
        if index == 0:
            _login_shell_step(walk, conn, entry, answer, timeout)
        all_good &= _python_steps(walk, entry, answer, suffix, strict_kernel=strict_kernel)
        if index == 0 and answer.found is not None:
            uid = (answer.found.get("login") or {}).get("uid")
            _private_dir_step(walk, entry, answer.found.get("private") or {}, uid)
            _clock_step(walk, answer)
        elif index == 0:
            walk.skip("private dir", "python failed")
            walk.skip("clock", "python failed")
    return all_good


def _login_shell_step(walk: _Walk, conn: Any, entry: KernelEntry, answer: _Probe, timeout: float) -> None:
    login = (answer.found or {}).get("login") or {}
    shell = login.get("login_shell") or "the login shell (not named: python did not start)"
    if not answer.noise:
        walk.add("login shell", "ok", f"{shell}; prints nothing on stdout before the program")
        return
    shown = answer.noise[:80].decode("utf-8", "replace")
    from_rc = _login_noise(conn, timeout) if entry.setup else answer.noise
    if from_rc:
        walk.add("login shell", "fail", f"{shell} prints {len(answer.noise)} bytes on stdout before our program "
                 f"starts: {shown!r}", "those bytes land among the kernel's frames and break the launch (and scp, "
                 "rsync, sftp): make the shell's startup files quiet when not interactive, e.g. put "
                 "`[ -z \"$PS1\" ] && return` (bash: `[[ $- == *i* ]] || return`) at the top of ~/.bashrc, or send "
                 "the output to stderr (`echo ... >&2`)")
    else:
        walk.add("login shell", "fail", f"{shell}; the setup lines print {len(answer.noise)} bytes on stdout: "
                 f"{shown!r}", f"send their output to stderr or /dev/null in [kernels.{entry.name}] setup "
                 "(e.g. `module load x >&2`): stdout carries the kernel's frames")


def _python_steps(walk: _Walk, entry: KernelEntry, answer: _Probe, suffix: str, *, strict_kernel: bool) -> bool:
    if answer.found is None:
        figure, fix = _probe_failure(entry, answer)
        if not strict_kernel:
            fix += f" (only needed if a kernel uses {entry.python!r})"
        walk.add("python" + suffix, "fail" if strict_kernel else "warn", figure, fix,
                 details=answer.stderr.strip().splitlines()[-10:])
        for name in ("ipykernel", "pyzmq"):
            walk.skip(name + suffix, "python failed")
        return False
    python = answer.found.get("python") or {}
    version, executable = str(python.get("version", "?")), str(python.get("executable", entry.python))
    setup = f", after {len(entry.setup)} setup line{'s' * (len(entry.setup) != 1)}" if entry.setup else ""
    old = tuple(int(part) for part in version.split(".")[:2] if part.isdigit()) < (3, 8)
    walk.add("python" + suffix, "fail" if old else "ok", f"{version} at {executable} ({entry.python!r}{setup})",
             f"remote-kernel needs Python 3.8 or newer there: set python in [kernels.{entry.name}]" if old else "")
    kernel = answer.found.get("kernel") or {}
    ipykernel_ok = _ipykernel_step(walk, entry, kernel, executable, suffix, strict=strict_kernel)
    return _pyzmq_step(walk, kernel, executable, suffix, strict=strict_kernel) and ipykernel_ok


def _probe_failure(entry: KernelEntry, answer: _Probe) -> tuple[str, str]:
    where = f"[kernels.{entry.name}]" if entry.name != "doctor" else "the kernel's entry"
    if answer.exit_status is None:
        return (f"the remote side did not answer within {entry.startup_timeout + IMPORT_TIMEOUT:g} s",
                "a setup line or the shell's startup files hang (a prompt, an unreachable NFS home); "
                f"try `ssh HOST true` and the setup lines of {where} by hand")
    if answer.exit_status == EXIT_NOT_FOUND:
        return (f"the remote shell could not run {entry.python!r} (exit status 127)",
                f"set python in {where} to the interpreter's full path (`command -v python3` on the host), or add "
                "the setup line that puts it on the PATH (module load, conda activate)")
    if answer.exit_status == bootstrap.CWD_FAILED_EXIT:
        return (f"the working directory {entry.cwd!r} does not exist on the remote host",
                f"create it, or fix cwd in {where}")
    tail = answer.stderr.strip().splitlines()[-1:] or ["no output"]
    return (f"the remote program ended with exit status {answer.exit_status}: {tail[0]}",
            f"check python and setup in {where}: run them by hand on the host")


def _install_hint(executable: str, package: str) -> str:
    return f"{shlex.quote(executable)} -m pip install {package}"


def _ipykernel_step(walk: _Walk, entry: KernelEntry, kernel: dict[str, Any], executable: str, suffix: str, *,
                    strict: bool) -> bool:
    if kernel.get("ipykernel"):
        return walk.add("ipykernel" + suffix, "ok", str(kernel["ipykernel"]))
    error = str(kernel.get("ipykernel_error") or kernel.get("error") or "not importable")
    needed = strict and not (entry.command and not any("ipykernel" in word for word in entry.command))
    fix = f"install it there: {_install_hint(executable, 'ipykernel')}"
    if not strict:
        fix += f" (only needed if a kernel uses {entry.python!r})"
    return walk.add("ipykernel" + suffix, "fail" if needed else "warn", f"{executable}: {error}", fix)


def _pyzmq_step(walk: _Walk, kernel: dict[str, Any], executable: str, suffix: str, *, strict: bool) -> bool:
    status = "fail" if strict else "warn"
    if not kernel.get("pyzmq"):
        error = str(kernel.get("pyzmq_error") or kernel.get("error") or "not importable")
        return walk.add("pyzmq" + suffix, status, f"{executable}: {error}",
                        f"install it there: {_install_hint(executable, 'pyzmq')} (ipykernel brings it)")
    figure = f"pyzmq {kernel['pyzmq']}, libzmq {kernel.get('libzmq', '?')}"
    if not kernel.get("ipc"):
        return walk.add("pyzmq" + suffix, status, figure + ", IPC sockets: no",
                        "the kernel's sockets are IPC (Unix) sockets: install a pyzmq built with IPC support "
                        f"({_install_hint(executable, '--force-reinstall pyzmq')})")
    return walk.add("pyzmq" + suffix, "ok", figure + ", IPC sockets: yes")


def _private_dir_step(walk: _Walk, entry: KernelEntry, found: dict[str, Any], uid: Any) -> None:
    fix_place = (f"set runtime_dir in [kernels.{entry.name}] to a private directory with room "
                 "(e.g. \"$XDG_RUNTIME_DIR\")")
    if "error" in found:
        walk.add("private dir", "fail", str(found["error"]), fix_place)
        return
    root, base = str(found.get("root")), str(found.get("base"))
    if "root_error" in found:
        walk.add("private dir", "fail", f"{found['root_error']}", fix_place)
        return
    free = int(found.get("root_free_mib", 0))
    figure = (f"{base} in {root} ({'runtime_dir' if entry.runtime_dir else 'the temporary directory'}: owner "
              f"{found.get('root_owner')}, mode {int(found.get('root_mode', 0)):o}, {free} MiB free"
              + (", noexec: fine, nothing is run from there" if found.get("root_noexec") else "") + ")")
    if "base_uid" in found and (found["base_uid"] != uid or int(found.get("base_mode", 0)) & 0o077
                                or not found.get("base_is_dir")):
        walk.add("private dir", "fail", f"{base} is not a private directory of yours (owner {found.get('base_owner')},"
                 f" mode {int(found.get('base_mode', 0)):o}): the agent refuses to use it",
                 f"remove it, or make it yours with mode 0700 (chmod 700 {shlex.quote(base)})")
        return
    problem = _room_problem(found, free)
    if problem:
        walk.add("private dir", problem[0], f"{figure}: {problem[1]}", fix_place)
        return
    walk.add("private dir", "ok", figure)


def _room_problem(found: dict[str, Any], free: int) -> tuple[str, str] | None:
    if not found.get("root_writable") or found.get("root_read_only"):
        return "fail", "not writable"
    if free < FREE_FAIL_MIB:
        return "fail", "no free space"
    if free < FREE_WARN_MIB:
        return "warn", "little free space"
    return None


def _clock_step(walk: _Walk, answer: _Probe) -> None:
    remote = (answer.found or {}).get("time")
    if not isinstance(remote, int | float):
        walk.skip("clock", "the probe did not report the remote time")
        return
    skew = float(remote) - answer.answered_at
    figure = f"remote clock {skew:+.2f} s from this machine's"
    if abs(skew) < CLOCK_WARN:
        walk.add("clock", "ok", figure)
    else:
        walk.add("clock", "warn", figure, "synchronise the clocks (chrony, ntpd or systemd-timesyncd on both "
                 "machines): `ps` ages, file times (make, rsync) and Kerberos tickets depend on them")


def _forwarding_step(walk: _Walk, resolved: Any) -> None:
    from remote_kernel import ssh

    jumps = [hop.alias for hop in ssh.hop_chain(resolved)[:-1]]
    figure = ("sshd's AllowTcpForwarding is irrelevant: the kernel's traffic travels in the session's own "
              "stdin/stdout, no port is forwarded")
    if jumps:
        figure += f"; the jump host{'s' * (len(jumps) > 1)} ({', '.join(jumps)}) must allow it for ProxyJump, and did"
    walk.add("port forwarding", "ok", figure)


# -- the round trip ----------------------------------------------------------------------------


def _round_trip_step(walk: _Walk, entry: KernelEntry) -> None:
    """Start the kernel as Jupyter would (the same launcher, in-process), ask kernel_info, run
    ``1+1``, shut it down; every phase timed and bounded; nothing is left running."""
    import tempfile

    from remote_kernel.launcher import RemoteKernel

    phases: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="rk-doctor-") as scratch:
        kernel = RemoteKernel(entry, None, runtime_dir=Path(scratch))
        began = time.monotonic()
        try:
            kernel.start()
            kernel.wait_ready()
            phases["start"] = _ms_since(began)
            _talk_to_kernel(kernel, phases)
        except RemoteKernelError as exc:
            walk.add("kernel round trip", "fail", exc.message.splitlines()[0], exc.hint or "",
                     details=[*exc.message.splitlines()[1:], *_phase_lines(phases)])
            return
        finally:
            kernel.close()
    total = sum(phases.values())
    walk.add("kernel round trip", "ok", ", ".join(f"{name} {_short(ms)}" for name, ms in phases.items()), ms=total)


def _short(ms: float) -> str:
    return f"{ms / 1000:.2f} s" if ms >= 1000 else f"{ms:.0f} ms"


def _phase_lines(phases: dict[str, float]) -> list[str]:
    return [f"{name}: {ms:.1f} ms" for name, ms in phases.items()]


def _talk_to_kernel(kernel: Any, phases: dict[str, float]) -> None:
    from jupyter_client.blocking.client import BlockingKernelClient

    client = BlockingKernelClient(connection_file=str(kernel.connection_file))
    client.load_connection_file()
    client.start_channels(hb=False)  # no manager: a heartbeat missed while starting would be "dead"
    try:
        began = time.monotonic()
        _reply(client, client.kernel_info(), "kernel_info")
        phases["kernel_info"] = _ms_since(began)
        began = time.monotonic()
        _check_two(client, client.execute("1+1", store_history=False))
        phases["1+1"] = _ms_since(began)
        began = time.monotonic()
        client.shutdown()
        code = kernel.wait(SHUTDOWN_TIMEOUT)
        phases["shutdown"] = _ms_since(began)
    finally:
        client.stop_channels()
    if code != 0:
        raise RemoteKernelError(f"the kernel did not shut down cleanly within {SHUTDOWN_TIMEOUT:g} s "
                                f"(launcher exit code {code})", hint="run `remote-kernel -v start NAME` to see why")


def _reply(client: Any, msg_id: str, what: str) -> dict[str, Any]:
    import queue

    deadline = time.monotonic() + CALL_TIMEOUT
    while (left := deadline - time.monotonic()) > 0:
        try:
            msg: dict[str, Any] = client.get_shell_msg(timeout=left)
        except queue.Empty:
            break
        if msg["parent_header"].get("msg_id") == msg_id:
            return msg
    raise RemoteKernelError(f"no {what} reply within {CALL_TIMEOUT:g} s from the running kernel",
                            hint="the kernel is busy or its channels are stuck; run with -vv")


def _check_two(client: Any, msg_id: str) -> None:
    reply = _reply(client, msg_id, "execute")
    content = reply.get("content") or {}
    if content.get("status") != "ok":
        raise RemoteKernelError(f"`1+1` failed in the kernel: {content.get('ename')}: {content.get('evalue')}")


# -- whole hosts -------------------------------------------------------------------------------


def default_entry(host: HostEntry) -> KernelEntry:
    """What host-level checks run the probe with: python3 on the login PATH, no setup."""
    return KernelEntry(name="doctor", host=host, display_name="doctor", python=DEFAULT_PYTHON)


def check(host: HostEntry, entries: list[KernelEntry], config: Step, *, timeout: float = CONNECT_TIMEOUT,
          round_trip: bool = False, names: Iterable[str] = (), on_step: Callable[[Step], None] | None = None,
          ) -> Report:
    """Every step for ``host``: ``entries`` are the kernels whose python to check (none: python3,
    as warnings); ``round_trip`` also starts the first of them. ``names`` feed "did you mean";
    ``on_step`` is called with each step as it is taken (the last ones may come from ``finish``)."""
    kernels = [entry.name for entry in entries]
    subject = f"kernel {kernels[0]}" if round_trip else f"host {host.name}"
    walk = _Walk(Report(subject, host.label, kernels), STEPS if round_trip else HOST_STEPS, on_step)
    walk.record(config)
    try:
        _walk_host(walk, host, entries, timeout=timeout, round_trip=round_trip, names=list(names))
    except Exception as exc:  # a bug: said in one step, never as a traceback
        import logging

        logging.getLogger(__name__).debug("doctor: unexpected error", exc_info=True)
        walk.add("doctor", "fail", f"unexpected {type(exc).__name__}: {exc}", "a bug in remote-kernel; -vv shows where")
    return walk.finish()


def _walk_host(walk: _Walk, host: HostEntry, entries: list[KernelEntry], *, timeout: float, round_trip: bool,
               names: list[str]) -> None:
    from remote_kernel import ssh

    resolved = _resolve_step(walk, host)
    if resolved is None or not _network_steps(walk, ssh.hop_chain(resolved)[0], timeout, names):
        return
    conn = _ssh_steps(walk, resolved, timeout)
    if conn is None:
        return
    with conn:
        kernels_ok = _remote_steps(walk, conn, entries or [default_entry(host)], strict_kernel=bool(entries),
                                   timeout=timeout)
    _forwarding_step(walk, resolved)
    if round_trip and kernels_ok and not walk.blocker:
        _round_trip_step(walk, entries[0])
    elif round_trip:
        walk.skip("kernel round trip", f"{walk.blocker or 'an earlier step'} failed")


def prepare(hosts: list[HostEntry]) -> None:
    """Before checking hosts on threads: resolve them here, which imports paramiko (two threads
    importing it at once see a half-initialised module; a failure is the host's ssh config step
    later), and keep paramiko's transport threads' tracebacks quiet."""
    import contextlib

    from remote_kernel import inventory, ssh

    inventory.silence_paramiko()
    for host in hosts:
        with contextlib.suppress(RemoteKernelError):
            ssh.resolve_host(host)


def check_all(plans: list[tuple[HostEntry, list[KernelEntry]]], config: Step, *,
              timeout: float = CONNECT_TIMEOUT) -> list[Report]:
    """Every host at once, each on a thread; a host whose checks outlive their bound is a failure."""
    prepare([host for host, _ in plans])
    reports: list[Report | None] = [None] * len(plans)

    def run(index: int, host: HostEntry, entries: list[KernelEntry]) -> None:
        reports[index] = check(host, entries, config, timeout=timeout)

    threads = [threading.Thread(target=run, args=(i, host, entries), daemon=True, name=f"rk-doctor-{host.name}")
               for i, (host, entries) in enumerate(plans)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + max((_bound(host, entries, timeout) for host, entries in plans), default=0)
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [report or _unanswered(host, entries, config) for report, (host, entries)
            in zip(reports, plans, strict=True)]


def _bound(host: HostEntry, entries: list[KernelEntry], timeout: float) -> float:
    """How long one host's checks may take: each hop's steps, then each probe."""
    hops = 1 + len(host.proxy_jump)
    probes = sum(entry.startup_timeout + IMPORT_TIMEOUT + 5 for entry in entries or [default_entry(host)])
    return timeout * (2 + 3 * hops) + probes + timeout


def _unanswered(host: HostEntry, entries: list[KernelEntry], config: Step) -> Report:
    report = Report(f"host {host.name}", host.label, [entry.name for entry in entries], [config])
    report.steps.append(Step("doctor", "fail", "the checks did not finish in time",
                             "run `remote-kernel doctor HOST` for this host alone to see which step hangs"))
    return report

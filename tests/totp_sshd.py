"""An sshd that requires a key AND a TOTP one-time code (``publickey,keyboard-interactive``), with
Debian's real pam_oath as the only PAM auth module.

The machine's /etc/pam.d is never touched: sshd runs in a mount namespace of its own
(``unshare -m --propagation private``) in which our PAM file is bind-mounted over
/etc/pam.d/sshd; the namespace dies with the sshd (see ../shared/tools/totp_sshd_up.sh). Root
only. Pitfall: pam_oath refuses a code of a 30 s step at or before the last one it accepted, so a
second login in the same step must use the next step's code (``totp(secret, step=+1)``; the
window accepts it).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct
import time
from pathlib import Path

from sshd import SSHD_BIN, SSHServer

PAM_OATH_PATHS = ("/lib/x86_64-linux-gnu/security/pam_oath.so", "/lib/aarch64-linux-gnu/security/pam_oath.so",
                  "/usr/lib/x86_64-linux-gnu/security/pam_oath.so", "/lib/security/pam_oath.so")
STEP = 30
TWO_FACTOR = """\
AuthenticationMethods publickey,keyboard-interactive
KbdInteractiveAuthentication yes
UsePAM yes
PermitRootLogin yes
"""


def missing_requirement() -> str | None:
    """Why this machine cannot run the TOTP sshd, or None."""
    if os.geteuid() != 0:
        return "the TOTP sshd needs root (unshare -m, mount --bind)"
    if not any(Path(p).is_file() for p in PAM_OATH_PATHS):
        return "pam_oath.so not found: apt-get install -y libpam-oath"
    if not Path("/etc/pam.d/sshd").is_file():
        return "/etc/pam.d/sshd is missing (the bind-mount target)"
    return None


def totp(secret: bytes, *, at: float | None = None, step: int = 0) -> str:
    """RFC 6238 TOTP (HMAC-SHA1, 30 s steps, 6 digits) for the step of ``at`` (now) plus ``step``."""
    counter = int((time.time() if at is None else at) // STEP) + step
    digest = hmac.new(secret, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    code = (struct.unpack(">I", digest[offset:offset + 4])[0] & 0x7FFFFFFF) % 1_000_000
    return f"{code:06d}"


class TOTPServer(SSHServer):
    """A private sshd (tests/sshd.py) that also asks pam_oath for a one-time code."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, extra_config=TWO_FACTOR)
        self.secret = secrets.token_bytes(20)
        self.users_file = self.dir / "users.oath"
        self.pam_file = self.dir / "pam-sshd"

    def _write_pam(self) -> None:
        module = next(p for p in PAM_OATH_PATHS if Path(p).is_file())
        old = os.umask(0o077)
        try:
            self.users_file.write_text(f"HOTP/T30/6 {self.user} - {self.secret.hex()}\n")
        finally:
            os.umask(old)
        self.pam_file.write_text(
            f"auth     required  {module} usersfile={self.users_file} window=10 digits=6\n"
            "account  required  pam_permit.so\n"
            "session  required  pam_permit.so\n"
            "password required  pam_deny.so\n")

    def code(self, step: int = 0) -> str:
        return totp(self.secret, step=step)

    def _command(self) -> list[str]:
        """sshd in a mount namespace of its own where our PAM file is /etc/pam.d/sshd."""
        self._write_pam()
        script = 'mount --bind "$1" /etc/pam.d/sshd && exec "$2" -D -e -f "$3"'
        return ["unshare", "-m", "--propagation", "private", "--", "/bin/sh", "-c", script, "sh",
                str(self.pam_file), str(SSHD_BIN), str(self.config_path)]

    def keyboard_interactive_attempts(self) -> int:
        """Connections on which sshd asked a keyboard-interactive question (answered or not)."""
        text = self.log_path.read_text(errors="replace")
        return len({line.split(" port ")[1].split()[0] for line in text.splitlines()
                    if line.startswith("Postponed keyboard-interactive for ")})

"""The SSH layer, moved from remote_kernel/ssh.py to ssh/connection.py so its history follows;
the next commit splits it into modules by concern. Until then the module itself stands here."""

import sys

from remote_kernel.ssh import connection
from remote_kernel.ssh.connection import *  # noqa: F403 - what mypy sees; at run time the module itself

sys.modules[__name__] = connection

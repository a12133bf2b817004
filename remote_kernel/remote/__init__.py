"""Code that runs on the remote host: standard-library Python 3.8+, sent over the SSH channel.

Nothing here is installed remotely. The launcher sends ``protocol.py`` and ``agent.py`` as source
text on the session's stdin (see ``remote_kernel.remote.payload``), and the remote Python runs them.
"""

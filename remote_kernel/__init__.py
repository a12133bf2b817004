"""remote-kernel: run Jupyter kernels on remote machines over SSH."""

__version__ = "2.0.0.dev0"

"""One module per subcommand: ``register(subparsers, common)`` and ``run(args) -> int``.

Modules import only argparse at top level; heavy imports happen inside ``run``.
"""

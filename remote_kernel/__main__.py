import sys

if sys.argv[1:2] == ["from-spec"]:  # every kernel start under Jupyter: ask the service first
    from remote_kernel.service import early

    early.begin(sys.argv[2:])

from remote_kernel.cli import main  # after the head start, on purpose

raise SystemExit(main())

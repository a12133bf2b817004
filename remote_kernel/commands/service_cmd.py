"""remote-kernel service start|status|stop (and `run`, the daemon itself)."""

from __future__ import annotations

import argparse
from typing import Any

STOP_WAIT = 20.0  # seconds `service stop` waits for the service to exit (it shuts its kernels down first)


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "service", parents=[common], help="the per-user service holding SSH connections: start, status, stop",
        description="The per-user service owns the authenticated SSH connections (one per host, shared by "
                    "its kernels) and serves the kernels launched through it. Launches start it on demand; "
                    "it exits after $REMOTE_KERNEL_SERVICE_IDLE seconds (default 600) with no kernel and no "
                    "connection. REMOTE_KERNEL_SERVICE=off makes launches serve in-process.",
    )
    parser.add_argument("action", choices=("start", "status", "stop", "run"),
                        help="start it now; show its connections and kernels; stop it (its kernels shut "
                             "down); run: be the service in the foreground (what `start` runs)")


def run(args: argparse.Namespace) -> int:
    from remote_kernel.errors import EXIT_FAILED, EXIT_OK

    if args.action == "run":
        from remote_kernel.service import server

        return server.main()
    from remote_kernel import console
    from remote_kernel.service import client
    from remote_kernel.service import paths as service_paths

    try:
        answer = client.request("status", start=args.action == "start") if args.action != "stop" \
            else client.request("stop")
    except client.ServiceUnavailable as exc:
        if args.json:
            console.emit_json("service", {"ok": args.action == "stop", "running": False, "reason": exc.message})
        else:
            console.emit_line(f"the service is not running ({exc.message})")
        return EXIT_OK if args.action == "stop" else EXIT_FAILED
    stopped = args.action == "stop" and client.wait_until_gone(service_paths.runtime_dir(), STOP_WAIT)
    if args.json:
        console.emit_json("service", {"ok": args.action != "stop" or stopped, "running": args.action != "stop"
                                      or not stopped, **_public(answer)})
    elif args.action == "stop":
        detached = int(answer.get("detached") or 0)
        kept = f"; {detached} detached kernel(s) keep running on their hosts (`remote-kernel attach ID`)" \
            if detached else ""
        console.emit_line(f"{'stopped' if stopped else 'stopping'} the service (pid {answer.get('pid')}; "
                          f"{answer.get('kernels', 0)} kernel(s) shut down{kept})")
    if args.action == "stop" and not stopped:
        console.emit_error(f"the service (pid {answer.get('pid')}) has not exited after {STOP_WAIT:g} s")
        return EXIT_FAILED
    if args.action != "stop" and not args.json:  # --json: the document above is all of stdout
        show_status(answer)
    return EXIT_OK


def _public(answer: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in answer.items() if key != "event"}


def show_status(answer: dict[str, Any]) -> None:
    from remote_kernel import console

    console.emit_line(f"service pid {answer.get('pid')} (version {answer.get('version')}), "
                      f"up {_age(answer.get('since'))}, socket {answer.get('socket')}")
    console.emit_table("service connections", ["host", "since", "kernels", "auth"], connection_rows(answer))
    kernels = answer.get("kernels") or []
    columns = ["id", "entry", "host", "since", "launcher pid", "forwards", "connection file"]
    console.emit_table("hosted kernels", columns,
                       [[str(k.get("id")), str(k.get("name")), str(k.get("host")), _age(k.get("since")),
                         str(k.get("launcher_pid") or "-"), _forwards(k.get("forwards")),
                         str(k.get("connection_file") or "-")] for k in kernels])
    spares = answer.get("spares") or []
    if spares:  # kernels started ahead for the next start of their entry (spare_kernel)
        console.emit_table("spare kernels (started ahead; spare_kernel = false turns them off)",
                           ["entry", "host", "waiting"],
                           [[str(s.get("name")), str(s.get("host")), _age(s.get("since"))] for s in spares])


def _forwards(forwards: Any) -> str:
    """``8787->8787, 6006->16006`` (remote port -> local port), or ``-``."""
    if not isinstance(forwards, list) or not forwards:
        return "-"
    return ", ".join(f"{f.get('remote')}->{f.get('local')}" for f in forwards if isinstance(f, dict))


def connection_rows(answer: dict[str, Any]) -> list[list[str]]:
    return [[str(c.get("label")), _age(c.get("since")), str(c.get("kernels")),
             str(c.get("auth")) + (" (login)" if c.get("login") else "")] for c in answer.get("connections") or []]


def _age(since: Any) -> str:
    import time

    if not isinstance(since, (int, float)):
        return "-"
    seconds = max(0.0, time.time() - since)
    if seconds < 120:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f}m" if seconds < 7200 else f"{seconds / 3600:.1f}h"

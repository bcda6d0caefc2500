"""Reference reward service: serves registered reward functions over the remote reward protocol.

    python scripts/reward_server.py --reward-functions task_score --port 8000
    # reward server listening on http://127.0.0.1:8000/rewards
    python alignment/ppo/run_ppo.py ppo.json --rl_algorithm grpo --reward_server http://127.0.0.1:8000/rewards

``--reward-functions`` and ``--custom-reward-modules`` mean what the trainer's ``reward_functions`` /
``custom_reward_modules`` mean (``"task_score:1.0,length:-0.01"``; user modules register more). The
protocol (POST ``{"version": 1, "items": [...]}`` -> ``{"rewards": [...]}``) and ``GET /health`` are
described in docs/rewards.md; the server side is :func:`alignment.rewards.remote.make_reward_server`.
Binds to 127.0.0.1 unless told otherwise (there is no authentication); ``--port 0`` picks a free
port. The first line on stdout is ``reward server listening on <URL>``. Stops cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

logger = logging.getLogger("alignment.reward_server")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--reward-functions", required=True, help="'name[:weight],...' of registered reward functions")
    parser.add_argument("--custom-reward-modules", default=None, help="modules / .py files registering more reward functions")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one (default 8000)")
    parser.add_argument("--path", default="/rewards", help="endpoint path of the rewards (default /rewards)")
    parser.add_argument("--quiet", action="store_true", help="do not log every request")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in [0, 65535], got {args.port}")
    if not args.path.startswith("/"):
        parser.error(f"--path must start with '/', got {args.path!r}")
    return args


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="[%(asctime)s] [%(levelname)s] %(name)s - %(message)s", level=logging.INFO)
    from alignment.rewards import build_reward_source
    from alignment.rewards.remote import PROTOCOL_VERSION, make_reward_server

    try:  # unknown names, bad weights and unimportable modules fail here, before binding
        source = build_reward_source(reward_functions=args.reward_functions, custom_reward_modules=args.custom_reward_modules)
    except (KeyError, ValueError, ImportError, OSError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"reward_server: {message}", file=sys.stderr)
        return 2
    if not _is_loopback(args.host):
        logger.warning("serving on %s: anyone who can reach this port can use it (no authentication)", args.host)
    server = make_reward_server(
        source, host=args.host, port=args.port, path=args.path,
        info={"reward_functions": args.reward_functions}, log_requests=not args.quiet,
    )  # fmt: skip

    def stop(signum, frame):  # noqa: ARG001 - signal handler signature
        threading.Thread(target=server.shutdown, daemon=True).start()  # shutdown() waits for serve_forever

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"reward server listening on {server.url}", flush=True)
    logger.info("protocol version %d, reward functions %r; GET /health", PROTOCOL_VERSION, args.reward_functions)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    print("reward server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

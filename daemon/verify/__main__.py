"""``python -m daemon.verify [--runs N]``: can this host run the code verifier, and how fast?

Prints the isolation the probe found (or why code is refused, exit status
1), then, with ``--runs``, the latency of N sandbox runs of a small correct
solution through the ``code`` verifier, sequentially.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from daemon.verify.errors import SandboxUnavailable
from daemon.verify.registry import CodeVerifier
from daemon.verify.sandbox import isolation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon.verify")
    parser.add_argument("--runs", type=int, default=0, help="time this many verifier calls")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    try:
        iso = isolation()
    except SandboxUnavailable as e:
        print(f"refused: {e.reason}")
        return 1
    print(f"isolation: {iso.describe()}")
    print(f"interpreter in the sandbox: {iso.python}")
    print(f"probe: {time.monotonic() - t0:.2f} s (once per process)")
    if args.runs:
        v = CodeVerifier({"tests": ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]})
        times = []
        for _ in range(args.runs):
            t = time.monotonic()
            assert v("def add(a, b):\n    return a + b\n", "") == 1.0
            times.append(time.monotonic() - t)
        q = statistics.quantiles(times, n=20) if len(times) > 1 else times * 19
        print(
            f"{args.runs} verifier calls: median {statistics.median(times) * 1000:.0f} ms, "
            f"p95 {q[18] * 1000:.0f} ms, max {max(times) * 1000:.0f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

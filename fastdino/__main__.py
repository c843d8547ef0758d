"""`python -m fastdino`: the `fastdino` command."""
import sys

try:
    from fastdino.cli import main
except KeyboardInterrupt:  # Ctrl-C before main() is there to catch it: the line and status main() gives
    print("fastdino: stopped: interrupted", file=sys.stderr)
    raise SystemExit(130)

raise SystemExit(main())

# SPDX-License-Identifier: (GPL-2.0 OR MIT)
"""Load and attach out/empty.bpf.o (the cost floor) until SIGINT/SIGTERM.

Uses the project's own libbpf wrapper, so the floor is attached exactly the way
the tracer attaches its programs.
"""
import signal
import sys
from pathlib import Path

from runqlat.bpf import BpfObject


def main() -> int:
    obj_path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "out/empty.bpf.o")
    # explicit: a process started in the background inherits SIGINT ignored
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    with BpfObject(obj_path) as obj:
        obj.load()
        for name in obj.program_names:
            obj.attach(name)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How the tests' torchrun scripts (tests/dist_*.py) end: ``run(main, *args)`` calls ``main(*args)``, then leaves
without the interpreter's finalisation.

Beside a CPU hog, 1 run in 22 of ``tests/dist_step.py`` on 2 gloo processes aborted after its work was done, with
"terminate called without an active exception" on rank 1; faulthandler showed the main thread with no Python frame,
that is in finalisation. A C++ thread that touches Python then (PyTorch's gloo workers keep the tensors of their
last collective until they go idle, and freeing one whose Python object had died needs the GIL) is unwound by the
finalising interpreter, inside a destructor that may not throw. Exiting with ``os._exit`` once the output is written
and flushed skips that phase; an exception in ``main`` still ends the process as usual."""
import os
import sys


def run(main, *args) -> None:
    main(*args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

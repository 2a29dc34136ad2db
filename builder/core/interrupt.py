"""SIGTERM (a kill, a CI timeout, a container stop) ends a command as Ctrl-C does: the same unwinding runs, so
servers and their model processes stop and staging folders go with it."""

import signal


def raise_interrupt(signum, frame):
    """A signal handler that raises KeyboardInterrupt where the program is."""
    raise KeyboardInterrupt(f"signal {signum}")


def sigterm_interrupts() -> None:
    """From now on SIGTERM raises KeyboardInterrupt in the main thread."""
    signal.signal(signal.SIGTERM, raise_interrupt)

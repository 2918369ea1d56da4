"""A graceful stop on Ctrl-C or SIGTERM: finish the current step and save a checkpoint."""
import signal
import threading

from ..log import info


class StopRequest:
    """Turns the first Ctrl-C (or SIGTERM) into a request to stop after the current step, with
    a checkpoint; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        self.requested = True
        info("stopping after this step (a checkpoint will be saved); press Ctrl-C again to abort at once")
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False

"""Turning SIGINT and SIGTERM into a request to stop at the next step boundary."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator

log = logging.getLogger(__name__)


class StopRequest:
    """While active, the first SIGINT/SIGTERM sets ``signum``; a second SIGINT stops at once, except inside
    ``deferred()`` (the final checkpoint), which it cannot cut short."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._deferring = False

    def __bool__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, _frame) -> None:
        if self._deferring:
            log.warning("received %s while writing the final checkpoint: it finishes first",
                        signal.Signals(signum).name)
            self.signum = self.signum or signum
            return
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: saving a checkpoint at the end of this step, then stopping "
                    "(press Ctrl-C again to stop at once)", signal.Signals(signum).name)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Signals received inside wait: nothing interrupts the block."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def __enter__(self) -> StopRequest:
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

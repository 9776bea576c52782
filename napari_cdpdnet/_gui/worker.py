"""The one way the segmentation dock runs work off the GUI thread: :class:`Jobs`.

Segmentations, segment by example, weight downloads and weight checks all start here, so the
rules are written once:

* **busy guard**: one *exclusive* job at a time (a model run or a download); another one is
  refused with "CDPDNet is busy" (:meth:`Jobs.refuse_if_busy`). The weights check is not
  exclusive: it only reads files and may overlap anything.
* **Cancel**: a cancellable job receives :meth:`Jobs.should_stop` and stops within one model
  window once :meth:`Jobs.cancel` is called; the core raises ``Cancelled``.
* **alive after close**: workers report after the dock may have been closed. Their callbacks run
  only while the dock is alive; closing it (:meth:`Jobs.close`) also cancels the running job,
  whose result nothing would show.
* **progress on the GUI thread**: a job reports from its worker thread by calling the ``emit``
  of a Qt signal of the dock; Qt queues the call to the dock's (GUI) thread, so progress
  handlers may touch widgets. Results, errors and the end arrive through napari's worker
  signals, on the GUI thread too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from napari.qt.threading import create_worker

from napari_cdpdnet._gui import notify

__all__ = ["Jobs", "BUSY_MESSAGE"]

BUSY_MESSAGE = "CDPDNet is busy: wait for the current job or cancel it"


class Jobs:
    """Starts the dock's napari thread workers; holds the running exclusive job.

    Args:
        on_busy: called with True when an exclusive job starts and False when it has ended
            (the dock enables and disables its buttons).
    """

    def __init__(self, on_busy: Callable[[bool], None]) -> None:
        self._on_busy = on_busy
        #: False once the dock is closed: worker callbacks are dropped from then on.
        self.alive = True
        #: Set to stop the running cancellable job (also when the dock closes).
        self.cancel_event = threading.Event()
        #: The running exclusive job's worker, or None.
        self.worker: Any = None
        self.cancellable = False

    @property
    def busy(self) -> bool:
        """An exclusive job (model run or download) is running."""
        return self.worker is not None

    @property
    def running(self) -> bool:
        """A cancellable job (a model run) is running."""
        return self.worker is not None and self.cancellable

    def refuse_if_busy(self) -> bool:
        """True (and the user is told why) when an exclusive job is running already."""
        if not self.busy:
            return False
        notify.show_info(BUSY_MESSAGE)
        return True

    def should_stop(self) -> bool:
        """For the worker thread: has the user cancelled (or closed the dock)?"""
        return self.cancel_event.is_set()

    def start(
        self,
        fn: Callable[..., Any],
        *args: Any,
        on_result: Callable[[Any], None],
        on_error: Callable[[BaseException], None] | None = None,
        on_finished: Callable[[], None] | None = None,
        exclusive: bool = True,
        cancellable: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` in a napari thread worker and return the started worker.

        ``on_result``, ``on_error`` and ``on_finished`` run on the GUI thread, only while the
        dock is alive. An exclusive job makes the dock busy until it has finished (after
        ``on_result`` or ``on_error``, before ``on_finished``). Callers check
        :meth:`refuse_if_busy` first: this method does not refuse.
        """
        if exclusive:
            self.cancel_event.clear()
        worker = create_worker(fn, *args, _start_thread=False, _ignore_errors=True, **kwargs)
        worker.returned.connect(self._while_alive(on_result))
        if on_error is not None:
            worker.errored.connect(self._while_alive(on_error))
        if exclusive:
            self.worker = worker
            self.cancellable = cancellable
            worker.finished.connect(self._while_alive(lambda: self._finished(on_finished)))
            self._on_busy(True)
        elif on_finished is not None:
            worker.finished.connect(self._while_alive(on_finished))
        worker.start()
        return worker

    def cancel(self) -> bool:
        """Ask the running cancellable job to stop; False when there is none."""
        if not self.running:
            return False
        self.cancel_event.set()
        return True

    def close(self, *_args: Any) -> None:
        """The dock is gone: drop every later callback and stop the running job."""
        self.alive = False
        self.cancel_event.set()

    def _finished(self, then: Callable[[], None] | None) -> None:
        self.worker = None
        self.cancellable = False
        self._on_busy(False)
        if then is not None:
            then()

    def _while_alive(self, callback: Callable[..., None]) -> Callable[..., None]:
        def call(*args: Any) -> None:
            if self.alive:
                callback(*args)

        return call

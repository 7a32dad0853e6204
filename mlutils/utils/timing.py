"""timer: elapsed wall time, as a context manager and a decorator."""
from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable, Optional, Union

__all__ = ["timer"]

# the logger these helpers have always used, whichever module they live in
log = logging.getLogger(__package__)


class timer:
    """Measure elapsed wall time; a context manager and a decorator.

    On exit the elapsed seconds go to ``callback(elapsed)`` when one is given,
    and a line ``"<msg> <seconds>s"`` is logged at INFO on ``mlutils.utils``
    (the original printed it; pass ``print_fn=print`` for that).  The last
    measurement stays in ``.elapsed``.  Decorate with ``@timer`` or
    ``@timer("msg", callback)``.
    """

    def __init__(
        self,
        msg: Union[str, Callable[..., Any]] = "Elapsed time:",
        callback: Optional[Callable[[float], Any]] = None,
        print_fn: Optional[Callable[[str], Any]] = None,
    ) -> None:
        self._fn: Optional[Callable[..., Any]] = None
        if callable(msg):  # used bare: @timer
            self._fn = msg
            functools.update_wrapper(self, msg)
            msg = f"{getattr(msg, '__qualname__', 'function')}:"
        self.msg = msg
        self.callback = callback
        self.print_fn = print_fn
        self.start: Optional[float] = None
        self.elapsed: Optional[float] = None

    def __enter__(self) -> "timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self.start is not None
        self.elapsed = time.perf_counter() - self.start
        line = f"{self.msg} {self.elapsed:.9f}s"
        if self.print_fn is not None:
            self.print_fn(line)
        else:
            log.info("%s", line)
        if self.callback is not None:
            self.callback(self.elapsed)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """As ``@timer("msg")`` it wraps a function; as ``@timer`` it is the timed function."""
        if self._fn is not None:
            with timer(self.msg, self.callback, self.print_fn):
                return self._fn(*args, **kwargs)
        if len(args) != 1 or kwargs or not callable(args[0]):
            raise TypeError("timer(...) decorates one function")
        fn = args[0]

        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with timer(self.msg, self.callback, self.print_fn):
                return fn(*args, **kwargs)

        return wrapped

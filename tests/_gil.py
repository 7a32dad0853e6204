"""Checks that a call runs without holding the GIL."""
import threading
import time


def _widest_stall(fn, calls):
    """Runs fn() `calls` times on a thread while this thread spins; returns
    (longest gap between two spins, mean duration of one call)."""
    durations, done = [], threading.Event()

    def work():
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        durations.append((time.perf_counter() - t0) / calls)
        done.set()

    t = threading.Thread(target=work)
    last = time.perf_counter()
    widest = 0.0
    t.start()
    while not done.is_set():
        now = time.perf_counter()
        widest = max(widest, now - last)
        last = now
    t.join()
    return widest, durations[0]


def assert_releases_gil(fn, calls=2, tries=3):
    """A call holding the GIL stalls the spinning thread for the whole call,
    every time; a busy machine can stall it briefly now and then, so a few
    tries are allowed."""
    for _ in range(tries):
        widest, call = _widest_stall(fn, calls)
        if widest < call * 0.75:
            return
    raise AssertionError(f"the main thread stalled {widest * 1e3:.0f} ms during {call * 1e3:.0f} ms calls")

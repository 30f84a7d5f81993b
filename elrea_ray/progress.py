"""Progress a person can read: counter lines per stage at a steady rate, not one per Ray event.

    [gradients] 320/480 examples featurised (67%), 41 s
    [experts] 37/64 steps (58%), 2/4 experts done, 41 s

Plain lines (no carriage returns), so they read the same in a terminal, in `ray job logs` and in
CI logs. A `Counter` prints at most one line every `every_s` seconds, and one when its count is
complete. Remote code (Ray Train workers, Ray Data actors) counts into a `Tally`, a 0-CPU actor
the driver reads on a thread (`Progress.tallied`), through `tell`. `quiet_ray` switches off Ray's own progress
bars and per-event lines on the driver; they stay in Ray's session log files.

The formatting and rate limiting are pure (a clock is passed in); Ray is imported only by the
functions that need it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator

Log = Callable[[str], None]


def progress_line(
    stage: str, done: int, total: int | None, unit: str, elapsed_s: float, extra: tuple[str, ...] = ()
) -> str:
    """e.g. `[gradients] 320/480 examples featurised (67%), 41 s`; without a total, `[base] 3 steps, 5 s`.
    The percentage reads 100 only when the count is complete."""
    if total:
        done = min(done, total)  # an actor that redid a lost block counts its rows twice
        pct = min(round(100 * done / total), 99 if done < total else 100)
        count = f"{done}/{total} {unit} ({pct}%)"
    else:
        count = f"{done} {unit}"
    return f"[{stage}] " + ", ".join([count, *extra, f"{elapsed_s:.0f} s"])


class Counter:
    """The counter lines of one stage: `update` prints when `every_s` seconds have passed since the
    last line (or the stage start), and when the count reaches its total; never the same line twice."""

    def __init__(
        self, stage: str, unit: str, log: Log | None, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ):
        self.stage, self.unit, self.log, self.every_s, self.clock = stage, unit, log, every_s, clock
        self.started = self.last = clock()
        self.shown: tuple | None = None
        self._lock = threading.Lock()  # the poll thread and the stage's own thread may both update

    def update(self, done: int, total: int | None = None, *extra: str) -> None:
        if self.log is None:
            return
        with self._lock:
            now, state = self.clock(), (min(done, total) if total else done, total, extra)
            complete = bool(total) and done >= total
            if state == self.shown or not (complete or now - self.last >= self.every_s):
                return
            self.last, self.shown = now, state
        self.log(progress_line(self.stage, done, total, self.unit, now - self.started, extra))


class Tally:
    """Counts that remote code adds to and the driver reads; run as a 0-CPU Ray actor."""

    def __init__(self):
        self.values: dict = {}

    def add(self, key: str, n: int) -> None:
        self.values[key] = self.values.get(key, 0) + n

    def put(self, key: str, value) -> None:
        self.values[key] = value

    def read(self) -> dict:
        return dict(self.values)


def tell(tally, method: str, *args, wait: bool = False) -> None:
    """From remote code: `tally.<method>(*args)` when there is a tally (None: reporting is off).
    With `wait`, returns once the tally has it: an update sent just before a worker exits might
    otherwise be lost, and the stage's last line be short. Never raises: a lost tally only
    costs progress lines."""
    if tally is None:
        return
    try:
        ref = getattr(tally, method).remote(*args)
        if wait:
            import ray

            ray.get(ref, timeout=30)
    except Exception:  # noqa: BLE001 - a progress line is not worth a failed stage
        pass


class Progress:
    """The run's progress reporter: `log` gets the lines (None: report nothing, and start no actor).
    A stage asks it for a `counter`, or for a `tallied` actor when remote code does the counting."""

    def __init__(
        self,
        log: Log | None = print,
        every_s: float = 10.0,
        poll_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.log, self.every_s, self.poll_s, self.clock = log, every_s, poll_s, clock

    @classmethod
    def off(cls) -> "Progress":
        return cls(log=None)

    def counter(self, stage: str, unit: str) -> Counter:
        return Counter(stage, unit, self.log, self.every_s, self.clock)

    @contextlib.contextmanager
    def tallied(self, show: Callable[[dict], None]) -> Iterator[object | None]:
        """A `Tally` actor handle for remote code to count into (None when reporting is off);
        `show(values)` runs every poll_s seconds on a thread while the block runs, and once at its
        end. Progress never fails a stage: a read that fails is skipped."""
        if self.log is None:
            yield None
            return
        import ray

        tally = ray.remote(num_cpus=0)(Tally).remote()
        stop = threading.Event()

        def poll() -> None:
            try:
                show(ray.get(tally.read.remote(), timeout=30))
            except Exception:  # noqa: BLE001 - a progress line is not worth a failed stage
                pass

        def loop() -> None:
            while not stop.wait(self.poll_s):
                poll()

        thread = threading.Thread(target=loop, name="elrea-progress", daemon=True)
        thread.start()
        try:
            yield tally
            stop.set()
            thread.join()
            poll()
        finally:
            stop.set()
            ray.kill(tally)

    @contextlib.contextmanager
    def counting(self, stage: str, unit: str, total: int, start: int = 0) -> Iterator[object | None]:
        """`tallied` for one count: remote code calls `tally.add.remote("done", n)`; the lines show
        start + done of total."""
        counter = self.counter(stage, unit)
        with self.tallied(lambda v: counter.update(start + v.get("done", 0), total)) as tally:
            yield tally

    @contextlib.contextmanager
    def training(
        self,
        stage: str,
        planned: dict[str, int | None],
        runs_unit: str | None = None,
        runs_before: int = 0,
        runs_total: int | None = None,
    ) -> Iterator[object | None]:
        """`tallied` for Ray Train runs: each run's rank 0 puts (step, total steps) under its name;
        planned: each run's expected total steps (None: known when the run reports it). The lines
        show the steps of all runs and, with runs_unit, how many runs are done (runs_before
        already were) of runs_total."""
        if not planned:  # nothing left to train
            yield None
            return
        counter = self.counter(stage, "steps")
        runs_total = runs_before + len(planned) if runs_total is None else runs_total

        def show(values: dict) -> None:
            steps = [values.get(name, (0, total)) for name, total in planned.items()]
            totals = [t for _, t in steps]
            total = sum(totals) if all(totals) else None
            extra = ()
            if runs_unit:
                finished = runs_before + sum(1 for s, t in steps if t and s >= t)
                extra = (f"{finished}/{runs_total} {runs_unit} done",)
            counter.update(sum(s for s, _ in steps), total, *extra)

        with self.tallied(show) as tally:
            yield tally


def quiet_ray(quiet: bool = False) -> None:
    """Ray's own progress output off on this driver: Ray Data's progress bars and its execution
    lines (they go on into the session's ray-data.log), console messages below WARNING (ERROR
    when `quiet`). Worker output is kept off the driver by `ray.init(log_to_driver=False)`."""
    import logging

    import ray.data
    from ray.util.debug import log_once

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    log_once("ray_data_progress_manager_disabled")  # Ray's "progress bars disabled" notice: we did that
    level = logging.ERROR if quiet else logging.WARNING
    for handler in logging.getLogger("ray.data").handlers:
        if "File" not in type(handler).__name__:  # the console; SessionFileHandler writes ray-data.log
            handler.setLevel(level)

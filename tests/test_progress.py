"""The progress reporter's lines and rate limit, with a fake clock (pure: no Ray)."""

from elrea_ray.progress import Counter, Progress, progress_line


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_line_names_the_stage_the_count_the_share_and_the_time():
    assert (
        progress_line("gradients", 320, 480, "examples featurised", 41.2)
        == "[gradients] 320/480 examples featurised (67%), 41 s"
    )
    assert (
        progress_line("experts", 37, 64, "steps", 41, ("2/4 experts done",))
        == "[experts] 37/64 steps (58%), 2/4 experts done, 41 s"
    )
    assert progress_line("base", 3, None, "steps", 5) == "[base] 3 steps, 5 s"
    # 100% only when complete; a count past its total (a redone block) is shown as the total
    assert progress_line("eval", 999, 1000, "items decoded", 1) == "[eval] 999/1000 items decoded (99%), 1 s"
    assert progress_line("eval", 1010, 1000, "items decoded", 1) == "[eval] 1000/1000 items decoded (100%), 1 s"


def test_at_most_one_line_every_interval_plus_one_when_complete():
    clock, lines = FakeClock(), []
    c = Counter("gradients", "examples featurised", lines.append, every_s=10, clock=clock)
    for t, done in [(1, 32), (5, 64), (9.9, 96)]:  # all within the first 10 s: nothing yet
        clock.t = 100 + t
        c.update(done, 480)
    assert lines == []
    clock.t = 110
    c.update(128, 480)
    clock.t = 115
    c.update(160, 480)  # 5 s after the last line: held back
    clock.t = 121
    c.update(160, 480)
    clock.t = 122
    c.update(480, 480)  # complete: shown at once
    clock.t = 140
    c.update(480, 480)  # the same line is never shown twice
    assert lines == [
        "[gradients] 128/480 examples featurised (27%), 10 s",
        "[gradients] 160/480 examples featurised (33%), 21 s",
        "[gradients] 480/480 examples featurised (100%), 22 s",
    ]


def test_a_counter_shows_a_changed_extra_and_a_stalled_count_once_per_interval():
    clock, lines = FakeClock(), []
    c = Counter("experts", "steps", lines.append, every_s=10, clock=clock)
    clock.t = 112
    c.update(0, 64, "0/4 experts done")  # nothing moved yet: still worth a line (it is waiting)
    clock.t = 130
    c.update(0, 64, "0/4 experts done")  # the same state again: not repeated
    clock.t = 131
    c.update(16, 64, "1/4 experts done")
    assert lines == [
        "[experts] 0/64 steps (0%), 0/4 experts done, 12 s",
        "[experts] 16/64 steps (25%), 1/4 experts done, 31 s",
    ]


def test_progress_off_prints_nothing_and_starts_no_actor():
    off = Progress.off()
    c = off.counter("eval", "items decoded")
    c.update(16, 16)
    with off.counting("gradients", "examples featurised", 480) as tally:
        assert tally is None  # remote code then skips counting; no Ray was needed
    with off.training("experts", {"expert-00": 3}, "experts") as tally:
        assert tally is None


def test_training_lines_sum_the_runs_steps_and_count_finished_runs():
    """The `show` of Progress.training, fed the values its Tally would hold (no Ray)."""
    clock, lines = FakeClock(), []
    progress = Progress(lines.append, every_s=10, clock=clock)
    shown = []
    progress.tallied = _capture_show(shown)  # the poll thread's `show`, called by hand below
    with progress.training("experts", {"expert-00": 3, "expert-01": None}, "experts", runs_before=1):
        show = shown[0]
        clock.t = 111
        show({"expert-00": (2, 3)})  # expert-01's total is unknown until it reports
        clock.t = 122
        show({"expert-00": (3, 3), "expert-01": (1, 2)})
        show({"expert-00": (3, 3), "expert-01": (2, 2)})
    assert lines == [
        "[experts] 2 steps, 1/3 experts done, 11 s",
        "[experts] 4/5 steps (80%), 2/3 experts done, 22 s",
        "[experts] 5/5 steps (100%), 3/3 experts done, 22 s",
    ]


def _capture_show(shown: list):
    import contextlib

    @contextlib.contextmanager
    def tallied(show):
        shown.append(show)
        yield None

    return tallied


def test_planned_steps_follow_the_training_loop_arithmetic():
    from elrea_ray.config import TrainConfig
    from elrea_ray.train import planned_steps

    tc = TrainConfig(batch_size=8, epochs=2)
    # 12 rows / batch 8 = 2 steps per epoch, x 2 epochs = 4
    assert planned_steps({"loop_cfg": {"example_ids": [f"e{i}" for i in range(12)]}, "tc": tc}) == 4
    assert planned_steps({"loop_cfg": {"example_ids": None}, "tc": tc}, rows=48) == 12
    assert planned_steps({"loop_cfg": {"example_ids": None}, "tc": tc}) is None  # the run will tell
    assert planned_steps({"loop_cfg": {"example_ids": None, "max_steps": 7}, "tc": tc}, rows=48) == 7

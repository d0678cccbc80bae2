from raypt.config import ScheduleConfig
from raypt.schedules.lr import lr_at


def test_warmup_then_cosine_to_min_ratio():
    sched = ScheduleConfig(warmup=0.1, min_lr_ratio=0.1)
    total = 1000
    warm = [lr_at(t, total, 1.0, sched) for t in range(0, 100, 10)]
    assert warm == sorted(warm) and warm[0] == 0.0
    assert abs(lr_at(100, total, 1.0, sched) - 1.0) < 1e-9
    decay = [lr_at(t, total, 1.0, sched) for t in range(100, 1001, 50)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert abs(lr_at(total, total, 1.0, sched) - 0.1) < 1e-9
    assert abs(lr_at(550, total, 1.0, sched) - 0.55) < 1e-9  # halfway down the cosine


def test_constant_schedule_holds_peak_after_warmup():
    sched = ScheduleConfig(name="constant", warmup=0.5)
    assert lr_at(10, 100, 2.0, sched) == 0.4
    assert lr_at(99, 100, 2.0, sched) == 2.0

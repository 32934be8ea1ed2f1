import gc

from cj_assessment.service import tune_garbage_collector


def test_tuning_freezes_start_up_objects_and_collects_the_young_generation_less_often():
    before = gc.get_threshold()
    try:
        tune_garbage_collector(10_000)
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (10_000, before[1], before[2])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_a_zero_threshold_keeps_the_collector_cadence():
    before = gc.get_threshold()
    try:
        tune_garbage_collector(0)
        assert gc.get_threshold() == before
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)

"""analysis/: the figures' helpers (the report on a real sweep is tested in test_sweep.py)."""

from __future__ import annotations

import numpy as np


def test_pareto_front_keeps_the_points_nothing_beats():
    from analysis.plots import pareto_front

    # (fvu, accuracy): (0.3, 70) is beaten by (0.2, 71); (0.5, 69) by everything better
    points = np.array([[0.1, 68.0], [0.2, 71.0], [0.3, 70.0], [0.4, 72.0], [0.5, 69.0]])
    assert sorted(pareto_front(points).tolist()) == [0, 1, 3]

"""scripts/train_tiny_reader.py and shapes.write_word: the typographic world's model and its images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import train_with_three_seeds

from vs2ray.data.shapes import render_shape, write_word

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_tiny_reader.py"


def test_a_written_word_is_black_on_a_white_label_in_its_corner_and_the_rest_is_the_image_doubled():
    pixels = render_shape(0, "test", 3).pixels
    doubled = pixels.repeat(2, axis=0).repeat(2, axis=1)
    assert (write_word(pixels, None, 0) == doubled).all()
    for corner in range(4):
        written = write_word(pixels, "purple square", corner)
        changed = (written != doubled).any(axis=2)
        rows, cols = np.nonzero(changed)
        # two lines of six 6-px letters and a 1-px margin: a 38 x 24 label against the corner's edges
        assert rows.max() - rows.min() + 1 <= 24 and cols.max() - cols.min() + 1 <= 38
        assert (rows.min() == 0) == (corner < 2) and (rows.max() == 63) == (corner >= 2)
        assert (cols.min() == 0) == (corner % 2 == 0) and (cols.max() == 63) == (corner % 2 == 1)
        label = written[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        colours = {tuple(c) for c in label.reshape(-1, 3)}
        assert colours <= {(0, 0, 0), (255, 255, 255)} and len(colours) == 2
    assert not (write_word(pixels, "red circle", 0) == write_word(pixels, "red square", 0)).all()


def test_same_seed_same_weights_and_every_condition_measured(tmp_path):
    scores, _ = train_with_three_seeds(SCRIPT, tmp_path, "--eval-limit", "32")
    assert set(scores) == {"top1_clean", "top1_true_word", "top1_wrong_word", "typographic"}
    assert all(0.0 <= value <= 1.0 for value in scores.values())

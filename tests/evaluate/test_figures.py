"""The figures say what a reader needs: the kept epoch, and which calibration bins are too thin to read."""

import numpy as np

from bonetumor.evaluate.figures import MIN_BIN_IMAGES, plot_curves, plot_reliability


def test_curves_mark_the_best_epoch():
    history = [{"epoch": e, "train_accuracy": 0.5 + e / 20, "val_accuracy": 0.6, "train_loss": 1 / e, "val_loss": v}
               for e, v in zip(range(1, 6), (0.9, 0.7, 0.5, 0.6, 0.65))]
    fig = plot_curves(history, best_epoch=3)
    for ax in fig.axes:
        marks = [line for line in ax.lines if line.get_label() == "best epoch 3 (kept)"]
        assert len(marks) == 1 and list(marks[0].get_xdata()) == [3, 3]


def test_reliability_greys_thin_bins_and_labels_their_counts():
    rng = np.random.default_rng(0)
    probs = np.concatenate([rng.uniform(0.0, 0.1, 200), rng.uniform(0.9, 1.0, 200), [0.45, 0.46, 0.55]])
    targets = (rng.random(len(probs)) < probs).astype(int)
    fig = plot_reliability(targets, probs, ece=0.05)
    ax = fig.axes[0]
    model = next(line for line in ax.lines if line.get_label().startswith("model"))
    thin = next(line for line in ax.lines if line.get_label().startswith(f"bins of < {MIN_BIN_IMAGES}"))
    assert len(model.get_xdata()) == 2 and len(thin.get_xdata()) == 2  # 0.45/0.46 in one bin, 0.55 in another
    assert sorted(t.get_text() for t in ax.texts) == ["n=1", "n=2"]

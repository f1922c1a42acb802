"""The charts people read figures off (issue 29, item 9): the eval coverage plot's threshold labels never
overlap, and compare's accuracy bars zoom to the values and print different values differently."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from matplotlib.text import Text

from training.record import plots


@pytest.fixture
def kept_figures(monkeypatch):
    """The figures the plot functions draw, kept open after they are saved so their texts can be measured."""
    figures = []
    close = plots.plt.close
    monkeypatch.setattr(plots.plt, "close", lambda fig=None: figures.append(fig))
    yield figures
    for fig in figures:
        close(fig)


def _boxes(fig, texts):
    """Each label's text extent (an Annotation's own extent would include its leader line)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [Text.get_window_extent(t, renderer) for t in texts]


@pytest.mark.fast
@pytest.mark.parametrize("rows", [
    # a model sure of every answer: all seven thresholds keep everything (issue 29's leaf run)
    [{"threshold": t, "coverage": 1.0, "accuracy": 0.9975} for t in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)],
    # eleven thresholds a pixel or two apart, and one far away that sets the axes' scale
    [{"threshold": round(0.5 + 0.045 * i, 3), "coverage": 1.0 - 0.001 * i, "accuracy": 0.90 + 0.0005 * i} for i in range(11)]
    + [{"threshold": 0.999, "coverage": 0.5, "accuracy": 1.0}],
])
def test_coverage_threshold_labels_never_overlap(rows, kept_figures, tmp_path: Path):
    plots.coverage({"fp32": rows, "int8": rows}, tmp_path / "coverage.png")
    [fig] = kept_figures
    ax = fig.axes[0]
    labels = [t for t in ax.texts if t.get_text() not in ("fp32", "int8")]
    assert labels, "no threshold labels drawn"
    spans = [tuple(float(v) for v in t.get_text().split("-")) for t in labels]
    for row in rows:  # every threshold is named, alone or in a label its point shares ("0.5-0.99")
        assert any(span[0] <= row["threshold"] <= span[-1] for span in spans), row
    boxes = _boxes(fig, labels)
    for (a, ta), (b, tb) in itertools.combinations(zip(boxes, labels), 2):
        assert not a.overlaps(b), f"labels {ta.get_text()!r} and {tb.get_text()!r} overlap"


@pytest.mark.fast
def test_accuracy_bars_zoom_to_the_values_and_tell_them_apart(kept_figures, tmp_path: Path):
    values = {"cnn-cherry": 0.9967, "mnv2-ft": 0.9975, "mnv2-frozen": 0.99750001, "resnet": 0.9932}
    plots.accuracy_bars([{"name": n, "test": {"accuracy": a}} for n, a in values.items()], tmp_path / "bars.png")
    [fig] = kept_figures
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.texts]
    assert len(labels) == len(values) and len(set(labels)) == len(set(values.values()))
    for label, value in zip(labels, values.values()):
        assert float(label) == pytest.approx(value, abs=0.5 * 10 ** -(len(label.split(".")[1])))
    assert labels[:2] == ["0.9967", "0.99750000"]  # no more digits than it takes
    bottom, top = ax.get_ylim()
    assert 0.9 < bottom < min(values.values()) and max(values.values()) < top < 1.01
    assert f"axis from {bottom:g}, not 0" in ax.get_ylabel()


@pytest.mark.fast
def test_accuracy_bars_spread_over_the_unit_interval_keep_a_zero_axis(kept_figures, tmp_path: Path):
    plots.accuracy_bars([{"name": "a", "test": {"accuracy": 0.52}}, {"name": "b", "test": {"accuracy": 0.91}}],
                        tmp_path / "bars.png")
    ax = kept_figures[0].axes[0]
    assert ax.get_ylim()[0] == 0 and "not 0" not in ax.get_ylabel()
    assert [t.get_text() for t in ax.texts] == ["0.5200", "0.9100"]

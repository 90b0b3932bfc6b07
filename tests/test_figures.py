"""docs/make_figures.py draws the docs' pictures from the code: check that it still runs."""

import importlib.util
from pathlib import Path

from PIL import Image

import npsd

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("make_figures", ROOT / "docs" / "make_figures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_figures_draw(tmp_path):
    fig = load_script()
    fig.schedule_plot(tmp_path / "schedule.png")
    fig.filmstrip(npsd.load(), tmp_path / "filmstrip.png", steps=3, every=1)
    assert Image.open(tmp_path / "schedule.png").size == (520, 280)
    strip = Image.open(tmp_path / "filmstrip.png")
    assert strip.width == 3 * 128 + 2 * 4            # one 128-px frame per step, 4-px gaps


def test_attention_maps_figure(tmp_path):
    fig = load_script()
    fig.attention_maps(npsd.load(), tmp_path / "attention_maps.png", steps=3)
    strip = Image.open(tmp_path / "attention_maps.png")
    words = len(fig.GRID_PROMPTS[0].split()) - 1    # "a" appears twice: one map per distinct word
    tiles = 1 + words                               # the image, then one overlay per word
    assert strip.size == (tiles * (128 + 2) + 2, 128 + 2 * 2)   # 128-px tiles, 2-px gaps (npsd.images.filmstrip)


def test_main_draws_only_the_figures_named(tmp_path, monkeypatch):
    fig = load_script()
    monkeypatch.setattr(fig, "OUT", tmp_path)
    fig.main(["schedule"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["schedule.png"]

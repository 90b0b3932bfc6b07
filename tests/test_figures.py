"""docs/make_figures.py draws the docs' pictures from the code: check that every figure still runs, has
the layout its tiles give, shows what it claims, and that the pages embed exactly the pictures it draws.

Layout: 128-px tiles 4 px apart (`row`), a 14-px label under a tile (`label`), 14 px per title line
plus 2 above the row (`title`)."""

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import npsd

ROOT = Path(__file__).resolve().parents[1]
TILE, GAP, LABEL, LINE = 128, 4, 14, 14


def load_script():
    spec = importlib.util.spec_from_file_location("make_figures", ROOT / "docs" / "make_figures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def row_width(tiles):
    return tiles * TILE + (tiles - 1) * GAP


def title_height(lines):
    return LINE * lines + 2


# every figure at a small cost (few steps); the figures' own defaults are what docs/images shows
CHEAP = {
    "schedule": {},
    "noising": {"steps": 2},
    "loss_vs_t": {"n_t": 3, "draws": 2},
    "filmstrip": {"steps": 3, "every": 1},
    "vae_roundtrip": {},
    "word_swap": {"steps": 2},
    "cfg": {"steps": 2},
    "strength": {"steps": 5},                  # int(5 * 0.2) = 1 step at the lowest strength
    "inpaint": {},                             # 20 steps (2 s): at 4, the image itself is half-formed
    "attention_maps": {"steps": 3},
    "grid": {"steps": 2},
    "held_out_grid": {"steps": 2, "prompts": ["a red circle on a green background"] * 7},   # 6 + 1: two rows
}


@pytest.fixture(scope="module")
def fig():
    return load_script()


@pytest.fixture(scope="module")
def drawn(fig, tmp_path_factory):
    """Every figure of FIGURES drawn once at the CHEAP settings: name -> (its file, what it returned)."""
    out = tmp_path_factory.mktemp("figures")
    pipe = npsd.load()
    result = {}
    for name, (draw, needs_model, file) in fig.FIGURES.items():
        returned = draw(*((pipe,) if needs_model else ()), out / file, **CHEAP[name])
        result[name] = (out / file, returned)
    return result


def size(drawn, name):
    return Image.open(drawn[name][0]).size


def test_every_figure_draws_a_file_with_its_name(fig, drawn):
    assert set(CHEAP) == set(fig.FIGURES), "give each figure of FIGURES cheap settings in CHEAP"
    for name, (draw, needs_model, file) in fig.FIGURES.items():
        path = drawn[name][0]
        assert path.name == file and path.is_file(), name
        assert Image.open(path).format == "PNG", name
    assert len({file for _, _, file in fig.FIGURES.values()}) == len(fig.FIGURES)   # no two share a file


def test_schedule_and_filmstrip_layout(drawn):
    assert size(drawn, "schedule") == (520, 280)
    assert size(drawn, "filmstrip") == (row_width(3), TILE + LABEL)       # one frame per step


def test_attention_maps_layout(fig, drawn):
    words = len(fig.GRID_PROMPTS[0].split()) - 1    # "a" appears twice: one map per distinct word
    tiles = 1 + words                               # the image, then one overlay per word
    assert size(drawn, "attention_maps") == (tiles * (128 + 2) + 2, 128 + 2 * 2)   # 2-px gaps (npsd.images.filmstrip)


def test_tile_rows_with_titles_layout(drawn):
    # (figure, tiles in its row, title lines)
    for name, tiles, lines in [("noising", 5, 1), ("vae_roundtrip", 3, 1), ("word_swap", 4, 1), ("cfg", 4, 1),
                               ("strength", 6, 2), ("inpaint", 3, 2)]:
        assert size(drawn, name) == (row_width(tiles), title_height(lines) + TILE + LABEL), name


def test_grids_layout(drawn):
    assert size(drawn, "grid") == (row_width(4), 2 * (TILE + LABEL) + GAP)          # 8 prompts, rows of 4
    # 7 prompts in rows of 6 (npsd.train.evaluate.grid): 64-px images in 1-px white frames, scaled 2x
    assert size(drawn, "held_out_grid") == (6 * (64 + 2) * 2, 2 * (64 + 2) * 2)


def test_loss_vs_t_plots_l_simple_with_and_without_the_caption(drawn):
    assert size(drawn, "loss_vs_t") == (520, 300)
    ts, with_c, empty = drawn["loss_vs_t"][1]
    assert ts.tolist() == [0, 500, 999]
    assert np.all(np.isfinite(with_c)) and np.all(with_c > 0)
    # the caption helps the UNet predict epsilon: measured 0.38 / 0.0049 / 0.0017 with it and
    # 0.42 / 0.0083 / 0.0021 without it (2 draws); the loss falls 200-fold from t = 0 to t = 999
    assert np.all(with_c < empty)
    assert with_c[0] > 10 * with_c[-1]


def test_vae_roundtrip_error_is_small(drawn):
    diff = drawn["vae_roundtrip"][1]                   # |reconstruction - image| on the 0..1 scale
    assert diff.shape == (1, 64, 64, 3)
    assert diff.mean() < 0.05                          # measured 0.017 (the VAE loses detail at edges)
    assert diff.max() > 0.05                           # measured 0.43: not a copy of the input


def test_inpaint_keeps_the_unmasked_region(drawn):
    image, mask, out = drawn["inpaint"][1]
    a, b = (np.asarray(x, dtype=np.float32) / 255 for x in (image, out))
    keep = np.asarray(mask)[..., 0] < 128                                 # black: kept
    assert 0 < keep.mean() < 1
    outside, inside = np.abs(a - b)[keep].mean(), np.abs(a - b)[~keep].mean()
    assert outside < 0.1         # measured 0.052: the VAE round trip's error, nothing repainted
    assert inside > 0.1          # measured 0.24: the masked square was repainted


def test_main_draws_only_the_figures_named(fig, tmp_path, monkeypatch):
    monkeypatch.setattr(fig, "OUT", tmp_path)
    fig.main(["schedule"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["schedule.png"]


SCREENSHOTS = {"serve.png": "tests/test_serve_browser.py"}   # NPSD_SCREENSHOT=1 python -m pytest <that file>


def test_every_picture_in_docs_is_drawn_by_the_script(fig):
    images = ROOT / "docs" / "images"
    files = {file for _, _, file in fig.FIGURES.values()}
    # pictures that are screenshots of a running program, made by a test rather than by the script
    for file, test in SCREENSHOTS.items():
        assert f'"{file}"' in (ROOT / test).read_text(encoding="utf-8"), f"{test} no longer writes {file}"
    files |= set(SCREENSHOTS)
    pages = [ROOT / "README.md", ROOT / "weights" / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
    embedded = set()
    for page in pages:
        for link in re.findall(r"!\[[^\]]*\]\(([^)\s]+\.png)\)", page.read_text(encoding="utf-8")):
            path = (page.parent / link).resolve()
            where = f"{page.relative_to(ROOT)} embeds {link}"
            assert path.parent == images, f"{where}: pictures live in docs/images, drawn by docs/make_figures.py"
            assert path.name in files, f"{where}, which no figure of docs/make_figures.py draws"
            assert path.is_file(), f"{where}, which is missing: run python docs/make_figures.py"
            embedded.add(path.name)
    assert sorted(files - embedded) == [], "pictures drawn by docs/make_figures.py that no page embeds"

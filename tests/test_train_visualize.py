"""asit.train.visualize: reconstruction pictures with axes, colour bars and the pasted panel."""

from __future__ import annotations

import torch

from asit.train.visualize import COLUMNS, paste_reconstruction, reconstruction_figure, save_reconstruction_grid


def _batch(b=3, t=50, f=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(b, 1, t, f, generator=g)
    mask = torch.zeros(b, 1, t, f, dtype=torch.bool)
    mask[:, :, 10:30, 4:12] = True
    mask[:, :, 45:, :] = True  # reaches past the reconstruction's whole-patch grid
    corrupted = clean.masked_fill(mask, 0.0)
    recon = torch.randn(b, 1, 48, 16, generator=g)  # T' = 48, F' = 16 (patch 16)
    return clean, corrupted, recon, mask


def test_paste_keeps_clean_outside_the_mask_and_recon_inside():
    clean, _, recon, mask = _batch()
    pasted = paste_reconstruction(clean, recon, mask)
    assert pasted.shape == clean.shape
    inside = mask.clone()
    inside[..., 48:, :] = False
    inside[..., :, 16:] = False
    assert torch.equal(pasted[~inside], clean[~inside])
    assert torch.equal(pasted[..., :48, :16][inside[..., :48, :16]], recon[inside[..., :48, :16]])
    assert not torch.equal(pasted, clean)


def test_figure_has_axes_colour_bars_and_every_column():
    import matplotlib.pyplot as plt

    clean, corrupted, recon, mask = _batch()
    fig = reconstruction_figure(clean, corrupted, recon, mask, max_items=2, title="epoch 3")
    try:
        panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
        bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
        assert len(panels) == 2 * len(COLUMNS) and len(bars) == 2
        assert [ax.get_title() for ax in panels[: len(COLUMNS)]] == list(COLUMNS)
        assert "reconstruction in the masked area" in COLUMNS
        assert {ax.get_xlabel() for ax in panels[len(COLUMNS):]} == {"time (s)"}
        assert panels[0].get_ylabel() == panels[len(COLUMNS)].get_ylabel() == "mel bin"
        assert panels[0].get_xlim() == (0.0, 0.5)  # 50 frames of 10 ms
        assert panels[0].xaxis.get_ticklabels() and panels[0].yaxis.get_ticklabels()
        assert bars[0].get_ylabel() == "normalised log-mel"
    finally:
        plt.close(fig)


def test_png_written(tmp_path):
    clean, corrupted, recon, mask = _batch(b=1)
    path = save_reconstruction_grid(tmp_path / "images" / "epoch_0001.png", clean, corrupted, recon, mask)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

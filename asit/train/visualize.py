"""Pictures of what the model sees and rebuilds, one PNG per call.

:func:`save_reconstruction_grid` draws, for a few samples of a batch, the clean spectrogram, the GMML-corrupted
input, the student's reconstruction, the reconstruction pasted into the masked area (clean outside the mask,
reconstruction inside: how well it fills the holes) and the mask. Every panel has axes (time in seconds,
mel bin) and the spectrogram panels share one colour bar (normalised fbank units).
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["COLUMNS", "paste_reconstruction", "reconstruction_figure", "save_reconstruction_grid"]

COLUMNS = ("clean", "corrupted", "reconstruction", "reconstruction in the masked area", "mask")


def paste_reconstruction(clean: torch.Tensor, recon: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``clean`` with the masked pixels replaced by ``recon``: ``[B, 1, T, F]``.

    ``recon`` may cover a smaller grid ``[B, 1, T', F']`` (the reconstruction head's whole patches, from the
    top-left corner); outside it the clean values stay.
    """
    t, f = recon.shape[-2:]
    out = clean.clone()
    region = mask[..., :t, :f].bool()
    out[..., :t, :f] = torch.where(region, recon.to(clean.dtype), clean[..., :t, :f])
    return out


def save_reconstruction_grid(path: str | Path, clean: torch.Tensor, corrupted: torch.Tensor,
                             recon: torch.Tensor, mask: torch.Tensor, max_items: int = 4,
                             title: str = "", frame_shift_s: float = 0.010) -> Path:
    """Write :func:`reconstruction_figure` as a PNG at ``path`` (folders made as needed); returns ``path``."""
    import matplotlib.pyplot as plt

    fig = reconstruction_figure(clean, corrupted, recon, mask, max_items=max_items, title=title,
                                frame_shift_s=frame_shift_s)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def reconstruction_figure(clean: torch.Tensor, corrupted: torch.Tensor, recon: torch.Tensor, mask: torch.Tensor,
                          *, max_items: int = 4, title: str = "", frame_shift_s: float = 0.010):
    """A matplotlib figure with one row per sample and the columns of :data:`COLUMNS`.

    All tensors are ``[B, 1, T, F]`` (``recon`` may be ``[B, 1, T', F']``, its whole-patch grid); time runs
    left to right in seconds (``frame_shift_s`` per fbank frame), mel bins bottom to top. The spectrogram
    panels share the colour scale ``[-1.5, 1.5]`` shown by the colour bar; the mask is white where corrupted.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    n = min(max_items, clean.shape[0])
    pasted = paste_reconstruction(clean[:n].float(), recon[:n].float(), mask[:n])
    panels = (clean, corrupted, recon, pasted, mask)
    fig, axes = plt.subplots(n, len(COLUMNS), figsize=(3.6 * len(COLUMNS), 2.4 * n + 0.6), squeeze=False,
                             layout="constrained")
    spec_image = mask_image = None
    for r in range(n):
        for c, (name, t) in enumerate(zip(COLUMNS, panels)):
            img = t[r, 0].detach().float().cpu().T.numpy()  # [F, T]
            ax = axes[r][c]
            is_mask = name == "mask"
            frames, bins = img.shape[1], img.shape[0]
            image = ax.imshow(img, origin="lower", aspect="auto", cmap="gray" if is_mask else "magma",
                              vmin=0.0 if is_mask else -1.5, vmax=1.0 if is_mask else 1.5,
                              interpolation="nearest", extent=(0.0, frames * frame_shift_s, 0, bins))
            if is_mask:
                mask_image = image
            else:
                spec_image = image
            if r == 0:
                ax.set_title(name, fontsize=10)
            if r == n - 1:
                ax.set_xlabel("time (s)")
            if c == 0:
                ax.set_ylabel("mel bin")
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=7)
    fig.colorbar(spec_image, ax=axes[:, :-1].ravel().tolist(), shrink=0.9, label="normalised log-mel")
    bar = fig.colorbar(mask_image, ax=axes[:, -1].ravel().tolist(), shrink=0.9, ticks=[0, 1])
    bar.ax.set_yticklabels(["kept", "masked"])
    if title:
        fig.suptitle(title)
    return fig

"""Pictures of what the model sees: clean / corrupted / reconstruction / mask spectrograms."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["save_reconstruction_grid"]


def save_reconstruction_grid(path: str | Path, clean: torch.Tensor, corrupted: torch.Tensor,
                             recon: torch.Tensor, mask: torch.Tensor, max_items: int = 4,
                             title: str = "") -> Path:
    """Write a PNG with one row per sample and the columns clean, corrupted, reconstruction, mask.

    All tensors are ``[B, 1, T, F]``; time runs left to right, frequency bottom to top.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(max_items, clean.shape[0])
    cols = [("clean", clean), ("corrupted", corrupted), ("reconstruction", recon), ("mask", mask)]
    fig, axes = plt.subplots(n, 4, figsize=(14, 2.2 * n), squeeze=False)
    for r in range(n):
        for c, (name, t) in enumerate(cols):
            img = t[r, 0].detach().float().cpu().T.numpy()  # [F, T]
            ax = axes[r][c]
            vmin, vmax = (0.0, 1.0) if name == "mask" else (-1.5, 1.5)
            ax.imshow(img, origin="lower", aspect="auto", cmap="magma", vmin=vmin, vmax=vmax,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path

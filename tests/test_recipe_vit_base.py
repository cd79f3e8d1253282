"""The paper's ViT-B recipe starts from its config with only the data path changed (plus a batch
small enough for a CPU): one real optimisation step of the full-size model on 592 × 128 input."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from asit.config import load_config
from asit.train import Pretrainer


@pytest.mark.slow
def test_vit_base_recipe_takes_a_step(tmp_path):
    data = tmp_path / "wavs"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):  # 7 s at 32 kHz: longer than one 6 s view
        sf.write(data / f"clip{i}.wav", (0.1 * rng.standard_normal(32000 * 7)).astype("float32"), 32000)
    cfg = load_config("asit_vit_base", [f"data.train_manifest={data}", f"train.output_dir={tmp_path / 'run'}",
                                        "train.batch_size=2", "train.max_steps_per_epoch=1",
                                        "data.num_workers=0", "train.progress=false"])
    trainer = Pretrainer(cfg)
    try:
        trainer.setup()
        assert sum(p.numel() for p in trainer.student.backbone.parameters()) > 85_000_000  # ViT-B/16
        batch = next(iter(trainer.loader))
        assert batch["views"].shape == (2, 2, 1, 592, 128)
        # epoch 20 of the recipe's 100 (one step each here): past the 10-epoch warm-up, so lr > 0
        trainer.step = 20
        before = trainer.student.backbone.blocks[11].mlp.fc2.weight.detach().clone()
        result = trainer.train_step(batch, epoch=20)
        assert not result.skipped
        assert torch.isfinite(result.terms["loss"])
        assert student_out_shapes_ok(trainer)
        assert not torch.equal(before, trainer.student.backbone.blocks[11].mlp.fc2.weight)
    finally:
        trainer.cleanup()


def student_out_shapes_ok(trainer: Pretrainer) -> bool:
    """Heads have the v1 sizes: [CLS] → 8192, tokens → 1024, reconstruction back to 592 × 128."""
    x = torch.zeros(1, 1, 592, 128)
    with torch.no_grad():
        out = trainer.student(x)
    return (out["cls_logits"].shape == (1, 8192) and out["token_logits"].shape == (1, 296, 1024)
            and out["recon"].shape == (1, 1, 592, 128))

"""The tiny model and data the engine tests train: a 2-layer 64-wide ViT on 96 x 32 spectrograms of
48 one-second crops of the demo corpus, without demo_cpu's local views. Each test file adds its own
``train.*`` overrides."""

IMG = (96, 32)
TINY_MODEL = [
    "data.demo_clips=48", "data.num_workers=0", "data.crop_seconds=1.0", f"data.target_frames={IMG[0]}",
    f"data.num_mel_bins={IMG[1]}",
    "model.depth=2", "model.embed_dim=64", "model.num_heads=2", "model.head_out_cls=256",
    "model.head_out_tokens=64", "model.head_hidden=128", "model.head_bottleneck=32", "model.recon_hidden=64",
    "gmml.max_block_frac=0.9",  # fewer GMML blocks per sample: quicker steps
    # the engine tests were calibrated on the v1-style demo (no local views, lr 1e-3 x B/256)
    "data.local_views=0", "loss.global_pairs=v1", "optim.lr=1.0e-3", "optim.warmup_epochs=1",
    "loss.warmup_teacher_temp_epochs=3",
    "eval.probe_manifest=null",  # demo_cpu's probe adds log rows; tests/test_train_probe_monitor.py turns it on
]

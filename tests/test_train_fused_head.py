"""``loss.fused_head``: the model hands the loss the token features and output weights, the loss fuses the
output layer into the local distillation loss, and a training step gives the same terms, gradients and
centres as the unfused head."""

from __future__ import annotations

import pytest
import torch
from test_train_engine import TINY, _env  # noqa: F401  (module fixture: temp ASIT_CACHE, 1 thread)

from asit.config import ConfigError, load_config
from asit.models import build_asit
from asit.train import Pretrainer
from asit.train.losses import ASiTLoss


@pytest.mark.parametrize("out_tokens", [12, None])  # a separate token layer (v1), the shared one (v2)
def test_model_returns_features_and_weight(out_tokens, seed):
    pair = build_asit(preset=dict(embed_dim=32, depth=1, num_heads=2), img_size=(32, 32), out_cls=20,
                      out_tokens=out_tokens, head_hidden=16, head_bottleneck=8, token_logits=False)
    x = torch.randn(2, 1, 32, 32)
    fused = pair.student(x, with_recon=False)
    plain = pair.student(x, with_recon=False, token_logits=True)
    assert "token_logits" not in fused and fused["token_embed"].shape == (2, 4, 8)
    k = 20 if out_tokens is None else out_tokens
    assert fused["token_weight"].shape == (k, 8) and fused["token_weight"].requires_grad
    torch.testing.assert_close(fused["token_embed"] @ fused["token_weight"].T, plain["token_logits"])
    torch.testing.assert_close(fused["cls_logits"], plain["cls_logits"])
    assert "token_embed" in pair.teacher(x, with_recon=False)  # the teacher is built the same way


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_loss_matches_unfused(backend, seed):
    gen = torch.Generator().manual_seed(seed)
    vb, n, db, kc, kt = 6, 5, 8, 11, 13
    h_s = torch.randn(vb, n, db, generator=gen).requires_grad_()
    w_s = torch.randn(kt, db, generator=gen).requires_grad_()
    h_t, w_t = torch.randn(vb, n, db, generator=gen), torch.randn(kt, db, generator=gen)
    cls_s, cls_t = torch.randn(vb, kc, generator=gen), torch.randn(vb, kc, generator=gen)
    recon, clean = torch.randn(vb, 1, 8, 8, generator=gen), torch.randn(vb, 1, 8, 8, generator=gen)
    mask, frac = torch.rand(vb, 1, 8, 8, generator=gen) < 0.4, torch.rand(vb, n, generator=gen)
    frac[0] = 0.0
    center = torch.randn(kt, generator=gen)
    results = []
    for fused in (False, True):
        loss = ASiTLoss(kc, kt, local_tokens="corrupted", backend=backend, fused_head=fused)
        loss.center_local.copy_(center)
        if fused:
            student = dict(cls_logits=cls_s, token_embed=h_s, token_weight=w_s, recon=recon)
            teacher = dict(cls_logits=cls_t, token_embed=h_t, token_weight=w_t)
        else:
            student = dict(cls_logits=cls_s, token_logits=h_s @ w_s.T, recon=recon)
            teacher = dict(cls_logits=cls_t, token_logits=h_t @ w_t.T)
        terms, stats = loss(student, teacher, clean, mask, frac, 0.05)
        g_h, g_w = torch.autograd.grad(terms["loss"] * 0.37, (h_s, w_s))
        results.append((terms, stats, (g_h, g_w)))
    (t0, s0, g0), (t1, s1, g1) = results
    for key in ("loss", "global", "local", "recon"):
        torch.testing.assert_close(t1[key], t0[key], rtol=2e-5, atol=2e-6, msg=lambda m, key=key: f"{key}: {m}")
    torch.testing.assert_close(s1.local_sum, s0.local_sum, rtol=1e-5, atol=1e-5)
    assert s1.local_count == s0.local_count == vb * n
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_loss_says_what_the_fused_head_needs():
    loss = ASiTLoss(4, 3, fused_head=True)
    student = dict(cls_logits=torch.randn(4, 4), token_logits=torch.randn(4, 2, 3), recon=torch.randn(4, 1, 4, 4))
    teacher = dict(cls_logits=torch.randn(4, 4), token_logits=torch.randn(4, 2, 3))
    with pytest.raises(KeyError, match="token_embed"):
        loss(student, teacher, torch.randn(4, 1, 4, 4), torch.ones(4, 1, 4, 4, dtype=torch.bool),
             torch.rand(4, 2), 0.05)


def test_fused_head_contradicts_authors_mode():
    with pytest.raises(ConfigError, match="loss.fused_head"):
        load_config("demo_cpu", ["loss.fused_head=true", "train.mode=authors"])


def test_training_step_matches_unfused(tmp_path, monkeypatch):
    """One step with and without the fused head, the ops on their Triton path (interpreter on the CPU):
    same loss terms, gradients, updated weights, centres and collapse monitors in fp32."""
    monkeypatch.setenv("ASIT_OPS_BACKEND", "triton")
    common = ("train.device=cpu", "train.precision=fp32", "model.drop_path_rate=0.0", "loss.local_tokens=corrupted")
    trainers = [Pretrainer(load_config("demo_cpu", [*TINY, f"train.output_dir={tmp_path / str(fused)}", *common,
                                                    f"loss.fused_head={str(fused).lower()}"]))
                for fused in (False, True)]
    try:
        for t in trainers:
            t.setup()
        plain, fused = trainers
        assert plain.student.token_logits and not fused.student.token_logits and fused.loss_fn.fused_head
        for a, b in zip(plain.student.parameters(), fused.student.parameters(), strict=True):
            assert torch.equal(a, b)
        plain.step = plain.iters_per_epoch  # past the warm-up, where lr starts at 0
        fused.step = plain.step
        batch = next(iter(plain.loader))
        results = []
        for t in trainers:
            t.gmml_gen.manual_seed(7)
            results.append(t.train_step(batch, epoch=1, monitors=True))
        r_p, r_f = results
        assert not r_p.skipped and not r_f.skipped
        for key in ("loss", "global", "local", "recon", "grad_norm"):
            torch.testing.assert_close(r_f.terms[key], r_p.terms[key], rtol=1e-5, atol=1e-6, msg=key)
        for key, value in r_p.monitors.items():
            torch.testing.assert_close(r_f.monitors[key], value, rtol=1e-5, atol=1e-6, msg=key)
        named = dict(fused.student.named_parameters())
        for name, p in plain.student.named_parameters():
            q = named[name]
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7, msg=name)
            torch.testing.assert_close(q, p, rtol=1e-5, atol=2e-6, msg=name)
        assert plain.student.head.last_layer_tokens.weight_v.grad.abs().sum() > 0  # the token layer was trained
        torch.testing.assert_close(fused.loss_fn.center_local, plain.loss_fn.center_local, rtol=1e-5, atol=1e-7)
    finally:
        for t in trainers:
            t.cleanup()


@pytest.mark.parametrize("fused_head", [False, True])
def test_ops_backend_reference_keeps_every_op_off_the_kernels(tmp_path, monkeypatch, fused_head):
    """train.ops_backend=reference (the bench's "ops-eager" lever) sends GMML sampling and painting, both
    distillation losses (with ``loss.fused_head``, the local one fused with the output layer) and the masked L1
    to their PyTorch twins even where Triton is the default; the default (auto) reaches the Triton path for
    each of them."""
    import asit.ops._triton as tri

    monkeypatch.setenv("ASIT_OPS_BACKEND", "triton")  # "auto" means Triton here, as it does on CUDA
    called: list[str] = []
    kernels = {"gmml_prefix_triton", "gmml_corrupt_triton", "centered_softmax_cross_entropy_triton",
               "masked_l1_loss_triton"}
    fused_name = "linear_centered_softmax_cross_entropy_triton"
    for name in (*sorted(kernels), fused_name):
        real = getattr(tri, name)
        monkeypatch.setattr(tri, name, lambda *a, _n=name, _f=real, **k: (called.append(_n), _f(*a, **k))[1])
    common = ("train.device=cpu", "train.precision=fp32", "train.sync_free=true",
              f"loss.fused_head={str(fused_head).lower()}")
    # the global loss stays on the unfused CE op either way; the local one is the fused op with the fused head
    on_auto = kernels | {fused_name} if fused_head else kernels
    for backend, expected in (("reference", set()), ("auto", on_auto)):
        called.clear()
        trainer = Pretrainer(load_config("demo_cpu", [*TINY, f"train.output_dir={tmp_path / backend}", *common,
                                                      f"train.ops_backend={backend}"]))
        try:
            trainer.setup()
            assert trainer.loss_fn.fused_head is fused_head
            result = trainer.train_step(next(iter(trainer.loader)), epoch=1)
            assert torch.isfinite(result.terms["loss"])
            assert set(called) == expected, backend
        finally:
            trainer.cleanup()


def test_resuming_with_another_fused_head_or_ops_backend_is_not_a_changed_setting(caplog):
    """loss.fused_head and train.ops_backend change only the rounding (same batches, masks and maths): a resume
    across them warns of nothing, while another key still warns."""
    from pathlib import Path

    from asit.config import config_to_dict
    from asit.train.resume import RESUME_FREE_KEYS, warn_changed_config

    saved = config_to_dict(load_config("demo_cpu"))
    for overrides in (["loss.fused_head=true"], ["train.ops_backend=reference"]):
        now = config_to_dict(load_config("demo_cpu", overrides))
        assert now != saved, overrides
        caplog.clear()
        with caplog.at_level("WARNING"):
            warn_changed_config(Path("ckpt.pt"), saved, now, RESUME_FREE_KEYS)
        assert not [r for r in caplog.records if "setting(s) changed" in r.getMessage()], overrides
    caplog.clear()
    with caplog.at_level("WARNING"):
        warn_changed_config(Path("ckpt.pt"), saved, config_to_dict(load_config("demo_cpu", ["optim.lr=1e-3"])),
                            RESUME_FREE_KEYS)
    assert [r for r in caplog.records if "setting(s) changed" in r.getMessage()]  # the check itself works


def test_ops_backend_rejects_unknown_values():
    with pytest.raises(ConfigError, match="train.ops_backend"):
        load_config("demo_cpu", ["train.ops_backend=triton"])

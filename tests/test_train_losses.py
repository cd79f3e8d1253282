"""The ASiT objective against float64 formulas written out here: cross-view [CLS] pairs (v1 and v2),
per-token local loss, masked reconstruction, loss weights and the centre statistics."""

from __future__ import annotations

import pytest
import torch

from asit.train.losses import ASiTLoss

B, N, KC, KT, T, F = 3, 4, 11, 7, 8, 8
TS, TT = 0.1, 0.05


def ce64(s: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Per-row -sum softmax((t - c)/TT) * log_softmax(s/TS), in float64."""
    s, t, c = s.double(), t.double(), c.double()
    p = torch.exp((t - c) / TT) / torch.exp((t - c) / TT).sum(-1, keepdim=True)
    log_q = s / TS - torch.log(torch.exp(s / TS).sum(-1, keepdim=True))
    return -(p * log_q).sum(-1)


def _outputs(gen: torch.Generator, n_views: int = 2):
    student = {"cls_logits": torch.randn(n_views * B, KC, generator=gen),
               "token_logits": torch.randn(n_views * B, N, KT, generator=gen),
               "recon": torch.randn(n_views * B, 1, T, F, generator=gen)}
    teacher = {"cls_logits": torch.randn(n_views * B, KC, generator=gen),
               "token_logits": torch.randn(n_views * B, N, KT, generator=gen)}
    clean = torch.randn(n_views * B, 1, T, F, generator=gen)
    mask = torch.rand(n_views * B, 1, T, F, generator=gen) < 0.4
    frac = torch.rand(n_views * B, N, generator=gen)
    return student, teacher, clean, mask, frac


@pytest.mark.parametrize("local_tokens", ["all", "corrupted"])
def test_v1_terms_and_weights(local_tokens, seed):
    gen = torch.Generator().manual_seed(seed)  # fresh per run, printed by the fixture
    student, teacher, clean, mask, frac = _outputs(gen)
    frac[0, :2] = 0.0  # some tokens without corruption
    loss = ASiTLoss(KC, KT, student_temp=TS, weight_global=0.7, weight_local=1.3, weight_recon=2.0,
                    local_tokens=local_tokens)
    loss.center_global.normal_(generator=gen)
    loss.center_local.normal_(generator=gen)
    terms, stats = loss(student, teacher, clean, mask, frac, TT)

    s, t = student["cls_logits"], teacher["cls_logits"]
    glob = 0.5 * (ce64(s[:B], t[B:], loss.center_global).mean() + ce64(s[B:], t[:B], loss.center_global).mean())
    rows = ce64(student["token_logits"].reshape(-1, KT), teacher["token_logits"].reshape(-1, KT), loss.center_local)
    if local_tokens == "all":
        local = rows.mean()
    else:
        w = (frac.reshape(-1) > 0).double()
        local = (rows * w).sum() / w.sum()
    m = mask.double()
    recon = ((student["recon"].double() - clean.double()).abs() * m).sum() / m.sum()
    torch.testing.assert_close(terms["global"].double(), glob, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["local"].double(), local, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["recon"].double(), recon, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss"].double(), 0.7 * glob + 1.3 * local + 2.0 * recon, rtol=1e-5, atol=1e-5)
    # the centres are fed the raw teacher logits of both views, once each
    torch.testing.assert_close(stats.global_sum.double(), t.double().sum(0), rtol=1e-5, atol=1e-5)
    assert stats.global_count == 2 * B
    assert stats.local_count == 2 * B * N


def test_v2_averages_all_cross_view_pairs_and_counts_teacher_rows_once(seed):
    gen = torch.Generator().manual_seed(seed)
    student, teacher, clean, mask, frac = _outputs(gen)
    local_cls = torch.randn(4 * B, KC, generator=gen)  # 4 clean local views, student only
    loss = ASiTLoss(KC, KT, student_temp=TS, global_pairs="v2")
    terms, stats = loss(student, teacher, clean, mask, frac, TT, student_local_cls=local_cls)

    s_views = list(student["cls_logits"].split(B)) + list(local_cls.split(B))  # 6 student views
    t_views = list(teacher["cls_logits"].split(B))  # 2 teacher (global) views
    pairs = [ce64(s, t, loss.center_global).mean() for ti, t in enumerate(t_views)
             for si, s in enumerate(s_views) if si != ti]
    assert len(pairs) == 10  # 2 teachers x 6 students, same-view pairs skipped
    torch.testing.assert_close(terms["global"].double(), torch.stack(pairs).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.global_sum.double(), teacher["cls_logits"].double().sum(0), rtol=1e-5,
                               atol=1e-5)
    assert stats.global_count == 2 * B


def test_center_update_uses_the_step_statistics():
    gen = torch.Generator().manual_seed(0)
    student, teacher, clean, mask, frac = _outputs(gen)
    loss = ASiTLoss(KC, KT, center_momentum=0.9)
    before = loss.center_global.clone()
    _, stats = loss(student, teacher, clean, mask, frac, TT)
    assert torch.equal(loss.center_global, before)  # the forward itself leaves the centres alone
    loss.update_centers_(stats)
    expected = 0.9 * before + 0.1 * teacher["cls_logits"].mean(0)
    torch.testing.assert_close(loss.center_global, expected)
    torch.testing.assert_close(loss.center_local, 0.1 * teacher["token_logits"].reshape(-1, KT).mean(0))

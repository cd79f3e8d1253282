"""The batched fbank against torchaudio's per-clip Kaldi fbank on many kinds of input."""

import math

import pytest
import torch
import torchaudio.compliance.kaldi as kaldi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asit.data import kaldi_fbank, normalize_fbank
from asit.data.fbank import KaldiFbank, batched_kaldi_fbank, num_fbank_frames

TOL = 1e-3  # max abs difference in log-mel (fp32)
RATES = (16000, 32000)


def _speech_like(n: int, sr: int, g: torch.Generator) -> torch.Tensor:
    """Harmonics of a wandering f0 shaped by three moving formants, in syllable-like bursts."""
    t = torch.arange(n, dtype=torch.float64) / sr
    f0 = 110 + 30 * torch.sin(2 * math.pi * 0.7 * t) + 20 * torch.rand((), generator=g, dtype=torch.float64)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / sr
    formants = [
        (700 + 200 * torch.sin(2 * math.pi * 1.3 * t), 90.0),
        (1200 + 400 * torch.cos(2 * math.pi * t), 110.0),
        (2600.0 + 0 * t, 160.0),
    ]
    wave = torch.zeros(n, dtype=torch.float64)
    for k in range(1, int(0.45 * sr / 140)):
        fk = k * f0
        gain = sum(torch.exp(-0.5 * ((fk - fc) / bw) ** 2) for fc, bw in formants) + 0.01
        wave += gain * torch.sin(k * phase) / k
    syllables = (torch.sin(2 * math.pi * 3.0 * t).clamp_min(0) ** 2)  # ~3 syllables per second
    wave = wave * syllables + 0.002 * torch.randn(n, generator=g, dtype=torch.float64)
    return (0.8 * wave / wave.abs().max()).float()


def _inputs(sr: int, seconds: float, g: torch.Generator) -> dict[str, torch.Tensor]:
    n = round(seconds * sr)
    t = torch.arange(n, dtype=torch.float64) / sr
    tonal = 0.5 * torch.sin(2 * math.pi * 440 * t) + 0.25 * torch.sin(2 * math.pi * 3150 * t + 1.0)
    noise = torch.randn(n, generator=g, dtype=torch.float64)
    clipped = (4 * torch.sin(2 * math.pi * 220 * t) + noise).clamp(-1, 1)  # saturated at ±1
    return {
        "speech": _speech_like(n, sr, g),
        "noise": 0.3 * torch.randn(n, generator=g),
        "tonal": (tonal + 0.1).float(),  # with a DC offset
        "clipped": clipped.float(),
        "silent": torch.zeros(n),
    }


def _reference(wave: torch.Tensor, sr: int, bins: int, frames: int) -> torch.Tensor:
    return kaldi_fbank(wave, sr, bins, frames)  # per clip, through torchaudio


@pytest.mark.parametrize("sr", RATES)
def test_matches_torchaudio_per_clip(sr):
    g = torch.Generator().manual_seed(sr)
    named = _inputs(sr, 6.0, g)
    waves = torch.stack(list(named.values()))  # [B, T], every row a different kind
    out = batched_kaldi_fbank(waves, sr)
    assert out.shape == (len(named), 592, 128) and out.dtype == torch.float32
    for i, (name, wave) in enumerate(named.items()):
        diff = (out[i] - _reference(wave, sr, 128, 592)).abs().max().item()
        assert diff <= TOL, f"{name} at {sr} Hz: max abs diff {diff}"
    floor = math.log(torch.finfo(torch.float32).eps)
    silent = out[list(named).index("silent")]
    assert torch.isfinite(silent).all()
    assert torch.equal(silent, torch.full((592, 128), floor))  # 598 frames, all at the floor


@pytest.mark.parametrize("sr", RATES)
@pytest.mark.parametrize("length", [0, 1, 10, 399, 400, 401, 800, 1123])
def test_very_short_inputs_match_and_pad(sr, length):
    g = torch.Generator().manual_seed(length)
    waves = torch.randn(3, length, generator=g) * torch.tensor([[0.01], [0.5], [1.0]])
    out = batched_kaldi_fbank(waves, sr, num_mel_bins=64, target_frames=12)
    assert out.shape == (3, 12, 64) and torch.isfinite(out).all()
    for i in range(3):
        assert (out[i] - _reference(waves[i], sr, 64, 12)).abs().max().item() <= TOL
    frames = num_fbank_frames(max(length, int(sr * 0.025)), int(sr * 0.025), int(sr * 0.01))
    assert not out[:, min(frames, 12):].any()  # missing frames are zeros, like kaldi_fbank


def test_all_frames_and_truncation():
    sr = 16000
    wave = 0.2 * torch.randn(2, 16000 + 123, generator=torch.Generator().manual_seed(1))
    full = batched_kaldi_fbank(wave, sr, num_mel_bins=80, target_frames=None)
    centred = wave[1] - wave[1].mean()
    ref = kaldi.fbank(centred.unsqueeze(0), htk_compat=True, sample_frequency=sr, use_energy=False,
                      window_type="hanning", num_mel_bins=80, dither=0.0, frame_shift=10, frame_length=25)
    assert full.shape == (2, ref.shape[0], 80)
    assert (full[1] - ref).abs().max() <= TOL
    cut = batched_kaldi_fbank(wave, sr, num_mel_bins=80, target_frames=50)
    assert torch.equal(cut, full[:, :50])


def test_module_and_function_agree_and_single_wave():
    sr = 32000
    wave = 0.1 * torch.randn(3, 40000, generator=torch.Generator().manual_seed(2))
    module = KaldiFbank(sr, 64, 100)
    assert module.state_dict() == {}  # buffers are derived, never saved
    assert torch.equal(module(wave), batched_kaldi_fbank(wave, sr, 64, 100))
    assert torch.equal(module(wave[1]), module(wave)[1])
    # fp16 input is computed in fp32; float64 stays float64 and agrees.
    assert module(wave.half()).dtype == torch.float32
    out64 = module(wave.double())
    assert out64.dtype == torch.float64
    assert (out64 - module(wave)).abs().max() <= TOL
    assert batched_kaldi_fbank(wave[:0], sr, 64, 100).shape == (0, 100, 64)


def test_normalize_in_place_is_bit_identical_to_normalize_fbank():
    sr = 16000
    g = torch.Generator().manual_seed(5)
    waves = 0.2 * torch.randn(3, 5 * sr + 123, generator=g)  # 499 frames, padded to 530
    mean, std = -4.2677393, 4.5689974
    plain = batched_kaldi_fbank(waves, sr, 64, 530)
    out = batched_kaldi_fbank(waves, sr, 64, 530, normalize=(mean, std))
    assert torch.equal(out, normalize_fbank(plain, mean, std))  # padded frames included
    # One clip alone against the batch: bit-identical with few threads, but a many-core CPU splits the
    # FFT of a batch of 3 and of 1 differently (1.4e-6 on a 16-core machine, 2026-11-27).
    one = KaldiFbank(sr, 64, 530)(waves[1], normalize=(mean, std))
    assert (one - out[1]).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="std must be positive"):
        batched_kaldi_fbank(waves, sr, 64, 530, normalize=(mean, 0.0))


def test_pure_torch_path_agrees_with_the_numpy_cpu_path(monkeypatch):
    """The path other devices run (dense mel matmul, torch log), checked here on the CPU."""
    import asit.data.fbank as fbank

    sr = 32000
    g = torch.Generator().manual_seed(7)
    waves = torch.stack(list(_inputs(sr, 2.0, g).values()))
    fast = batched_kaldi_fbank(waves, sr, 128, 211, normalize=(-4.0, 4.0))
    monkeypatch.setattr(fbank, "_NUMPY_ON_CPU", False)
    plain = batched_kaldi_fbank(waves, sr, 128, 211, normalize=(-4.0, 4.0))
    assert (plain - fast).abs().max().item() <= 1e-5


@pytest.mark.parametrize("numpy_on_cpu", [True, False])
def test_autocast_does_not_lower_the_precision(monkeypatch, numpy_on_cpu):
    """Under autocast the mel matmul would run in bfloat16 (8e-3 off on the pure-torch path): it is disabled."""
    import asit.data.fbank as fbank

    monkeypatch.setattr(fbank, "_NUMPY_ON_CPU", numpy_on_cpu)
    wave = 0.3 * torch.randn(3, 32000, generator=torch.Generator().manual_seed(8))
    plain = batched_kaldi_fbank(wave, 16000, 64, 100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = batched_kaldi_fbank(wave, 16000, 64, 100)
    assert out.dtype == torch.float32 and torch.equal(out, plain)


def test_tf32_guard_projects_in_float64(monkeypatch):
    """Where TF32 could round the mel matmul's inputs (CUDA with it enabled), the projection runs in
    float64: the branch, forced here on the CPU, agrees with the float32 one to float32 rounding."""
    import asit.data.fbank as fbank

    assert not fbank._matmul_may_use_tf32(torch.device("cpu"))
    monkeypatch.setattr(fbank, "_NUMPY_ON_CPU", False)
    wave = 0.3 * torch.randn(3, 32000, generator=torch.Generator().manual_seed(9))
    plain = batched_kaldi_fbank(wave, 16000, 64, 100)
    monkeypatch.setattr(fbank, "_matmul_may_use_tf32", lambda device: True)
    guarded = batched_kaldi_fbank(wave, 16000, 64, 100)
    assert guarded.dtype == torch.float32 and not torch.equal(guarded, plain)  # the other branch ran
    assert (guarded - plain).abs().max().item() <= 1e-5


def test_input_that_requires_grad_is_detached():
    """A feature extractor: a wave that requires grad gives the same values, with no graph."""
    sr = 16000
    wave = 0.3 * torch.randn(2, 9000, generator=torch.Generator().manual_seed(6))
    out = batched_kaldi_fbank(wave.clone().requires_grad_(True), sr, 40, 50)
    assert not out.requires_grad and torch.equal(out, batched_kaldi_fbank(wave, sr, 40, 50))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="sample_rate"):
        KaldiFbank(0)
    with pytest.raises(ValueError, match="num_mel_bins"):
        KaldiFbank(16000, num_mel_bins=2)
    with pytest.raises(ValueError, match="target_frames"):
        KaldiFbank(16000, target_frames=0)
    module = KaldiFbank(16000)
    with pytest.raises(TypeError, match="floating-point"):
        module(torch.zeros(2, 100, dtype=torch.int16))
    with pytest.raises(ValueError, match="shape"):
        module(torch.zeros(2, 2, 100))


# Between devices the FFTs differ, and float32 rounding in near-empty bins (pure tones) moves their
# log by about 1e-3: the exact (float64) fbank of the tonal input is itself 1.2e-3 from torchaudio's
# float32 result on the CPU (test_float64_fbank_shows_the_float32_rounding_floor). On an H200
# (2026-11-27) the CUDA fbank was 1.6e-3 from the CPU one.
CROSS_DEVICE_TOL = 3e-3


def test_float64_fbank_shows_the_float32_rounding_floor():
    """Why the cross-device tolerance is wider than TOL: even the exact fbank (float64) is about TOL
    (1.2e-3) away from torchaudio's float32 one on a pure tone, while ours matches it to a few ulps."""
    sr = 32000
    tonal = _inputs(sr, 6.0, torch.Generator().manual_seed(3))["tonal"]
    ref = _reference(tonal, sr, 128, 592)
    assert (batched_kaldi_fbank(tonal[None], sr)[0] - ref).abs().max().item() <= 1e-5
    exact = (batched_kaldi_fbank(tonal[None].double(), sr)[0].float() - ref).abs().max().item()
    assert 0.5 * TOL < exact <= CROSS_DEVICE_TOL  # the scale of float32 rounding in near-empty bins


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stays_within_the_float32_floor_of_torchaudio_on_cuda():
    """On the GPU, float32 rounding alone puts torchaudio's own fbank up to 1.2e-3 (32 kHz) and 3.7e-3
    (16 kHz) from the exact (float64) fbank on a pure tone, and ours 1.9e-3 from torchaudio's (measured
    on an H200, 2026-11-27: the ``fbank_accuracy`` rows of ``bench/results/results.csv``), so the CPU's
    1e-3 parity cannot hold there. What must hold: ours is no further from the exact fbank than
    torchaudio on the GPU is, plus TOL, and within the cross-device tolerance of the CPU results."""
    sr = 32000
    g = torch.Generator().manual_seed(3)
    named = _inputs(sr, 6.0, g)
    waves = torch.stack(list(named.values()))
    cpu = batched_kaldi_fbank(waves, sr)
    exact = batched_kaldi_fbank(waves.double(), sr).float()
    cuda = batched_kaldi_fbank(waves.cuda(), sr)
    assert cuda.device.type == "cuda"
    for row, (name, wave) in enumerate(named.items()):
        # the float64 fbank is anchored to torchaudio on the CPU, so a bug shared by our float32 and
        # float64 paths cannot pass as a small distance
        assert (exact[row] - _reference(wave, sr, 128, 592)).abs().max().item() <= CROSS_DEVICE_TOL
        theirs = (_reference(wave.cuda(), sr, 128, 592).cpu() - exact[row]).abs().max().item()
        ours = (cuda[row].cpu() - exact[row]).abs().max().item()
        assert ours <= theirs + TOL, f"{name}: {ours:.2e} from the exact fbank, torchaudio on CUDA {theirs:.2e}"
    assert (cuda.cpu() - cpu).abs().max().item() <= CROSS_DEVICE_TOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fbank_keeps_precision_with_tf32_and_autocast(monkeypatch):
    sr = 32000
    waves = torch.stack(list(_inputs(sr, 3.0, torch.Generator().manual_seed(4)).values())).cuda()
    plain = batched_kaldi_fbank(waves, sr)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        guarded = batched_kaldi_fbank(waves, sr)
    assert guarded.dtype == torch.float32 and (guarded - plain).abs().max().item() <= 1e-5


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sr=st.sampled_from(RATES),
    length=st.integers(0, 12000),
    amplitude=st.floats(1e-4, 1.0),
    offset=st.floats(-0.5, 0.5),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_lengths_and_amplitudes(sr, length, amplitude, offset, seed):
    g = torch.Generator().manual_seed(seed)
    waves = offset + amplitude * torch.randn(3, length, generator=g)
    waves[1] = waves[1].clamp(-amplitude / 3, amplitude / 3)
    out = batched_kaldi_fbank(waves, sr, num_mel_bins=40, target_frames=64)
    assert torch.isfinite(out).all()
    for i in range(3):
        assert (out[i] - _reference(waves[i], sr, 40, 64)).abs().max().item() <= TOL

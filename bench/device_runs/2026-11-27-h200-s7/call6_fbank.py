"""Call 6 of session 7: how far the CUDA fbank (ours and torchaudio's) is from the exact (float64) one,
per input kind, to size the same-device tolerance on CUDA; and batched vs single on this machine's CPU."""
import sys

import torch

sys.path.insert(0, "tests")
from test_data_fbank_batched import _inputs, _reference  # noqa: E402

from asit.data.fbank import KaldiFbank, batched_kaldi_fbank  # noqa: E402

for sr in (16000, 32000):
    named = _inputs(sr, 6.0, torch.Generator().manual_seed(3))
    waves = torch.stack(list(named.values()))
    exact = batched_kaldi_fbank(waves.double(), sr).float()
    ours = batched_kaldi_fbank(waves.cuda(), sr).cpu()
    ours_cpu = batched_kaldi_fbank(waves, sr)
    for row, (name, wave) in enumerate(named.items()):
        ta_cuda = _reference(wave.cuda(), sr, 128, 592).cpu()
        ta_cpu = _reference(wave, sr, 128, 592)
        d = lambda a, b: f"{(a - b).abs().max().item():.2e}"  # noqa: E731
        print(f"sr={sr} {name:12s} ours_cuda-ta_cuda {d(ours[row], ta_cuda)}"
              f"  ours_cuda-exact {d(ours[row], exact[row])}"
              f"  ta_cuda-exact {d(ta_cuda, exact[row])}  ta_cpu-exact {d(ta_cpu, exact[row])}"
              f"  ours_cpu-ta_cpu {d(ours_cpu[row], ta_cpu)}  ours_cuda-ours_cpu {d(ours[row], ours_cpu[row])}")
g = torch.Generator().manual_seed(5)
waves = 0.2 * torch.randn(3, 5 * 16000 + 123, generator=g)
out = batched_kaldi_fbank(waves, 16000, 64, 530, normalize=(-4.2677393, 4.5689974))
one = KaldiFbank(16000, 64, 530)(waves[1], normalize=(-4.2677393, 4.5689974))
print("cpu batched vs single:", (out[1] - one).abs().max().item(), "threads", torch.get_num_threads())

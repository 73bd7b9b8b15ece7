import sys
import time

import torch

sys.path.insert(0, "src")
from patchad.ops.knn import knn, squared_norms

torch.manual_seed(0)
for n, d in [(2000, 152), (21000, 152), (200000, 152), (40000, 1536)]:
    bank = torch.randn(n, d)
    q = torch.randn(8192, d)
    sq = squared_norms(bank)
    for be in ["torch", "faiss"]:
        knn(q[:100], bank, 1, bank_sq=sq, backend=be)
        t = time.perf_counter()
        knn(q, bank, 1, bank_sq=sq, backend=be)
        dt = time.perf_counter() - t
        print(n, d, be, f"{dt * 1000:.0f} ms", flush=True)

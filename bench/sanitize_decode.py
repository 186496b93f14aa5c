"""A representative set of decode launches to run under compute-sanitizer (GPU only).

    compute-sanitizer --tool memcheck  --error-exitcode 9 python bench/sanitize_decode.py
    compute-sanitizer --tool racecheck --error-exitcode 9 python bench/sanitize_decode.py

Ragged batch (0, 3 and 40 pages; 5, 0 and 63 residual tokens), splits merged by the last CTA, two
geometries (d = 128 / M = 64 / GQA 4 / page 64, and d = 64 / M = 16 / GQA 4 / page 16).
Both tools reported no error and no hazard on an H200 (2026-11-27).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cupy as cp  # noqa: E402
import numpy as np  # noqa: E402

from million_cupy.cache import pack_pages  # noqa: E402
from million_cupy.decode import paged_pq_decode  # noqa: E402

CASES = [(128, 64, 32, 8, 64), (64, 16, 8, 2, 16)]  # d, M, nh, nh_k, page size


def main() -> None:
    rng = np.random.default_rng(0)
    pages, res = np.array([0, 3, 40]), np.array([5, 0, 63])
    for d, M, nh, nh_k, P in CASES:
        n = int(pages.sum()) + 2
        kp, vp = pack_pages(*cp.asarray(rng.integers(0, 256, (2, n, nh_k, P, M), dtype=np.uint8)))
        indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
        ids = cp.asarray(rng.permutation(n)[: pages.sum()].astype(np.int32))
        kc = cp.asarray(rng.standard_normal((1, M, 256, d // M)).astype(np.float32))
        vc = cp.asarray(rng.standard_normal((1, M, 256, d // M)).astype(np.float32))
        ring = cp.asarray(rng.standard_normal((3, nh_k, 64, d)).astype(np.float16))
        q = cp.asarray(rng.standard_normal((3, nh, d)).astype(np.float16))
        out, _ = paged_pq_decode(q, kp, vp, indptr, ids, kc, vc, residual_k=ring, residual_v=ring,
                                 residual_lens=res, return_lse=True)
        cp.cuda.Device().synchronize()
        print(f"d={d} M={M}: finite output {bool(cp.isfinite(out).all())}")


if __name__ == "__main__":
    main()

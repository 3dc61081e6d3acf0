"""Log-linear latency histograms on shm (recorded by ``_prims.Histogram``), merged with numpy.

Word layout of one histogram (``HIST_WORDS`` int64 words): [0] count [1] sum [2] max [3] min,
then ``HIST_BUCKETS`` buckets; values < 8 have exact buckets, above that each power of two is
split in 8 sub-buckets (<= 12.5 % relative error).

Sampled latency (``Histogram(mem, i, every=N)``, hot paths): 1 operation in about N is timed and
recorded with the weight of the interval it ends (see ``ipc/prims/hist.c``), so [0] count is exact once
settled, while [1] sum, min, max and the buckets describe the sampled values (weighted). The
quantiles and the mean are therefore taken over the bucket total, which the unsampled operations
of an open interval (counted by ``settle``) do not reach.
"""

from __future__ import annotations

import numpy as np

from ipc import _prims

HIST_WORDS = _prims.HIST_WORDS
HIST_HDR = _prims.HIST_HDR
HIST_BUCKETS = _prims.HIST_BUCKETS
SUB = 1 << _prims.HIST_SUB_BITS
I64_MAX = np.iinfo(np.int64).max


def init(arr: np.ndarray) -> None:
    """Reset histograms: ``arr[..., :]`` are HIST_WORDS-word histograms."""
    arr[...] = 0
    arr[..., 3] = I64_MAX


def _bounds() -> tuple[np.ndarray, np.ndarray]:
    """Inclusive value range of every bucket. Buckets past the one of INT64_MAX cannot be hit;
    their bounds are pinned to INT64_MAX (instead of overflowing)."""
    lo = np.empty(HIST_BUCKETS, dtype=np.int64)
    hi = np.empty(HIST_BUCKETS, dtype=np.int64)
    for b in range(HIST_BUCKETS):
        if b < SUB:
            lo[b] = hi[b] = b
            continue
        shift = b // SUB - 1
        blo = (SUB + b % SUB) << shift
        lo[b] = min(blo, int(I64_MAX))
        hi[b] = min(blo + (1 << shift) - 1, int(I64_MAX))
    return lo, hi


BUCKET_LO, BUCKET_HI = _bounds()


def merge(hists: np.ndarray) -> np.ndarray:
    """Merge any number of histograms (leading axes) into one HIST_WORDS vector."""
    h = hists.reshape(-1, HIST_WORDS)
    out = np.zeros(HIST_WORDS, dtype=np.int64)
    out[0] = h[:, 0].sum()
    out[1] = h[:, 1].sum()
    out[2] = h[:, 2].max(initial=0)
    out[3] = h[:, 3].min(initial=I64_MAX)
    out[HIST_HDR:] = h[:, HIST_HDR:].sum(axis=0)
    return out


def summary(h: np.ndarray, quantiles=(0.5, 0.99, 0.999)) -> dict:
    """count, mean, min, max and quantiles (bucket upper bound, clipped to max) of one histogram."""
    count = int(h[0])
    out: dict = {"count": count}
    buckets = h[HIST_HDR:HIST_HDR + HIST_BUCKETS]
    cum = np.cumsum(buckets)
    weight = int(cum[-1])  # = count, unless some operations are counted but not sampled
    if count == 0 or weight == 0:
        out.update({"mean_ns": 0, "min_ns": 0, "max_ns": 0})
        out.update({f"p{_qname(q)}_ns": 0 for q in quantiles})
        return out
    mx = int(h[2])
    for q in quantiles:
        idx = int(np.searchsorted(cum, max(1, int(np.ceil(q * weight)))))
        out[f"p{_qname(q)}_ns"] = int(min(BUCKET_HI[min(idx, HIST_BUCKETS - 1)], mx))
    out["mean_ns"] = int(h[1]) // weight
    out["min_ns"] = int(h[3])
    out["max_ns"] = mx
    return out


def _qname(q: float) -> str:
    s = f"{q * 100:g}".replace(".", "")
    return s

"""The data side of the loop: length bucketing, the tracked test set, and each step's batches.

Everything here works on host (numpy) arrays of the prepared experiment (``data.npz``, see
`finetune.experiment`) and places the result on the device mesh (`finetune.distributed`); the
jitted programs that consume it are in `finetune.steps`.

Length bucketing: a training step pads its batches (all R runs) to a multiple of
``length_multiple`` of their own longest input (`gather_batch`), and the tracked set is cut into
at most ``tracked_buckets`` buckets of equal padded length, chosen to minimise padding
(`bucket_lengths`, `make_tracked_set`), so jit compiles once per distinct length instead of
padding everything to the maximum. With ``train_length_groups`` (IA3), the R x b examples of a
step are instead sorted by length into groups of fixed padded length (`flat_group_lengths`,
`gather_flat`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from finetune.distributed import batch_sharding, put, rows_sharding
from finetune.tasks import round_up

__all__ = [
    "TrackedSet",
    "bucket_lengths",
    "flat_group_lengths",
    "gather_batch",
    "gather_flat",
    "make_tracked_set",
    "put_batch",
    "put_groups",
]


@dataclass
class TrackedSet:
    """The tracked test set cut into length buckets.

    Attributes:
        buckets: tuple of {"inputs": [n_k, L_k], "targets": [n_k, T], "choices": [n_k, C, T]}.
        index: int [sum n_k]: the test example of each row of the concatenated buckets (rows
            beyond the real examples repeat one, so each bucket divides over the devices).
        labels: int [n_test].
    """

    buckets: tuple
    index: np.ndarray
    labels: np.ndarray
    n: int

    def scatter(self, rows: np.ndarray) -> np.ndarray:
        """[..., sum n_k] in bucket order -> [..., n] in test order."""
        out = np.empty(rows.shape[:-1] + (self.n,), rows.dtype)
        out[..., self.index] = rows
        return out


def bucket_lengths(
    lengths: np.ndarray, *, multiple: int, max_buckets: int | None, n_devices: int = 1
) -> np.ndarray:
    """The padded length of each example when at most ``max_buckets`` lengths are allowed.

    Each length is first rounded up to a multiple of ``multiple``; when that leaves more than
    ``max_buckets`` distinct values, neighbouring values are merged (each group padded to its
    largest) by an exact dynamic program that minimises the padded tokens, counting each group's
    rows rounded up to a multiple of ``n_devices`` as they are laid out. Every bucket is one
    traced forward pass in the logging program, so fewer buckets compile faster.

    Args:
        lengths: int [n] unpadded input lengths.
        multiple: pad to a multiple of this.
        max_buckets: the most distinct padded lengths (None: no limit).
        n_devices: rows of each bucket are padded to a multiple of this.

    Returns:
        int [n] padded length per example.
    """
    padded = np.asarray([round_up(int(n), multiple) for n in lengths], np.int64)
    values, counts = np.unique(padded, return_counts=True)
    m = len(values)
    if max_buckets is None or m <= max_buckets:
        return padded
    k_max = max_buckets
    csum = np.concatenate([[0], np.cumsum(counts)])

    def cost(a: int, b: int) -> int:  # one bucket over distinct values a..b (inclusive)
        rows = int(csum[b + 1] - csum[a])
        return (-(-rows // n_devices) * n_devices) * int(values[b])

    inf = float("inf")
    # best[k][j]: least padded tokens for values 0..j-1 in k buckets; cut[k][j]: its last start.
    best = [[inf] * (m + 1) for _ in range(k_max + 1)]
    cut = [[0] * (m + 1) for _ in range(k_max + 1)]
    best[0][0] = 0
    for k in range(1, k_max + 1):
        for j in range(1, m + 1):
            for a in range(k - 1, j):  # last bucket covers values a..j-1
                c = best[k - 1][a] + cost(a, j - 1)
                if c < best[k][j]:
                    best[k][j], cut[k][j] = c, a
    k = min(range(1, k_max + 1), key=lambda kk: (best[kk][m], kk))
    target = np.empty(m, np.int64)
    j = m
    while k > 0:
        a = cut[k][j]
        target[a:j] = values[j - 1]
        j, k = a, k - 1
    return target[np.searchsorted(values, padded)]


def make_tracked_set(
    inputs: np.ndarray,
    targets: np.ndarray,
    choices: np.ndarray,
    labels: np.ndarray,
    lengths: np.ndarray,
    *,
    multiple: int,
    n_devices: int,
    mesh=None,
    max_buckets: int | None = None,
) -> TrackedSet:
    """Buckets the tracked set by padded input length (see `bucket_lengths`).

    Args:
        inputs: int32 [n, L_max]; targets int32 [n, T]; choices int32 [n, C, T].
        labels: int [n]; lengths: int [n] unpadded input lengths.
        multiple: pad to a multiple of this.
        n_devices: rows of each bucket are padded (repeating one) to a multiple of this.
        mesh: place the buckets on it, rows split over "data"; None: keep host arrays.
        max_buckets: the most distinct padded lengths (None: no limit).

    Returns:
        The `TrackedSet`.
    """
    padded = bucket_lengths(
        lengths, multiple=multiple, max_buckets=max_buckets, n_devices=n_devices
    )
    buckets, index = [], []
    for length in sorted(set(padded.tolist())):
        ids = np.flatnonzero(padded == length)
        extra = (-len(ids)) % n_devices
        ids = np.concatenate([ids, np.full(extra, ids[-1])])
        b = {"inputs": inputs[ids, :length], "targets": targets[ids], "choices": choices[ids]}
        if mesh is not None:
            b = {k: put(v, NamedSharding(mesh, P("data"))) for k, v in b.items()}
        buckets.append(b)
        index.append(ids)
    return TrackedSet(tuple(buckets), np.concatenate(index), np.asarray(labels), len(lengths))


def gather_batch(
    pool_inputs: np.ndarray,
    pool_targets: np.ndarray,
    pool_lengths: np.ndarray,
    ids: np.ndarray,
    multiple: int,
) -> dict[str, np.ndarray]:
    """The batches of one step of R runs, padded to a multiple of their own longest input.

    Args:
        pool_inputs: int32 [n_train, L_max]; pool_targets int32 [n_train, T].
        pool_lengths: int [n_train] unpadded input lengths.
        ids: int [R, b] pool positions.
        multiple: pad the input length to a multiple of this.

    Returns:
        {"inputs": int32 [R, b, L], "targets": int32 [R, b, T]}.
    """
    length = min(round_up(int(pool_lengths[ids].max()), multiple), pool_inputs.shape[1])
    return {"inputs": pool_inputs[ids, :length], "targets": pool_targets[ids]}


def flat_group_lengths(
    pool_lengths: np.ndarray, ids: np.ndarray, groups: int, multiple: int, width: int
) -> tuple[int, ...]:
    """Padded input length of each length group, fixed for all steps of a group of runs.

    At every step the R x b examples are sorted by length and cut into ``groups`` consecutive
    groups (``np.array_split`` sizes); a group's length is the longest input it ever holds,
    rounded up to ``multiple`` (at most ``width``). Fixed lengths: one compile per group of
    runs, whatever the curricula.

    Args:
        pool_lengths: int [n_train] unpadded input lengths.
        ids: int [R, T, b] pool positions of every step of the runs.
        groups: number of length groups.
        multiple: pad to a multiple of this.
        width: the padded width of the pool's inputs.

    Returns:
        ``groups`` lengths, non-decreasing.
    """
    r, t, b = ids.shape
    lengths = np.sort(pool_lengths[np.moveaxis(ids, 1, 0).reshape(t, r * b)], axis=1)  # [T, N]
    out = []
    for part in np.array_split(np.arange(r * b), groups):
        longest = int(lengths[:, part[-1]].max())
        out.append(min(round_up(longest, multiple), width))
    return tuple(out)


def gather_flat(
    pool_inputs: np.ndarray,
    pool_targets: np.ndarray,
    pool_lengths: np.ndarray,
    ids: np.ndarray,
    group_lengths: Sequence[int],
) -> tuple[dict[str, np.ndarray], ...]:
    """The examples of one step of R runs, sorted by length into fixed-length groups.

    Args:
        pool_inputs: int32 [n_train, L_max]; pool_targets int32 [n_train, T].
        pool_lengths: int [n_train] unpadded input lengths.
        ids: int [R, b] pool positions.
        group_lengths: from `flat_group_lengths` (covers every step of these runs).

    Returns:
        One {"inputs": int32 [n_g, L_g], "targets": int32 [n_g, T], "run": int32 [n_g]} per
        group; a stable sort, so ties keep run-major order (deterministic).

    Raises:
        ValueError: an input is longer than its group's length (``group_lengths`` was computed
            for other steps).
    """
    r, b = ids.shape
    flat = ids.reshape(-1)
    run = np.repeat(np.arange(r, dtype=np.int32), b)
    order = np.argsort(pool_lengths[flat], kind="stable")
    out = []
    for part, length in zip(np.array_split(order, len(group_lengths)), group_lengths, strict=True):
        sel = flat[part]
        if pool_lengths[sel].max() > length:
            raise ValueError(
                f"an input of length {pool_lengths[sel].max()} exceeds its group's {length}"
            )
        out.append(
            {"inputs": pool_inputs[sel, :length], "targets": pool_targets[sel], "run": run[part]}
        )
    return tuple(out)


def put_batch(batch: dict[str, np.ndarray], mesh) -> dict:
    """A `gather_batch` batch ``[R, b, ...]`` on ``mesh``, its b axis split over "data" when
    b divides over the devices (else replicated; `finetune.distributed.batch_sharding`)."""
    sharding = batch_sharding(mesh, batch["inputs"].shape[1])
    return {k: put(v, sharding) for k, v in batch.items()}


def put_groups(groups: Sequence[dict[str, np.ndarray]], mesh) -> tuple[dict, ...]:
    """`gather_flat` groups on ``mesh``, each group's rows split over "data" when they divide
    over the devices (else replicated; `finetune.distributed.rows_sharding`)."""
    return tuple({k: put(v, rows_sharding(mesh, len(v))) for k, v in g.items()} for g in groups)

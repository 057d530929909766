"""Multistage contrastive learning (MCL): embedding, clustering, and the cluster-homogeneous batch sampler.

At every MCL stage the pairs are embedded with the current model, k-means runs separately on the image and the
text embeddings (k per modality; CLIP-MoE: 3 and 3), the joint label ``k_img * c_text + c_image`` is accumulated
over stages (``y = y * k_img * k_text + c``), and the next stage trains with every *global* batch (all processes)
drawn from one accumulated cluster, so the negatives of an anchor are the pairs its earlier stages confused it
with. This follows CLIP-MoE's official sampler, with two fixes: the shuffle is seeded explicitly (not by the
default generator happening to agree on all ranks), and the samples of clusters smaller than a global batch
and the remainders of larger ones are counted and reported, or pooled into mixed batches on request.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.cluster import MiniBatchKMeans
from torch.utils.data import Sampler

__all__ = ["HELD_OUT", "UNREADABLE", "ClusterBatchSampler", "SamplerStats", "accumulate_labels", "kmeans_labels"]

# batch labels below 0: samples not trained on, and why
HELD_OUT = -1  # the validation pairs
UNREADABLE = -2  # training pairs whose image could not be read when they were clustered


def kmeans_labels(features: np.ndarray, k: int, seed: int) -> np.ndarray:
    """MiniBatchKMeans (k-means++ init) on L2-normalised features, CLIP-MoE's settings; returns (N,) labels."""
    if len(features) < k:
        raise ValueError(f"cannot make {k} clusters from {len(features)} samples")
    km = MiniBatchKMeans(n_clusters=k, batch_size=min(len(features), 1_000_000), max_iter=500, tol=1e-5,
                         n_init="auto", random_state=seed)
    return km.fit_predict(features.astype(np.float32)).astype(np.int64)


def accumulate_labels(previous: np.ndarray | None, image_labels: np.ndarray, text_labels: np.ndarray,
                      k_image: int, k_text: int, valid: np.ndarray | None = None) -> np.ndarray:
    """Accumulated pseudo-labels, compacted to 0..C-1; -1 marks samples excluded (``valid`` False)."""
    joint = text_labels * k_image + image_labels
    combined = joint if previous is None else previous * (k_image * k_text) + joint
    if valid is None:
        valid = np.ones(len(combined), dtype=bool)
    if previous is not None:
        valid = valid & (previous >= 0)
    out = np.full(len(combined), -1, dtype=np.int64)
    _, compact = np.unique(combined[valid], return_inverse=True)
    out[valid] = compact
    return out


@dataclass
class SamplerStats:
    clusters: int = 0
    batches: int = 0
    samples_used: int = 0
    samples_left_over: int = 0
    clusters_below_global_batch: int = 0
    excluded: int = 0  # held_out + unreadable
    held_out: int = 0
    unreadable: int = 0
    mixed_batches: int = 0
    cluster_sizes: list[int] = field(default_factory=list)

    def summary(self, policy: str) -> str:
        fate = "pooled into mixed batches" if policy == "mixed" else "not used this epoch"
        return (f"{self.clusters} clusters, {self.batches} global batches, {self.samples_used} samples used; "
                f"{self.samples_left_over} samples ({self.clusters_below_global_batch} clusters smaller than a "
                f"global batch, plus remainders) {fate}; {self.held_out} held out for validation"
                + (f", {self.unreadable} unreadable" if self.unreadable else ""))


class ClusterBatchSampler(Sampler[list[int]]):
    """Yields this process's share of global batches that each come from one cluster.

    All processes build the same list of global batches from ``(seed, epoch)``; process ``rank`` takes the slice
    ``[rank * batch_size, (rank + 1) * batch_size)`` of each, so the processes step through the clusters in
    lockstep. Clusters are visited cyclically (cluster 0's first batch, cluster 1's first batch, ...), as the
    official sampler. With one cluster (all labels equal) this is an ordinary shuffled batch sampler.

    Args:
        labels: (N,) cluster id per sample; below 0 excludes a sample (`HELD_OUT`, `UNREADABLE`).
        batch_size: per-process batch size; a global batch is ``batch_size * num_replicas``.
        leftover: "drop" (CLIP-MoE: samples that do not fill a global batch of their cluster are not used this
            epoch, and counted) or "mixed" (they are pooled, shuffled and emitted as mixed-cluster batches last).
        start_batch: skip the first global batches (resuming mid-epoch).
    """

    def __init__(self, labels, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 leftover: str = "drop", start_batch: int = 0):
        if leftover not in ("drop", "mixed"):
            raise ValueError(f"leftover must be 'drop' or 'mixed', got {leftover!r}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.leftover = leftover
        self.start_batch = start_batch
        self.epoch = 0
        self.stats = SamplerStats()
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def global_batches(self) -> list[list[int]]:
        """The epoch's global batches (lists of sample indices), identical on every process."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        global_size = self.batch_size * self.num_replicas
        clusters = sorted(int(c) for c in np.unique(self.labels) if c >= 0)
        per_cluster, left = [], []
        stats = SamplerStats(clusters=len(clusters), excluded=int((self.labels < 0).sum()),
                             held_out=int((self.labels == HELD_OUT).sum()),
                             unreadable=int((self.labels < 0).sum() - (self.labels == HELD_OUT).sum()))
        for c in clusters:
            members = np.flatnonzero(self.labels == c)
            stats.cluster_sizes.append(len(members))
            members = members[torch.randperm(len(members), generator=g).numpy()]
            full = len(members) // global_size * global_size
            if full == 0:
                stats.clusters_below_global_batch += 1
            per_cluster.append([members[i:i + global_size].tolist() for i in range(0, full, global_size)])
            left.extend(members[full:].tolist())
        batches = []
        for round_ in range(max((len(b) for b in per_cluster), default=0)):
            batches.extend(b[round_] for b in per_cluster if round_ < len(b))
        if self.leftover == "mixed" and left:
            pool = np.asarray(left)[torch.randperm(len(left), generator=g).numpy()]
            full = len(pool) // global_size * global_size
            mixed = [pool[i:i + global_size].tolist() for i in range(0, full, global_size)]
            stats.mixed_batches = len(mixed)
            batches.extend(mixed)
            left = pool[full:].tolist()
        stats.batches = len(batches)
        stats.samples_used = len(batches) * global_size
        stats.samples_left_over = len(left)
        self.stats = stats
        self._cache = (self.epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for batch in self.global_batches()[self.start_batch:]:
            yield batch[lo:hi]

    def __len__(self) -> int:
        return max(0, len(self.global_batches()) - self.start_batch)

"""The plain container every part of fedeid passes images in."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ImageSet:
    """Grey-level images with who they belong to and what they show.

    ``images`` float32 [N, H, W] in [0, 1]; ``patient_ids`` int64 [N] (patients are the unit of
    identity: several images share one id); ``labels`` float32 [N, F] multi-label 0/1 findings
    named by ``finding_names``; ``sites`` int64 [N] (the hospital). ``sources`` holds the file
    each image came from, where there is one.
    """

    images: np.ndarray
    patient_ids: np.ndarray
    labels: np.ndarray
    finding_names: tuple[str, ...]
    sites: np.ndarray
    sources: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim != 3:
            raise ValueError(f"images must be [N, H, W], got shape {self.images.shape}")
        for name in ("patient_ids", "labels", "sites"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} rows for {n} images")
        if self.labels.ndim != 2 or self.labels.shape[1] != len(self.finding_names):
            raise ValueError(f"labels {self.labels.shape} do not match findings {self.finding_names}")
        if self.sources and len(self.sources) != n:
            raise ValueError(f"sources has {len(self.sources)} entries for {n} images")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, index: np.ndarray | list[int]) -> ImageSet:
        idx = np.asarray(index, dtype=np.int64)
        return ImageSet(
            images=self.images[idx],
            patient_ids=self.patient_ids[idx],
            labels=self.labels[idx],
            finding_names=self.finding_names,
            sites=self.sites[idx],
            sources=[self.sources[i] for i in idx] if self.sources else [],
        )

    def with_images(self, images: np.ndarray) -> ImageSet:
        """The same patients and labels over other pixels (a de-identified copy, say)."""
        return ImageSet(images.astype(np.float32, copy=False), self.patient_ids, self.labels,
                        self.finding_names, self.sites, list(self.sources))

    @staticmethod
    def concat(sets: list[ImageSet]) -> ImageSet:
        if not sets:
            raise ValueError("nothing to concatenate")
        return ImageSet(
            images=np.concatenate([s.images for s in sets]),
            patient_ids=np.concatenate([s.patient_ids for s in sets]),
            labels=np.concatenate([s.labels for s in sets]),
            finding_names=sets[0].finding_names,
            sites=np.concatenate([s.sites for s in sets]),
            sources=[p for s in sets for p in s.sources] if all(s.sources for s in sets) else [],
        )

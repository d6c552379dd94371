"""The per-patient answer: how many nodules, the largest one's size band, and one malignancy score.

The size category follows Lung-RADS v2022's baseline bands for solid nodules, on our estimated
diameter alone: a size-based screening aid, not a diagnosis (Lung-RADS also weighs a nodule's type,
growth and other findings, none of which this tool sees). The patient's malignancy score combines
the nodules' probabilities as grt123, the Data Science Bowl 2017 winner, does: a leaky noisy-OR over
the five most probable nodules (docs/experiments.md, "Per-patient summary", says how the leak is set).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# (upper bound in mm, category): under 6 mm is 2, 6 to under 8 is 3, 8 to under 15 is 4A, 15 or more 4B
SIZE_BANDS = ((6.0, "2"), (8.0, "3"), (15.0, "4A"), (float("inf"), "4B"))
NO_NODULE = "1"
CATEGORY_NOTE = "Lung-RADS v2022 baseline size band of the largest solid nodule: a size-based screening aid, " \
                "not a diagnosis"
TOP_NODULES = 5  # grt123 combines its five most confident nodules
# The chance that the patient has a malignant nodule the detector did not report: a missed nodule is
# mostly small (LUNA16: 4.4% malignant under 6 mm), about 1 in 5 is missed at CPM 0.8, and a scan with
# nodules holds about 2 (1,182 in 600 LUNA16 series): 1 - (1 - 0.2 * 0.044) ** 2 = 0.018, rounded to 0.02.
MALIGNANCY_LEAK = 0.02


@dataclass(frozen=True)
class PatientSummary:
    detections: int  # at or above the threshold
    largest_diameter_mm: float | None
    category: str  # "1", "2", "3", "4A" or "4B"
    malignancy_score: float | None  # None without a malignancy model
    category_note: str = CATEGORY_NOTE

    def record(self) -> dict:
        return asdict(self)

    def headline(self) -> str:
        """One line for the console table's header and the report page."""
        found = "no detections" if self.largest_diameter_mm is None else \
            f"{self.detections} detection(s), largest {self.largest_diameter_mm:.1f} mm"
        score = "" if self.malignancy_score is None else f", patient malignancy score {self.malignancy_score:.3f}"
        return (f"{found}; size category {self.category} (Lung-RADS v2022 size band, a screening aid, "
                f"not a diagnosis){score}")


def size_category(diameter_mm: float | None) -> str:
    """Lung-RADS v2022's baseline band for a solid nodule of this diameter; None (no nodule): "1"."""
    if diameter_mm is None:
        return NO_NODULE
    return next(category for bound, category in SIZE_BANDS if diameter_mm < bound)


def noisy_or(malignancy_probs, leak: float = MALIGNANCY_LEAK) -> float:
    """1 - (1 - leak) * prod(1 - p) over the given nodules' malignancy probabilities (already the most
    probable TOP_NODULES): the patient is malignant unless every nodule is benign and nothing was missed."""
    probs = np.asarray(malignancy_probs, float)
    return float(1 - (1 - leak) * np.prod(1 - probs))


def summarize(detections, has_malignancy: bool) -> PatientSummary:
    """The summary of one CT's reported detections (those at or above the threshold); has_malignancy:
    whether a malignancy model scored them (with none reported, the score is the leak alone)."""
    diameters = [d.diameter_mm for d in detections]
    largest = max(diameters) if diameters else None
    score = None
    if has_malignancy:
        top = sorted(detections, key=lambda d: -d.nodule_prob)[:TOP_NODULES]
        score = noisy_or([d.malignancy_prob for d in top if d.malignancy_prob is not None])
    return PatientSummary(len(detections), largest, size_category(largest), score)

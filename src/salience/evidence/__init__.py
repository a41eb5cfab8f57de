"""Evidence about saliency maps: can a map be trusted? Metrics by family and the evaluation run.

Every metric returns *per-image* values (a tensor ``(B,)``, or a small result object for the
randomization tests), so a caller can average, plot or test them as it likes. The families:

* :mod:`~salience.evidence.localization`: against ground-truth masks (pointing game, energy in
  the mask, weak localization and its boxes);
* :mod:`~salience.evidence.faithfulness`: deletion / insertion curves and their areas, faithfulness
  correlation (Bhatt et al. 2020);
* :mod:`~salience.evidence.road`: ROAD, removal with noisy linear imputation (Rong et al. 2022);
* :mod:`~salience.evidence.robustness`: max-sensitivity (Yeh et al. 2019);
* :mod:`~salience.evidence.complexity`: sparseness (Gini) and complexity (entropy);
* :mod:`~salience.evidence.compare`: Spearman, SSIM and HOG similarity of two sets of maps;
* :mod:`~salience.evidence.sanity`: the model and data randomization sanity checks, the random-logit test;
* :mod:`~salience.evidence.baselines`: model-free maps (spectral residual, Sobel edges, a centred
  Gaussian, random).

:mod:`~salience.evidence.evaluate` runs every method through them and writes a report. Every
random draw that belongs to one image comes from a generator seeded from the metric's ``seed``
and the image's content (:func:`image_seeds`), so an image's value is the same alone, in any batch
and at any position (docs/evaluation.md, "Random draws").
"""
from __future__ import annotations

from salience.evidence._checks import image_seeds
from salience.evidence.baselines import center_maps, random_maps, sobel_edges, spectral_residual
from salience.evidence.complexity import complexity, sparseness
from salience.evidence.faithfulness import (PROBABILITY, auc, deletion, deletion_curves, faithfulness_correlation,
                                           insertion, insertion_curves)
from salience.evidence.robustness import max_sensitivity
from salience.evidence.road import ROAD_FRACTIONS, linear_imputation, road, road_curves
from salience.evidence.localization import (box_iou, energy_in_mask, mask_box, pointing_game, saliency_box,
                                            weak_localization)
from salience.evidence.sanity import (RandomizationResult, data_randomization, random_logit, randomization,
                                      randomization_layers)
from salience.evidence.compare import SIMILARITIES, hog_similarity, similarity, spearman, ssim

__all__ = [
    "pointing_game",
    "energy_in_mask",
    "mask_box",
    "saliency_box",
    "box_iou",
    "weak_localization",
    "deletion",
    "insertion",
    "deletion_curves",
    "insertion_curves",
    "auc",
    "PROBABILITY",
    "road",
    "faithfulness_correlation",
    "max_sensitivity",
    "sparseness",
    "complexity",
    "random_logit",
    "road_curves",
    "linear_imputation",
    "ROAD_FRACTIONS",
    "spearman",
    "ssim",
    "hog_similarity",
    "similarity",
    "SIMILARITIES",
    "RandomizationResult",
    "randomization",
    "randomization_layers",
    "data_randomization",
    "spectral_residual",
    "sobel_edges",
    "center_maps",
    "random_maps",
    "image_seeds",
]

"""The RET-CLIP objective: the tripartite contrastive loss, 1:1:1."""

from __future__ import annotations

import keras

from kfundus.objectives import Objective
from kfundus.systems.retclip.loss import SymmetricInfoNCE
from kfundus.systems.retclip.model import BRANCHES


def retclip_objective(config=None, manifest=None, train_targets=None) -> Objective:
    """Symmetric InfoNCE on each branch's (batch, batch) logit matrix, weights 1:1:1, and
    the in-batch top-1 matching accuracy of each branch. The targets (``range(batch)``
    per branch) come with the pairs dataset."""
    return Objective(
        loss={b: SymmetricInfoNCE(name=f"infonce_{b}") for b in BRANCHES},
        metrics={b: [keras.metrics.SparseCategoricalAccuracy(name="match_accuracy")] for b in BRANCHES},
        loss_weights=dict.fromkeys(BRANCHES, 1.0),
    )

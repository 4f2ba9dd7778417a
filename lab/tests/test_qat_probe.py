"""lab.qat_probe on a tiny mask-aware encoder: it sees what padding does to the ranges."""

from __future__ import annotations

import numpy as np

from tests.test_qat import _trainable_model


def _padded_outlier_model() -> object:
    """Rows of 3 tokens padded to 12; the padded positions feed the Linear a value of 50."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.emb = torch.nn.Embedding(30, 8)
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            m = mask.unsqueeze(-1).float()
            h = self.lin(self.emb(ids) * m + 50.0 * (1 - m)) * m
            return h.sum(1) / m.sum(1).clamp(min=1)

    model = _trainable_model(Net())
    data = model.calibration
    data.inputs["attention_mask"][:, :3] = 1  # every row 3 tokens long: trimming drops the pads
    data.inputs["attention_mask"][:, 3:] = 0
    data.inputs["input_ids"][:, :3] = np.random.default_rng(1).integers(1, 30, (len(data), 3))
    model.evaluation = data
    return model


def test_ranges_report_what_the_padding_adds() -> None:
    from lab.qat_probe import ranges

    (row,) = ranges(_padded_outlier_model(), 8)
    assert row["layer"] == "lin"
    assert row["padded"] == 50.0 and row["real"] < 10 and row["ratio"] > 5


def test_emulated_loss_sees_padding_that_trimming_hides() -> None:
    from lab.qat_probe import emulated

    loss = emulated(_padded_outlier_model(), 8)
    # The padded outlier widens each batch's range: the served (padded) error is larger than
    # the error of the batches trimmed to their longest mask.
    assert loss["all"] > 2 * loss["all, batches trimmed to their longest mask"]
    assert loss["inputs only"] > loss["weights only"]

"""Issue 13: R-Drop's consistency term (pure logic). Needs torch (``make install-train``)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from training.finetune import rdrop_loss  # noqa: E402


def test_rdrop_term_is_the_symmetric_kl_of_the_two_passes() -> None:
    rng = np.random.default_rng(2)
    first = torch.tensor(rng.normal(size=(5, 9)), dtype=torch.float32)
    second = torch.tensor(rng.normal(size=(5, 9)) * 2, dtype=torch.float32)
    assert float(rdrop_loss(first, first)) == pytest.approx(0.0, abs=1e-6)
    p, q = torch.softmax(first, dim=1), torch.softmax(second, dim=1)
    kl_pq = (p * (p.log() - q.log())).sum(1).mean()
    kl_qp = (q * (q.log() - p.log())).sum(1).mean()
    expected = 0.5 * (kl_pq + kl_qp)
    assert float(rdrop_loss(first, second)) == pytest.approx(float(expected), rel=1e-5)
    assert float(rdrop_loss(second, first)) == pytest.approx(float(expected), rel=1e-5)
    first.requires_grad_(True)
    second.requires_grad_(True)
    rdrop_loss(first, second).backward()
    assert first.grad is not None and second.grad is not None
    assert float(first.grad.abs().sum()) > 0 and float(second.grad.abs().sum()) > 0

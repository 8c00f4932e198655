"""Issue 16: the distillation term (pure logic). Needs torch (``make install-train``)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from training.finetune import distill_loss  # noqa: E402


def test_distillation_term_is_the_tempered_kl_times_t_squared() -> None:
    rng = np.random.default_rng(1)
    student = torch.tensor(rng.normal(size=(4, 7)), dtype=torch.float32)
    teacher = torch.tensor(rng.normal(size=(4, 7)) * 3, dtype=torch.float32)
    assert float(distill_loss(teacher, teacher, 2.0)) == pytest.approx(0.0, abs=1e-6)
    t = 2.0
    p = torch.softmax(teacher / t, dim=1)
    expected = (p * (torch.log(p) - torch.log_softmax(student / t, dim=1))).sum(1).mean() * t * t
    assert float(distill_loss(student, teacher, t)) == pytest.approx(float(expected), rel=1e-5)
    student.requires_grad_(True)
    distill_loss(student, teacher, t).backward()
    assert student.grad is not None and float(student.grad.abs().sum()) > 0

"""The model manifest: what a trained routing model is made of, pinned file by file.

A manifest (``manifest.json``) sits next to its files, locally or under one S3 prefix. Each file
entry carries its sha256, so pinning the manifest's own sha256 (``THINFLEET_MANIFEST_SHA256``)
pins every byte the worker loads. The worker also refuses a manifest whose taxonomy hash differs
from its own taxonomy's: a label head trained on other labels would route silently wrong.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.schemas import utcnow

MANIFEST_FORMAT: Literal["thinfleet-manifest/1"] = "thinfleet-manifest/1"
MANIFEST_NAME = "manifest.json"


class FileRef(BaseModel):
    """A file of the model, ``path`` relative to the manifest's location."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class TaxonomyRef(BaseModel):
    """The taxonomy the model was trained for."""

    name: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    labels: int


class DataRef(BaseModel):
    """The labelled data a model was trained on (digest of the file as read)."""

    source: str
    sha256: str
    train_rows: int
    validation_rows: int
    split: str


class Calibration(BaseModel):
    """Temperature scaling of the label head (Guo et al. 2017, arXiv:1706.04599), fitted by NLL
    on rows that did not train the model, then (``method: temperature+beta``) beta calibration
    of the top label's probability (Kull et al. 2017; ``beta = [a, b, c]``, a, b >= 0,
    ``worker.engine.beta_map``), fitted on the same rows. A trie router has no scores to scale:
    its path probability gets the beta map alone (``method: beta``, ``temperature`` 1).
    ``scheme`` says which rows and how the reported figures were kept out of the fit;
    ``ece_before``/``ece_after`` are on rows not used to fit (15 equal-width bins)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["temperature", "temperature+beta", "beta"] = "temperature"
    temperature: float = Field(gt=0)
    beta: list[float] | None = Field(default=None, min_length=3, max_length=3)
    fitted_on: str
    rows: int = Field(ge=1)
    scheme: str
    ece_before: float
    ece_after: float


class SelectiveRouting(BaseModel):
    """The auto-route threshold that meets ``precision_target`` on calibration rows: the
    worker sends tickets below it to the taxonomy's fallback route (unless the taxonomy sets
    ``override_model_threshold``). ``coverage``/``precision``: out-of-fold, on those rows.
    Without ``delta`` the threshold is a point estimate (its precision on new tickets is about
    the target, below it about half the time); with ``delta`` it is guaranteed
    (``training.calibrate.guaranteed_threshold``: precision >= the target with probability
    >= 1 - delta over the calibration rows)."""

    model_config = ConfigDict(extra="forbid")

    precision_target: float = Field(gt=0, lt=1)
    threshold: float = Field(ge=0, le=1)
    coverage: float
    precision: float | None
    delta: float | None = Field(default=None, gt=0, lt=1)


class Manifest(BaseModel):
    """A routing model: base GGUF + optional LoRA adapter + optional label head.

    ``decoder`` is ``"head"`` (a linear head on the last prompt token's final hidden state, one
    forward pass per ticket) or ``"trie"`` (label-token decoding over the label trie).
    ``prompt_style`` and ``max_ticket_tokens`` are the ones training used; serving uses the same.
    """

    model_config = ConfigDict(extra="forbid")

    format: Literal["thinfleet-manifest/1"] = MANIFEST_FORMAT
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,96}$")
    created_at: datetime = Field(default_factory=utcnow)
    base_model: FileRef
    adapter: FileRef | None = None
    head: FileRef | None = None
    decoder: Literal["head", "trie"]
    prompt_style: Literal["catalog", "compact"]
    max_ticket_tokens: int = Field(ge=8)
    taxonomy: TaxonomyRef
    training_data: DataRef | None = None
    recipe: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    calibration: Calibration | None = None
    selective: SelectiveRouting | None = None

    @model_validator(mode="after")
    def _calibration_fits_the_decoder(self) -> Manifest:
        """A head is calibrated by a temperature (then perhaps a beta map); a trie only by a
        beta map (``method: beta``, temperature 1): anything else would be served wrongly."""
        c = self.calibration
        if c is None:
            return self
        if (c.method != "temperature") != (c.beta is not None):
            raise ValueError(f"calibration method {c.method!r} and its beta map disagree")
        if self.decoder == "trie" and (c.method != "beta" or c.temperature != 1.0):
            raise ValueError("a trie router's confidence is calibrated by a beta map alone "
                             "(method 'beta', temperature 1)")
        if self.decoder == "head" and c.method == "beta":
            raise ValueError("a label head's calibration starts with its temperature")
        return self

    def files(self) -> list[FileRef]:
        """Every file the worker must fetch and verify."""
        return [f for f in (self.base_model, self.adapter, self.head) if f is not None]

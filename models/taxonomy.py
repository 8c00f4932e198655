"""The taxonomy: a closed, configurable label set, each label's route, and extraction fields.

A taxonomy is a YAML file that needs no code (see ``models/taxonomies/*.yaml``)::

    name: ecommerce
    instructions: Classify the customer support ticket.
    fallback_route: human-triage
    confidence_threshold: 0.5
    labels:
      - {name: Packaging and Shipping, route: logistics, description: ...}
    fields:
      - {name: product_name, description: ..., max_tokens: 8, extractive: true}
    examples:   # optional few-shot examples for the base model's (catalog) prompt
      - {text: ..., label: ..., fields: {product_name: ..., brief_description: ...}}

``load_taxonomy`` accepts a path or the name of a built-in taxonomy. ``Taxonomy.sha256`` is a
digest of the validated content, so a model manifest can pin the exact taxonomy it was trained on.
"""

from __future__ import annotations

import hashlib
import json
from importlib.resources import files
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.errors import TaxonomyError

BUILTIN_DIR = Path(str(files("models").joinpath("taxonomies")))
#: Keys added after manifests began pinning taxonomy digests, with their defaults.
_ADDED_KEYS: dict[str, object] = {"override_model_threshold": False, "route_thresholds": {},
                                   "examples": []}


class Label(BaseModel):
    """One label of the closed set, and the route (department or queue) it maps to."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=80, pattern=r"^[^\n\"]+$")
    route: str = Field(min_length=1, max_length=80)
    description: str | None = None


class ExtractionField(BaseModel):
    """A field the model extracts, bounded to ``max_tokens`` generated tokens.

    ``extractive: true`` (e.g. ``product_name``): the value is decoded under a constraint that
    keeps it a span of the ticket's own words or ``Unknown`` (``worker.spans``); it cannot name
    anything the ticket does not. Otherwise the value is free text (e.g.
    ``brief_description``), checked after decoding: one that repeats the prompt instead of the
    ticket is rejected (``worker.spans.echoes_prompt``).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,39}$")
    description: str
    max_tokens: int = Field(default=12, ge=1, le=64)
    extractive: bool = False


class Example(BaseModel):
    """A worked ticket for the prompt (few-shot): its text, gold label and field values.

    Shown only in the ``catalog`` prompt (the base model's, which has not learned the job);
    evaluated once per worker child with the prefix, so they cost nothing per ticket.
    """

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=2000)
    label: str
    fields: dict[str, str] = Field(default_factory=dict)


class Taxonomy(BaseModel):
    """A validated taxonomy.

    Raises (through ``load_taxonomy``) ``TaxonomyError`` when labels repeat, a route is empty,
    the threshold is outside [0, 1] or the file does not parse.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    instructions: str = "Classify the customer support ticket into exactly one category."
    fallback_route: str
    confidence_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    labels: list[Label] = Field(min_length=2)
    fields: list[ExtractionField] = Field(default_factory=list)
    #: When true, ``confidence_threshold`` wins over a model's precision-targeted threshold.
    override_model_threshold: bool = False
    #: Per-route thresholds (e.g. ``security: 0.9``); they win for their route.
    route_thresholds: dict[str, float] = Field(default_factory=dict)
    #: Few-shot examples for the base model's prompt (``catalog`` style only).
    examples: list[Example] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> Taxonomy:
        names = [label.name for label in self.labels]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"labels repeat: {dupes}")
        field_names = [f.name for f in self.fields]
        if len(set(field_names)) != len(field_names):
            raise ValueError("extraction field names repeat")
        extractive = {f.name for f in self.fields if f.extractive}
        for number, example in enumerate(self.examples, 1):
            if example.label not in names:
                raise ValueError(f"example {number}: label {example.label!r} is not a label")
            if set(example.fields) != set(field_names):
                raise ValueError(f"example {number}: fields must be exactly {field_names}")
            for name in extractive:
                value = example.fields[name]
                if value != "Unknown" and value.lower() not in example.text.lower():
                    raise ValueError(f"example {number}: extractive field {name} must be "
                                     f"a span of the text or Unknown, not {value!r}")
        return self

    @property
    def label_names(self) -> list[str]:
        """The label strings, in file order."""
        return [label.name for label in self.labels]

    @property
    def routes(self) -> dict[str, str]:
        """label name -> route."""
        return {label.name: label.route for label in self.labels}

    @property
    def sha256(self) -> str:
        """Hex sha256 of the taxonomy's canonical JSON (stable across YAML formatting)."""
        data = self.model_dump(mode="json")
        for key, default in _ADDED_KEYS.items():  # keys added later enter only when set, so
            if data.get(key) == default:           # the digests that manifests pin stay valid
                del data[key]
        for spec in data["fields"]:
            if not spec.get("extractive"):
                spec.pop("extractive", None)
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def ref(self) -> str:
        """``name@sha256[:12]``: what a routed result records as its taxonomy."""
        return f"{self.name}@{self.sha256[:12]}"

    def threshold_for(self, model_threshold: float | None = None, route: str | None = None
                      ) -> float:
        """The auto-route threshold in force: the route's own (``route_thresholds``), else the
        model's precision-targeted one (manifest ``selective.threshold``) unless
        ``override_model_threshold``, else ``confidence_threshold``."""
        if route is not None and route in self.route_thresholds:
            return self.route_thresholds[route]
        if model_threshold is not None and not self.override_model_threshold:
            return model_threshold
        return self.confidence_threshold

    def route_for(self, label: str, confidence: float, model_threshold: float | None = None
                  ) -> tuple[str, bool]:
        """Return ``(route, is_fallback)`` for a decoded label and its confidence in [0, 1]:
        the fallback route below ``threshold_for`` the label's route."""
        route = self.routes[label]
        if confidence < self.threshold_for(model_threshold, route):
            return self.fallback_route, True
        return route, False


def builtin_taxonomies() -> list[str]:
    """Names of the taxonomies shipped in ``models/taxonomies``."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def load_taxonomy(source: str | Path) -> Taxonomy:
    """Load a taxonomy from a YAML path or a built-in name (``banking77``, ``ecommerce``).

    Raises ``TaxonomyError`` with the file and the first problems when it is missing or invalid.
    """
    path = Path(source)
    if not path.exists() and (BUILTIN_DIR / f"{source}.yaml").exists():
        path = BUILTIN_DIR / f"{source}.yaml"
    if not path.is_file():
        raise TaxonomyError(
            f"taxonomy {str(source)!r} is neither a file nor a built-in "
            f"({', '.join(builtin_taxonomies())})"
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        return Taxonomy.model_validate(raw)
    except (yaml.YAMLError, ValidationError) as exc:
        raise TaxonomyError(f"taxonomy {path} is invalid: {exc}") from exc

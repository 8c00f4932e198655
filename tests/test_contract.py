"""Contract validation and taxonomy loading (pure logic, no services)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from models import RoutedResult, TicketEvent, load_taxonomy
from models.errors import TaxonomyError
from models.taxonomy import builtin_taxonomies


def test_ticket_accepts_the_reference_example() -> None:
    event = TicketEvent.model_validate({
        "ticket_id": "T-1", "metadata": {"channel": "email"},
        "text": "I just got the kettle I ordered last week and it's not working."})
    assert event.ticket_id == "T-1"


@pytest.mark.parametrize("text", ["", "   \n\t"])
def test_ticket_rejects_empty_text(text: str) -> None:
    with pytest.raises(ValidationError, match="empty"):
        TicketEvent.model_validate({"ticket_id": "T", "text": text})


def test_ticket_size_limit_is_utf8_bytes_and_configurable() -> None:
    text = "é" * 4097  # 8194 bytes, 4097 characters
    with pytest.raises(ValidationError, match="8194 bytes"):
        TicketEvent.model_validate({"ticket_id": "T", "text": text})
    assert TicketEvent.model_validate({"ticket_id": "T", "text": text},
                                      context={"max_ticket_bytes": 10_000})
    with pytest.raises(ValidationError, match="over the 10-byte limit"):
        TicketEvent.model_validate({"ticket_id": "T", "text": "x" * 11},
                                   context={"max_ticket_bytes": 10})


@pytest.mark.parametrize("bad", [
    {"text": "hi"},                                   # no id
    {"ticket_id": "has space", "text": "hi"},         # id with whitespace
    {"ticket_id": "T", "text": "hi", "extra": 1},     # unknown field
    {"ticket_id": "T", "text": "hi", "metadata": {"k": 1}},  # metadata values are strings
    {"ticket_id": "T", "text": "hi", "metadata": {str(i): "v" for i in range(40)}},
])
def test_ticket_rejects_malformed(bad: dict) -> None:
    with pytest.raises(ValidationError):
        TicketEvent.model_validate(bad)


def test_routed_result_bounds_confidence() -> None:
    base = {"ticket_id": "T", "label": "a", "route": "r", "status": "routed",
            "taxonomy": "x@1", "model": {"name": "m", "sha256": "0" * 64},
            "timings": {"prompt_eval_ms": 1, "decode_ms": 1, "total_ms": 2},
            "tokens_in": 1, "tokens_out": 1, "worker": "w", "attempt": 1}
    assert RoutedResult.model_validate({**base, "confidence": 0.5})
    with pytest.raises(ValidationError):
        RoutedResult.model_validate({**base, "confidence": 1.5})


def test_builtin_taxonomies_load() -> None:
    assert {"banking77", "ecommerce"} <= set(builtin_taxonomies())
    banking = load_taxonomy("banking77")
    assert len(banking.labels) == 77
    assert len(set(banking.routes.values())) == 7
    ecommerce = load_taxonomy("ecommerce")
    assert ecommerce.label_names == ["Packaging and Shipping", "Product Defect or Problem",
                                     "General Dissatisfaction"]
    assert [f.name for f in ecommerce.fields] == ["product_name", "brief_description"]


def test_taxonomy_routes_low_confidence_to_fallback() -> None:
    taxonomy = load_taxonomy("ecommerce")
    assert taxonomy.route_for("Packaging and Shipping", 0.9) == ("logistics", False)
    assert taxonomy.route_for("Packaging and Shipping", 0.1) == ("human-triage", True)


def test_taxonomy_hash_ignores_yaml_formatting(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    a.write_text("name: t\nfallback_route: f\nlabels:\n  - {name: x, route: r}\n"
                 "  - {name: y, route: r}\n")
    b = tmp_path / "b.yaml"
    b.write_text("# same content, other layout\nname: t\nfallback_route: f\nlabels:\n"
                 "- name: x\n  route: r\n- name: y\n  route: r\n")
    assert load_taxonomy(a).sha256 == load_taxonomy(b).sha256


@pytest.mark.parametrize("content,message", [
    ("name: t\nfallback_route: f\nlabels:\n  - {name: x, route: r}\n  - {name: x, route: r}\n",
     "repeat"),
    ("name: t\nfallback_route: f\nlabels: [{name: x, route: r}]\n", "at least 2"),
    ("name: t\nlabels: [{name: x, route: r}, {name: y, route: r}]\n", "fallback_route"),
    ("name: [unclosed\n", "invalid"),
])
def test_taxonomy_errors_are_clear(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(TaxonomyError, match=message):
        load_taxonomy(path)


def test_missing_taxonomy_names_the_builtins() -> None:
    with pytest.raises(TaxonomyError, match="banking77"):
        load_taxonomy("no-such-taxonomy")


def test_json_schemas_export(tmp_path: Path) -> None:
    from thinfleet.cli import main

    assert main(["schema", "--out", str(tmp_path)]) == 0
    schema = json.loads((tmp_path / "RoutedResult.schema.json").read_text())
    assert {"label", "route", "confidence", "model", "timings"} <= set(schema["properties"])

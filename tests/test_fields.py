"""Extraction fields on the real model (issue 14): the extractive constraint, the prompt-echo
check, and the shipped ecommerce router's fields."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from models import load_taxonomy
from models.manifest import Manifest
from worker.engine import LabelHead, RoutingEngine
from worker.prompt import fold_ticket_text
from worker.spans import echoes_prompt

ROOT = Path(__file__).parent.parent
TEST_SET = ROOT / "data" / "ecommerce" / "test.jsonl"
ROUTER = ROOT / "models" / "trained" / "ecommerce-gemma3-270m-lora"
KETTLE = ("I just got the kettle I ordered last week and it's not working. I see a light when I "
          "turn it on, but its not getting warm")


def held_out(n: int) -> list[dict[str, str]]:
    with TEST_SET.open(encoding="utf-8") as handle:
        return [json.loads(line) for _, line in zip(range(n), handle, strict=False)]


def in_ticket(value: str, text: str) -> bool:
    return value == "Unknown" or value.lower() in fold_ticket_text(text).lower()


@pytest.fixture(scope="module")
def base_engine(model_file: Path) -> Iterator[RoutingEngine]:
    engine = RoutingEngine(model_file, load_taxonomy("ecommerce"), n_threads=2,
                           max_ticket_tokens=128)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def router(model_file: Path) -> Iterator[RoutingEngine]:
    manifest = Manifest.model_validate_json((ROUTER / "manifest.json").read_text())
    engine = RoutingEngine(
        model_file, load_taxonomy("ecommerce"), n_threads=2,
        max_ticket_tokens=manifest.max_ticket_tokens, adapter_path=ROUTER / "adapter.gguf",
        head=LabelHead.load(ROUTER / "head.npz", manifest.calibration.temperature
                            if manifest.calibration else 1.0),
        prompt_style=manifest.prompt_style)
    yield engine
    engine.close()


def test_an_extractive_field_is_a_span_of_the_ticket_or_unknown(base_engine: RoutingEngine
                                                                ) -> None:
    """The base model, which has not learned the job, still cannot name a product the ticket
    does not: every product_name is words of the ticket, or Unknown."""
    tickets = [row["text"] for row in held_out(8)]
    tickets += ["Where is my parcel?", "😡😡😡", "My Samsung fridge-freezer's ice maker leaks"]
    for text in tickets:
        value = base_engine.route(text).fields["product_name"]
        assert value and in_ticket(value, text), (value, text)


def test_a_generated_field_never_repeats_the_prompt(base_engine: RoutingEngine) -> None:
    for row in held_out(8):
        outcome = base_engine.route(row["text"])
        value = outcome.fields["brief_description"]
        assert value == "Unknown" or not echoes_prompt(value, base_engine.prompt_text,
                                                         row["text"])
        assert set(outcome.rejected_fields) <= {"brief_description"}


def test_the_prompt_echo_is_rejected_not_published(model_file: Path) -> None:
    """Without few-shot examples the base model answers brief_description with the prompt's
    own words (the failure issue 14 measured on every ticket): the value is rejected, published
    as Unknown and named in rejected_fields."""
    taxonomy = load_taxonomy("ecommerce").model_copy(update={"examples": []})
    engine = RoutingEngine(model_file, taxonomy, n_threads=2)
    try:
        outcome = engine.route(KETTLE)
    finally:
        engine.close()
    assert outcome.rejected_fields == ["brief_description"]
    assert outcome.fields["brief_description"] == "Unknown"
    assert in_ticket(outcome.fields["product_name"], KETTLE)


def test_the_shipped_router_gets_the_articles_ticket_right(router: RoutingEngine) -> None:
    outcome = router.route(KETTLE)
    assert outcome.label == "Product Defect or Problem"
    assert outcome.fields["product_name"].lower() == "kettle"
    assert outcome.fields["brief_description"] not in ("", "Unknown")
    assert outcome.rejected_fields == []


def test_the_shipped_router_fields_on_held_out_tickets(router: RoutingEngine) -> None:
    """A smoke check of the figures in the README (the full held-out set: make eval-ecommerce):
    labels and product names mostly right, and every product name from the ticket."""
    rows = held_out(20)
    labels = products = 0
    for row in rows:
        outcome = router.route(row["text"])
        labels += outcome.label == row["issue_classification"]
        value = outcome.fields["product_name"]
        assert in_ticket(value, row["text"])
        products += value.lower() == row["product_name"].lower()
    assert labels >= 16 and products >= 16, (labels, products)


def test_a_worker_publishes_the_shipped_routers_fields(
        redis_url: str, s3_endpoint: str, tmp_path: Path) -> None:
    """Through the fleet: the ecommerce manifest pulled from S3, the fields in the result."""
    import redis

    from producer import Producer, ProducerSettings
    from tests.conftest import worker_env
    from thinfleet import devstack
    from worker.acquire import sha256_file

    db = redis_url.rsplit("/", 1)[0] + "/6"
    redis.Redis.from_url(db).flushdb()
    staged = devstack.stage_model_dir(ROUTER / "manifest.json", tmp_path / "staged")
    uri = devstack.upload_model_dir(s3_endpoint, staged, "models", "routers/ecommerce")
    env = worker_env(db, s3_endpoint, "", "0" * 64, tmp_path / "cache", model_manifest=uri,
                     manifest_sha256=sha256_file(staged), taxonomy="ecommerce")
    worker = devstack.start_worker(env, tmp_path / "w.log", hostname="fields")
    try:
        worker.wait_ready(1, timeout_s=180)
        result = Producer(ProducerSettings(redis_url=db)).route(
            {"ticket_id": "kettle-1", "text": KETTLE}, timeout_s=60)
    finally:
        worker.stop()
    assert result.label == "Product Defect or Problem"
    assert result.fields["product_name"].lower() == "kettle"
    assert set(result.fields) == {"product_name", "brief_description"}
    assert result.rejected_fields == []

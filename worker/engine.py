"""The routing engine: one model, one taxonomy, a prefix cache and a label trie.

Per worker child, at boot:
  1. map the GGUF (``use_mmap``: children share the page cache's one copy of the weights);
  2. evaluate the taxonomy's prefix once and keep it in the KV cache (the *prefix cache*);
  3. build the label trie.

Per ticket (``route``):
  1. evaluate only the ticket's own tokens after the prefix;
  2. pick the label: with a fine-tuned label head, from the last token's final hidden state (no
     decoding at all); otherwise by walking the label trie (a model evaluation only at branch
     points, forced tokens appended free);
  3. if the taxonomy asks for extraction fields, generate each, greedily, bounded by its
     ``max_tokens`` and stopped at a newline or end-of-generation token; an *extractive* field
     under the constraint that keeps it a span of the ticket or ``Unknown``, a free one checked
     for repeating the prompt (``worker.spans``; a rejected value becomes ``Unknown`` and is
     listed in ``RouteOutcome.rejected_fields``);
  4. drop the ticket's KV cells (``llama_memory_seq_rm``), leaving the prefix in place.

``save_state``/``load_state`` are not used: they copy vocab-sized score rows, about 1 MiB per
token here, and restoring a 544-token prefix that way took about 4 s (measured on this machine).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.errors import ModelUnavailable
from models.taxonomy import Taxonomy
from worker.llama import LlamaRuntime
from worker.prompt import (
    LABEL_CUE,
    TICKET_LEAD,
    UNKNOWN,
    PromptStyle,
    build_prefix,
    encode_ticket,
    field_cue,
    fold_ticket_text,
)
from worker.spans import SpanDecoder, echoes_prompt
from worker.trie import LabelTrie

#: confidences are clipped to [BETA_EPS, 1 - BETA_EPS] before the beta map's logarithms
BETA_EPS = 1e-7


def beta_map(confidence: np.ndarray | float, beta: tuple[float, float, float]) -> np.ndarray:
    """Beta calibration of a top-label confidence (Kull, Silva Filho and Flach 2017, "Beyond
    sigmoids", Electron. J. Statist. 11(2), eq. 4): ``σ(c + a·ln p − b·ln(1 − p))`` with
    ``beta = (a, b, c)``, ``a, b >= 0`` (so the map is increasing: it never reorders tickets,
    and the tickets above a threshold stay the same set). Shape in = shape out."""
    a, b, c = beta
    p = np.clip(np.asarray(confidence, dtype=np.float64), BETA_EPS, 1 - BETA_EPS)
    return 1.0 / (1.0 + np.exp(-(c + a * np.log(p) - b * np.log1p(-p))))


def check_beta(beta: tuple[float, float, float] | None) -> None:
    """Refuse a beta map that ``beta_map`` cannot serve as an increasing map: it needs
    ``(a >= 0, b >= 0, c)``. Raises ``ModelUnavailable``."""
    if beta is not None and not (len(beta) == 3 and beta[0] >= 0 and beta[1] >= 0):
        raise ModelUnavailable(f"beta calibration needs (a >= 0, b >= 0, c), got {beta}")


@dataclass(frozen=True)
class LabelHead:
    """A linear label head on the last prompt token's final hidden state.

    ``weight`` is ``[n_labels, n_embd]``, ``bias`` ``[n_labels]`` (float32), ``labels`` the
    label names in row order. Trained by ``training.finetune``; stored as ``head.npz``.
    """

    weight: np.ndarray
    bias: np.ndarray
    labels: list[str]
    temperature: float = 1.0
    #: the manifest's beta calibration of the top-label confidence (``beta_map``), or None
    beta: tuple[float, float, float] | None = None

    @classmethod
    def load(cls, path: Path, temperature: float = 1.0,
             beta: tuple[float, float, float] | None = None) -> LabelHead:
        """Read a ``head.npz``; ``temperature`` and ``beta`` are the manifest's calibration
        (1.0 and None: none). Raises ``ModelUnavailable`` when it is unreadable or malformed,
        or the calibration is out of its domain."""
        if not temperature > 0:
            raise ModelUnavailable(f"label head temperature must be > 0, got {temperature}")
        check_beta(beta)
        try:
            with np.load(path, allow_pickle=False) as data:
                head = cls(data["weight"].astype(np.float32), data["bias"].astype(np.float32),
                           [str(x) for x in data["labels"]], float(temperature),
                           tuple(float(x) for x in beta) if beta else None)  # type: ignore[arg-type]
        except (OSError, KeyError, ValueError) as exc:
            raise ModelUnavailable(f"label head {path} is unreadable: {exc}") from exc
        if head.weight.shape[0] != len(head.labels) or head.bias.shape != (len(head.labels),):
            raise ModelUnavailable(f"label head {path} has inconsistent shapes")
        return head

    def scores(self, hidden: np.ndarray) -> np.ndarray:
        """Raw label scores (logits) ``weight @ hidden + bias``, ``[n_labels]``; ``hidden`` is
        ``[n_embd]``."""
        return self.weight @ hidden.astype(np.float32) + self.bias

    def probabilities(self, hidden: np.ndarray) -> np.ndarray:
        """Softmax over labels of ``scores(hidden) / temperature`` (temperature scaling, Guo et
        al. 2017: calibrates the confidence, never changes the argmax)."""
        scores = self.scores(hidden) / self.temperature
        scores = np.exp(scores - scores.max())
        return scores / scores.sum()

    def decide(self, scores: np.ndarray) -> tuple[str, float]:
        """The label of raw scores ``[n_labels]`` (``scores(hidden)``, or a pool of several
        readings' scores) and the confidence the worker routes on: the top label of the
        softmax of ``scores / temperature``, its probability through ``confidence``."""
        scaled = np.asarray(scores, dtype=np.float64) / self.temperature
        probabilities = np.exp(scaled - scaled.max())
        best = int(np.argmax(probabilities))
        return self.labels[best], self.confidence(float(probabilities[best]
                                                        / probabilities.sum()))

    def confidence(self, top_probability: float) -> float:
        """The confidence the worker routes on: the top label's temperature-scaled probability,
        through the beta map when the manifest has one."""
        return (float(beta_map(top_probability, self.beta)) if self.beta is not None
                else float(top_probability))


@dataclass(frozen=True)
class RouteOutcome:
    """What the model decided for one ticket; times in milliseconds."""

    label: str
    confidence: float
    fields: dict[str, str] = field(default_factory=dict)
    tokens_in: int = 0
    tokens_out: int = 0
    evaluations: int = 0
    prompt_eval_ms: float = 0.0
    decode_ms: float = 0.0
    truncated: bool = False
    #: the label head's raw scores ``[n_labels]`` (for calibration; not published), or None
    scores: np.ndarray | None = None
    #: the label trie's own confidence before any calibration (for calibration), or None
    path_confidence: float | None = None
    #: generative fields whose value repeated the prompt: replaced by ``Unknown``
    rejected_fields: list[str] = field(default_factory=list)


class RoutingEngine:
    """Routes tickets with one llama.cpp context.

    ``max_ticket_tokens`` bounds the ticket part (head kept), which also bounds ``n_ctx``.
    ``n_threads`` should come from ``worker.cpus.plan_threads``. ``trie_beta`` is the
    manifest's beta map of the trie's confidence (``beta_map``; only without a head, whose own
    calibration is in ``LabelHead``). Raises ``ModelUnavailable`` if the model does not load or
    ``trie_beta`` is given with a head or out of its domain. Not thread-safe: one engine per
    process.
    """

    def __init__(self, model_path: Path, taxonomy: Taxonomy, *, n_threads: int,
                 max_ticket_tokens: int = 256, n_batch: int = 256, n_ubatch: int = 128,
                 adapter_path: Path | None = None, head: LabelHead | None = None,
                 prompt_style: PromptStyle = "catalog", repack: bool = True,
                 model: object = None, trie_beta: tuple[float, float, float] | None = None):
        if trie_beta is not None and head is not None:
            raise ModelUnavailable("a trie's beta calibration was given with a label head")
        check_beta(trie_beta)
        self.trie_beta = trie_beta
        self.taxonomy = taxonomy
        self.max_ticket_tokens = max_ticket_tokens
        self.head = head
        if head is not None and head.labels != taxonomy.label_names:
            raise ModelUnavailable(
                f"the label head was trained for other labels than taxonomy {taxonomy.ref}")
        started = time.perf_counter()
        # Size the context from the prompt: tokenize with a vocab-only pass would cost a second
        # model load, so over-allocate from character counts (>= 1 char per token) instead.
        prefix_text = build_prefix(taxonomy, prompt_style)
        # A label head reads the ticket's last hidden state and decodes nothing more unless
        # there are fields; the trie decodes the label. KV cells not needed are memory each
        # child writes (llama.cpp clears the cache), 18 KiB a cell for Gemma 3 270M.
        answer_budget = ((0 if head is not None else 64)
                         + sum(f.max_tokens + 16 for f in taxonomy.fields))
        n_ctx = len(prefix_text) + max_ticket_tokens + answer_budget + 64
        self.runtime = LlamaRuntime(model_path, n_ctx=n_ctx, n_threads=n_threads,
                                    n_batch=n_batch, n_ubatch=n_ubatch, lora_path=adapter_path,
                                    embeddings=head is not None, repack=repack, model=model)
        rt = self.runtime
        self.prefix_ids = rt.tokenize(prefix_text, add_bos=True, special=False)
        newline = rt.tokenize("\n")
        if len(newline) != 1:
            raise ValueError("the model's tokenizer has no single newline token")
        self.newline_id = newline[0]
        self.trie = LabelTrie.build(taxonomy.label_names, rt.tokenize, self.newline_id)
        self.field_cues = {f.name: rt.tokenize(field_cue(f.name)) for f in taxonomy.fields}
        self.unknown_ids = rt.tokenize(" " + UNKNOWN)
        self.lead_ids = rt.tokenize(TICKET_LEAD.rstrip())
        self.label_cue_ids = rt.tokenize(LABEL_CUE)
        #: what the model saw besides the ticket: a free field may not repeat it
        self.prompt_text = " ".join([prefix_text, LABEL_CUE,
                                     *(field_cue(f.name) for f in taxonomy.fields)])
        rt.prefill(self.prefix_ids, 0)  # the prefix cache: evaluated once, kept in place
        self.prefix_len = len(self.prefix_ids)
        if head is not None:
            try:
                self._check_head(head)
            except ModelUnavailable:
                rt.close()
                raise
        self.load_ms = (time.perf_counter() - started) * 1000

    def _check_head(self, head: LabelHead) -> None:
        """Refuse to boot, rather than fail every ticket, when the head cannot be served: its
        width is not the model's, or llama.cpp's graph gives no hidden state to read (the tap
        looks for the tensor llama.cpp names ``result_norm``). One short decode, then
        dropped. Raises ``ModelUnavailable``."""
        rt = self.runtime
        if head.weight.shape[1] != rt.n_embd:
            raise ModelUnavailable(f"the label head reads {head.weight.shape[1]}-wide hidden "
                                   f"states, the model's are {rt.n_embd}")
        try:
            hidden = rt.decode_hidden(self.label_cue_ids, self.prefix_len)
        except RuntimeError as exc:
            raise ModelUnavailable(f"cannot read the model's hidden state: {exc}") from exc
        finally:
            rt.forget(0, self.prefix_len)
        if not np.isfinite(hidden).all():
            raise ModelUnavailable("the model's hidden state is not finite")

    def route(self, text: str, subject: str | None = None) -> RouteOutcome:
        """Route one ticket's text. Always returns one of the taxonomy's labels.

        Raises ``RuntimeError`` if llama.cpp fails mid-decode (the KV cache is reset to the
        prefix either way, so the next ticket is unaffected).
        """
        rt, base = self.runtime, self.prefix_len
        ticket_ids, truncated = encode_ticket(rt.tokenize, text, subject, self.max_ticket_tokens)
        pos, evaluations = base, 1
        try:
            t0 = time.perf_counter()
            raw_scores, path_confidence = None, None
            if self.head is not None:  # the label needs only the last token's hidden state
                hidden = rt.decode_hidden(ticket_ids, pos)
            else:
                logits = rt.decode(ticket_ids, pos)
            pos += len(ticket_ids)
            t1 = time.perf_counter()

            def evaluate(tokens: list[int]) -> np.ndarray:
                nonlocal pos, evaluations
                evaluations += 1
                out = rt.decode(tokens, pos)
                pos += len(tokens)
                return out

            if self.head is not None:
                raw_scores = self.head.scores(hidden)
                label, confidence = self.head.decide(raw_scores)
                pending, tokens_out = [*self.trie.sequences[label]], 0
            else:
                decision = self.trie.decode(logits, evaluate)
                label, path_confidence = decision.label, decision.confidence
                confidence = (path_confidence if self.trie_beta is None
                              else float(beta_map(path_confidence, self.trie_beta)))
                pending, tokens_out = decision.unevaluated, len(decision.tokens)
            fields: dict[str, str] = {}
            rejected: list[str] = []
            spans: SpanDecoder | None = None
            for spec in self.taxonomy.fields:
                logits = evaluate(pending + self.field_cues[spec.name])
                if spec.extractive:
                    spans = spans or SpanDecoder(self._ticket_body(ticket_ids), rt.piece,
                                                 self.unknown_ids, self.newline_id)
                    choice = spans.decode(logits, evaluate, spec.max_tokens)
                    value = "" if choice.unknown else b"".join(
                        rt.piece(t) for t in choice.tokens).decode("utf-8", "ignore").strip()
                    generated, unevaluated = len(choice.tokens), choice.unevaluated
                else:
                    value, generated, unevaluated = self._generate_line(
                        logits, spec.max_tokens, evaluate)
                    if value and echoes_prompt(value, self.prompt_text,
                                               fold_ticket_text(text, subject)):
                        rejected.append(spec.name)
                        value = ""
                tokens_out += generated
                fields[spec.name] = value or UNKNOWN
                pending = [*unevaluated, self.newline_id]
            t2 = time.perf_counter()
        finally:
            rt.forget(0, base)
        return RouteOutcome(
            label=label, confidence=confidence, fields=fields,
            tokens_in=len(ticket_ids), tokens_out=tokens_out, evaluations=evaluations,
            prompt_eval_ms=(t1 - t0) * 1000, decode_ms=(t2 - t1) * 1000, truncated=truncated,
            scores=raw_scores, path_confidence=path_confidence, rejected_fields=rejected)

    def _ticket_body(self, ticket_ids: list[int]) -> list[int]:
        """The ticket's own tokens: ``ticket_ids`` without the ``Ticket:`` lead and the label
        cue (what an extractive field may copy)."""
        end = len(ticket_ids) - len(self.label_cue_ids)
        start = len(self.lead_ids) if ticket_ids[:len(self.lead_ids)] == self.lead_ids else 0
        return ticket_ids[start:end]

    def _generate_line(self, logits: np.ndarray, max_tokens: int,
                       evaluate: Callable[[list[int]], np.ndarray]
                       ) -> tuple[str, int, list[int]]:
        """Greedy generation until a newline or end-of-generation token, at most ``max_tokens``.

        Returns ``(text, tokens_generated, unevaluated)``; the stopping token is not kept or
        evaluated; ``unevaluated`` holds the last token when ``max_tokens`` cut the line (the
        caller feeds it before going on).
        """
        rt = self.runtime
        out = bytearray()
        generated = 0
        unevaluated: list[int] = []
        for step in range(max_tokens):
            token = int(np.argmax(logits))
            piece = rt.piece(token)
            if rt.is_eog(token) or b"\n" in piece:
                out += piece.split(b"\n", 1)[0]
                break
            out += piece
            generated += 1
            if step + 1 < max_tokens:
                logits = evaluate([token])
            else:
                unevaluated = [token]
        return out.decode("utf-8", errors="ignore").strip(), generated, unevaluated

    def close(self) -> None:
        """Release the model and context."""
        self.runtime.close()

"""Fine-tune a routing model: LoRA on the base GGUF plus a linear label head.

The objective (chosen by measurement on held-out Banking77, see README): a linear head on the
final hidden state (after the output norm) of the last prompt token, trained jointly with LoRA
adapters (rank ``r`` on every attention and MLP projection). The label then costs one forward
pass and no decoding; confidence is the head's softmax. Measured on these machines before this
recipe: generative label tokens (71 %), frozen features + logistic regression (89 %), TF-IDF
(91 %), LoRA + head for one epoch (92.2 %). With the head: 2 epochs 92.0 %, 3 epochs with label
smoothing 0.1 93.2 % (the shipped router).

Exactness between training and serving:
* tokens come from llama.cpp's own tokenizer (``worker.llama.load_vocab``) and the prompt from
  ``worker.prompt`` (the ``compact`` style), so serving sees the same ids;
* transformers loads the *quantized* GGUF (``gguf_file=``, dequantized to float32), so the
  adapter is trained against exactly the weights llama.cpp serves;
* the LM head over Gemma's 262k vocabulary is never computed (it costs more per token than the
  whole 270M transformer body), only the body's last hidden state.

**Extraction fields** (issue 14). When the taxonomy declares fields and the rows carry gold
values, the same forward pass also learns to write them: the sequence continues, exactly as the
engine serves it, with the label's tokens, then ``{field}: {value}\n`` per field
(``worker.prompt.answer_ids``), and a language-model cross-entropy on each value's tokens and its
closing newline (nothing else) is added to the head's loss with weight
``recipe.field_loss_weight``. The 262k-row output layer runs only at those positions. The head
still reads the hidden state of the last prompt token, which the answer after it cannot change
(causal attention), so one adapter serves the label and the fields.

Runs on CPU (threads from ``worker.cpus``), or on a CUDA GPU when one is present.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import TrainingInterrupted
from models.taxonomy import Taxonomy
from worker.prompt import PromptStyle, answer_ids, build_prefix, encode_ticket

HEAD_FILE = "head.npz"
#: a router's GGUF LoRA adapter, beside its head
ADAPTER_FILE = "adapter.gguf"
#: ignored target (torch's ``cross_entropy`` default ``ignore_index``)
IGNORE = -100
#: gold extraction values per row (field name -> value), parallel to the ``(text, label)`` rows
FieldRows = list[dict[str, str]]
ADAPTER_DIR = "adapter-hf"


@dataclass
class Recipe:
    """Every parameter of a training run (recorded in the manifest).

    The defaults are the shipped router's recipe: 3 epochs with label smoothing 0.1 reached
    93.2 % on the held-out Banking77 split, where 2 epochs without smoothing reached 92.0 %
    (README, "Fine-tuning"). Label smoothing follows Szegedy et al., 2016 (arXiv:1512.00567).
    """

    epochs: float = 3.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_lr: float = 5e-4
    head_lr: float = 3e-3
    weight_decay: float = 0.0
    batch_size: int = 16
    warmup_fraction: float = 0.05
    label_smoothing: float = 0.1
    max_ticket_tokens: int = 64
    prompt_style: PromptStyle = "compact"
    #: the split of the labelled rows (``training.split``) and the calibration folds; also the
    #: training randomness unless ``order_seed`` is set
    seed: int = 13
    #: the training randomness alone (None: ``seed``): data order, the injected copies and
    #: dropout (the head starts at zeros or from ``init_from``). Two runs that differ only here
    #: train on the same rows and are measured on the same validation rows (soup ingredients)
    order_seed: int | None = None
    #: the precision target whose threshold ``thinfleet calibrate`` records after export
    precision_target: float = 0.98
    #: steps between training checkpoints (``out_dir/checkpoint.pt``; a stopped run resumes)
    checkpoint_every_steps: int = 50
    #: weight of the field-generation loss beside the head's (used only when rows carry fields)
    field_loss_weight: float = 1.0
    #: the share of the labelled rows that ``run_recipe`` keeps out of training (validation and
    #: calibration rows)
    validation_fraction: float = 0.1
    #: adversarial augmentation: this share of the training rows is added again with an
    #: injection of a ``train`` style of ``data/injection/corpus.yaml``, gold label kept
    #: (``training.injection.augment``; issue 12)
    injection_augment: float = 0.0
    #: the share of those injected rows whose attack is composed from the corpus's plain-
    #: language ``grammar`` instead of a style (``training.injection.compose``)
    injection_grammar: float = 0.0
    #: the share of those rows that carry no attack, only harmless words from the corpus's
    #: ``benign`` grammar (consistency training, ``training.injection.benign_text``)
    injection_benign: float = 0.0
    #: the share of the attacked rows that take a header naming the attacker's label, run into
    #: the ticket (the corpus's ``grammar.headers``, ``training.injection.header``)
    injection_headers: float = 0.0
    #: the share of those headers that name the row's gold label instead of the attacker's
    #: (an opening that names a label then carries no signal either way)
    injection_header_gold: float = 0.0
    #: the share of the attacked rows (drawn before the headers) that take a second-hand or
    #: earlier account naming a label, a sentence of its own (the corpus's
    #: ``grammar.accounts``, ``training.injection.account``)
    injection_accounts: float = 0.0
    #: the share of those accounts that name the row's gold label instead of the attacker's
    injection_account_gold: float = 0.0
    #: start from a trained router instead of zeros: a directory with ``adapter.gguf`` (same
    #: LoRA rank and target modules) and ``head.npz`` (same labels)
    init_from: str | None = None
    #: layer pruning (issue 16): keep only the first ``layers`` transformer blocks (None: all);
    #: the head reads the final-normed hidden state after block ``layers``, and the export
    #: serves a GGUF with that many blocks (``training.prune``)
    layers: int | None = None
    #: distillation (issue 16): a teacher router's manifest; the student also learns its soft
    #: label distribution (Hinton et al. 2015, arXiv:1503.02531), see ``distill_loss``
    distill_from: str | None = None
    #: weight of the distillation term (the gold-label term gets ``1 - distill_weight``)
    distill_weight: float = 0.5
    #: softening temperature of teacher and student scores in the distillation term
    distill_temperature: float = 2.0
    #: weight averaging (issue 13): 0 is off; otherwise an exponential moving average of the
    #: LoRA and head weights with this decay per step (``torch.optim.swa_utils``'s EMA, Polyak
    #: and Juditsky 1992; the family of SWA, Izmailov et al. 2018, arXiv:1803.05407) is what
    #: the run exports. It starts from the run's first weights (``init_from`` or zeros)
    weight_average_decay: float = 0.0
    #: R-Drop (issue 13; Liang et al. 2021, arXiv:2106.14448): 0 is off; otherwise each batch
    #: runs twice through the model (two dropout masks, ``lora_dropout``), the label loss is
    #: the mean of the two passes' and this weight times their symmetric KL divergence
    #: (``rdrop_loss``) is added. The paper sums the two losses; averaged here, so a weight
    #: ``w`` is the paper's ``alpha = 2 w``. About twice the cost of a step
    rdrop_weight: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def encode_rows(vocab: Any, taxonomy: Taxonomy, rows: list[tuple[str, str]], recipe: Recipe
                ) -> tuple[list[list[int]], list[int]]:
    """Token ids (prefix + ticket, as served) and label indices of ``(text, label)`` rows.

    Raises ``KeyError`` for a label the taxonomy does not have.
    """
    index = {name: i for i, name in enumerate(taxonomy.label_names)}
    prefix = vocab.tokenize(build_prefix(taxonomy, recipe.prompt_style), add_bos=True)
    ids, labels = [], []
    for text, label in rows:
        ticket, _ = encode_ticket(vocab.tokenize, text, None, recipe.max_ticket_tokens)
        ids.append(prefix + ticket)
        labels.append(index[label])
    return ids, labels


def encode_answers(vocab: Any, taxonomy: Taxonomy, rows: list[tuple[str, str]],
                   fields: FieldRows) -> list[tuple[list[int], list[int]]]:
    """Per row, ``(answer, targets)``: the token ids that follow the prompt when the engine
    extracts fields (``worker.prompt.answer_ids``) and, aligned with them, the ids to predict
    (each field value's tokens and its closing newline) or ``IGNORE``."""
    newline = vocab.tokenize("\n")[0]
    out = []
    for (_, label), values in zip(rows, fields, strict=True):
        answer, is_target = answer_ids(vocab.tokenize, newline, label, values, taxonomy.fields)
        out.append((answer, [t if keep else IGNORE for t, keep in zip(answer, is_target,
                                                                      strict=True)]))
    return out


def _batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Length-bucketed batches in random order: little padding, still shuffled."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


class RouterModel:
    """The base model's transformer body with LoRA, plus a linear head (torch modules)."""

    def __init__(self, base_gguf: Path, n_labels: int, recipe: Recipe, device: str):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        causal = AutoModelForCausalLM.from_pretrained(
            str(base_gguf.parent), gguf_file=base_gguf.name, dtype=torch.float32)
        if recipe.layers is not None:
            truncate_blocks(causal, recipe.layers)
        self.config = causal.config
        # A config derived from a GGUF has no ``architectures``; llama.cpp's converter needs it.
        self.config.architectures = [type(causal).__name__]
        config = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha,
                            lora_dropout=recipe.lora_dropout,
                            target_modules=recipe.target_modules, bias="none")
        self.peft = get_peft_model(causal, config).to(device)
        hidden = int(getattr(self.config, "hidden_size", 0) or self.config.text_config.hidden_size)
        self.head = torch.nn.Linear(hidden, n_labels).to(device)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)
        self.device = device
        self.last_loss = 0.0

    def load_router(self, router_dir: Path, labels: list[str], pruned: bool = False) -> None:
        """Start from a trained router: its GGUF LoRA adapter (``adapter.gguf``, read with
        gguf-py and mapped back to the PEFT parameters: ``blk.N.attn_q.weight.lora_a`` ->
        ``layers.N.self_attn.q_proj.lora_A``) and its head (``head.npz``). ``pruned`` (this
        model keeps another number of blocks than the router): the adapter's matrices of the
        kept blocks only, and no head, since the head reads another layer's output. Raises
        ``ValueError`` when the rank, a module or the labels differ."""
        import gguf
        import torch

        modules = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                   "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                   "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                   "ffn_down": "mlp.down_proj"}
        params = dict(self.peft.named_parameters())
        reader = gguf.GGUFReader(str(router_dir / ADAPTER_FILE))
        loaded = 0
        with torch.no_grad():
            for tensor in reader.tensors:
                block, index, module, _, part = tensor.name.split(".")
                suffix = (f"layers.{index}.{modules[module]}.lora_{part[-1].upper()}"
                          ".default.weight")
                found = [n for n in params if n.endswith(suffix)]
                if pruned and block == "blk" and not found:
                    continue  # a block this model does not keep
                if block != "blk" or len(found) != 1:
                    raise ValueError(f"{tensor.name}: no LoRA parameter {suffix}")
                name = found[0]
                value = torch.from_numpy(np.asarray(tensor.data, dtype=np.float32).copy())
                if value.shape != params[name].shape:
                    raise ValueError(f"{tensor.name}: {tuple(value.shape)} vs "
                                     f"{tuple(params[name].shape)} (another LoRA rank?)")
                params[name].copy_(value.to(params[name].device))
                loaded += 1
            with np.load(router_dir / HEAD_FILE, allow_pickle=False) as head:
                if [str(x) for x in head["labels"]] != labels:
                    raise ValueError(f"{router_dir / HEAD_FILE} has other labels")
                if not pruned:
                    self.head.weight.copy_(torch.from_numpy(head["weight"]).to(self.device))
                    self.head.bias.copy_(torch.from_numpy(head["bias"]).to(self.device))
        if loaded != sum(1 for n in params if ".lora_" in n):
            raise ValueError(f"{router_dir / 'adapter.gguf'} covers {loaded} of the "
                             "model's LoRA matrices (other target modules?)")

    def body(self) -> Any:
        """The transformer body (embeddings, layers, final norm) under the LoRA wrapper."""
        wrapped: Any = self.peft  # typed differently with and without peft installed
        return wrapped.base_model.model.model

    def features(self, batch_ids: list[list[int]]) -> Any:
        """Final hidden state of each sequence's last token: float tensor ``[batch, hidden]``."""
        import torch

        hidden, mask = self.hidden_states(batch_ids)
        last = mask.sum(dim=1) - 1
        return hidden[torch.arange(len(batch_ids), device=self.device), last]

    def token_logits(self, hidden: Any) -> Any:
        """The language-model logits ``[n, vocab]`` of final hidden states ``[n, hidden]``
        (the tied output layer, with the config's final soft-capping when it has one)."""
        import torch

        wrapped: Any = self.peft
        logits = wrapped.base_model.model.lm_head(hidden)
        text_config = getattr(self.config, "text_config", self.config)
        cap = getattr(text_config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def hidden_states(self, batch_ids: list[list[int]]) -> tuple[Any, Any]:
        """Final hidden states ``[batch, width, hidden]`` of right-padded sequences, and the
        attention mask ``[batch, width]``."""
        import torch

        width = max(len(x) for x in batch_ids)
        ids = torch.zeros((len(batch_ids), width), dtype=torch.long)
        mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
        for row, seq in enumerate(batch_ids):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        return self.body()(input_ids=ids, attention_mask=mask).last_hidden_state, mask

    def logits(self, batch_ids: list[list[int]]) -> Any:
        """Head logits ``[batch, n_labels]``."""
        return self.head(self.features(batch_ids))


def router_layers(router_dir: Path) -> int | None:
    """The ``recipe.layers`` a trained router was trained with (None: every block, or no
    manifest to tell)."""
    manifest = router_dir / "manifest.json"
    if not manifest.exists():
        return None
    layers = json.loads(manifest.read_text()).get("recipe", {}).get("layers")
    return int(layers) if layers is not None else None


def truncate_blocks(causal: Any, layers: int) -> None:
    """Keep the first ``layers`` decoder blocks of a transformers causal LM, in place (config
    ``num_hidden_layers`` and ``layer_types`` with them); the final norm then applies to block
    ``layers``' output, as in the GGUF ``training.prune.prune_gguf`` writes. Raises
    ``ValueError`` unless ``1 <= layers <= `` the model's block count."""
    body = causal.model
    total = len(body.layers)
    if not 1 <= layers <= total:
        raise ValueError(f"the model has {total} blocks; cannot keep {layers}")
    body.layers = body.layers[:layers]
    for config in {id(c): c for c in (causal.config, body.config)}.values():
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = list(config.layer_types[:layers])


def distill_loss(student: Any, teacher: Any, temperature: float) -> Any:
    """Knowledge distillation's soft-target term (Hinton et al. 2015, arXiv:1503.02531, §2):
    ``T² · KL(softmax(teacher / T) ‖ softmax(student / T))``, averaged over the batch.
    ``student`` and ``teacher`` are raw label scores ``[batch, n_labels]``; the ``T²`` keeps the
    gradient's scale independent of ``T``."""
    import torch

    log_student = torch.log_softmax(student / temperature, dim=1)
    log_teacher = torch.log_softmax(teacher / temperature, dim=1)
    return torch.nn.functional.kl_div(log_student, log_teacher, log_target=True,
                                      reduction="batchmean") * temperature ** 2


def rdrop_loss(first: Any, second: Any) -> Any:
    """R-Drop's consistency term (Liang et al. 2021, arXiv:2106.14448, eq. 2): the symmetric
    KL divergence ``(KL(p1 ‖ p2) + KL(p2 ‖ p1)) / 2`` between the label distributions of two
    passes of the same rows under different dropout masks, averaged over the batch.
    ``first`` and ``second`` are raw label scores ``[batch, n_labels]``; both receive gradient."""
    import torch

    log_p = torch.log_softmax(first, dim=1)
    log_q = torch.log_softmax(second, dim=1)
    kl = torch.nn.functional.kl_div
    return 0.5 * (kl(log_q, log_p, log_target=True, reduction="batchmean")
                  + kl(log_p, log_q, log_target=True, reduction="batchmean"))


CHECKPOINT_FILE = "checkpoint.pt"
#: Recipe fields that do not change the weights (a checkpoint resumes across them).
_NOT_WEIGHTS = ("precision_target", "checkpoint_every_steps")
#: Recipe fields added after checkpoints of runs without them existed, with the value that
#: leaves such a run as it was: hashed only when set otherwise, so adding a knob does not
#: orphan a checkpoint of a run that does not use it.
_HASHED_WHEN_SET = {"injection_headers": 0.0, "injection_header_gold": 0.0,
                    "injection_accounts": 0.0, "injection_account_gold": 0.0,
                    "rdrop_weight": 0.0, "order_seed": None}


def run_fingerprint(recipe: Recipe, ids: list[list[int]], labels: list[int],
                    answers: list[tuple[list[int], list[int]]] | None = None,
                    teacher: np.ndarray | None = None) -> str:
    """sha256 of what decides the weights: the recipe (less ``_NOT_WEIGHTS``, and less the
    ``_HASHED_WHEN_SET`` fields at their neutral value), the encoded
    training rows (with their field targets) and the teacher's scores. A checkpoint resumes
    only a run with the same fingerprint."""
    import hashlib

    params = {k: v for k, v in asdict(recipe).items() if k not in _NOT_WEIGHTS
              and (k not in _HASHED_WHEN_SET or v != _HASHED_WHEN_SET[k])}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    digest.update(json.dumps([ids, labels]).encode())
    if answers:
        digest.update(json.dumps(answers).encode())
    if teacher is not None:
        digest.update(np.ascontiguousarray(teacher, dtype=np.float32).tobytes())
    return digest.hexdigest()


#: teacher scores, shared by every run that distils from the same teacher on the same rows
TEACHER_CACHE = Path.home() / ".cache" / "thinfleet" / "teacher-scores"


def teacher_scores(manifest_path: Path, taxonomy: Taxonomy, rows: list[tuple[str, str]],
                   cache_dir: Path = TEACHER_CACHE) -> np.ndarray:
    """The teacher router's raw label scores ``[len(rows), n_labels]`` (float32, temperature
    1) for the distillation term, computed once through the worker's engine
    (``training.calibrate_model.head_scores``: the teacher as it is served) and cached in
    ``cache_dir`` under a key made of the teacher manifest's sha256 and the rows (students of
    several sizes share them). Raises ``ValueError`` when the teacher has no label head or
    routes another taxonomy."""
    import hashlib

    from models.manifest import Manifest
    from training.calibrate_model import head_scores
    from worker.acquire import sha256_file

    manifest = Manifest.model_validate_json(manifest_path.read_text())
    if manifest.taxonomy.name != taxonomy.name:
        raise ValueError(f"teacher {manifest_path} routes taxonomy {manifest.taxonomy.name}")
    key = hashlib.sha256(sha256_file(manifest_path).encode()
                         + json.dumps(rows).encode()).hexdigest()
    cache = cache_dir / f"{key[:32]}.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as saved:
            if str(saved["key"]) == key:
                return np.asarray(saved["scores"], dtype=np.float32)
    print(f"teacher scores: {len(rows)} rows through {manifest_path}")
    scores = head_scores(manifest_path, taxonomy, [text for text, _ in rows]).astype(np.float32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(".partial.npz")
    np.savez(partial, scores=scores, key=np.array(key))
    partial.replace(cache)
    return scores


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically (temporary file, then rename): a run killed mid-write keeps
    the previous checkpoint."""
    import torch

    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    partial.replace(path)


@dataclass
class TrainResult:
    """What ``train`` produced: where, how long, and the PyTorch-side validation accuracy."""

    out_dir: Path
    seconds: float
    steps: int
    tokens: int
    torch_validation_accuracy: float | None
    epoch_validation_accuracy: list[float]
    device: str
    threads: int


def train(base_gguf: Path, taxonomy: Taxonomy, train_rows: list[tuple[str, str]],
          out_dir: Path, recipe: Recipe, validation_rows: list[tuple[str, str]] | None = None,
          progress: bool = True, stop_after_steps: int | None = None,
          train_fields: FieldRows | None = None) -> TrainResult:
    """Train LoRA + head on ``train_rows``; save the PEFT adapter and the head in ``out_dir``.

    ``train_fields`` (one dict per row, field name -> gold value) also trains the taxonomy's
    extraction fields (see the module docstring); without it, only the label is learned.

    ``out_dir/adapter-hf/`` holds the PEFT adapter (converted to GGUF by ``training.export``),
    ``out_dir/head.npz`` the head (``weight [n_labels, hidden]``, ``bias [n_labels]``, float32,
    and ``labels``). With ``validation_rows``, the PyTorch model's accuracy on them is measured
    at the end of every whole epoch and recorded in ``train.json``: a learning curve for the
    report only; nothing is selected on it (the last step's weights are always the ones saved,
    or with ``recipe.weight_average_decay`` their moving average, kept in the checkpoint too;
    then the last step's weights are measured as well, ``last_step_validation_accuracy``).
    **Checkpoint and resume.** Every ``recipe.checkpoint_every_steps`` steps, and when the run is
    interrupted (Ctrl-C, SIGTERM), ``out_dir/checkpoint.pt`` receives the LoRA and head weights,
    the optimizer's and scheduler's state, the torch RNG state and the step. The data order is a
    function of the order seed (``recipe.order_seed``, else ``recipe.seed``), so a new call with
    the same recipe and data continues at the next batch and ends with the weights an
    uninterrupted run would have (a test checks it). The checkpoint is removed when the run
    completes. ``stop_after_steps`` stops after that many steps (tests, or to split a long CPU
    run into sessions).

    **Pruning and distillation** (issue 16): ``recipe.layers`` trains on the first blocks only
    (``truncate_blocks``); ``recipe.distill_from`` adds a teacher router's soft labels
    (``teacher_scores``, ``distill_loss``). With ``recipe.injection_augment`` too, an injected
    copy's soft labels are the teacher's for the clean row it was made from, so the student
    learns to answer as if the injected text were absent (issue 12).

    Raises ``KeyError`` on labels outside the taxonomy, ``TrainingInterrupted`` after saving a
    checkpoint on an interruption, and ``ValueError`` when ``out_dir`` holds a checkpoint of
    another recipe or data, or for distillation with extraction fields.
    """
    import signal
    import threading

    import torch
    from torch.optim.swa_utils import get_ema_multi_avg_fn
    from tqdm import tqdm

    from worker.cpus import available_cpus
    from worker.llama import load_vocab

    order_seed = recipe.seed if recipe.order_seed is None else recipe.order_seed
    seed_everything(order_seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = available_cpus()
    torch.set_num_threads(threads)
    vocab = load_vocab(base_gguf)
    clean_rows, sources = train_rows, list(range(len(train_rows)))
    if recipe.injection_augment > 0:
        from training.injection import augment

        extra = augment(train_rows, taxonomy.label_names, recipe.injection_augment, order_seed,
                        grammar_share=recipe.injection_grammar,
                        benign_share=recipe.injection_benign,
                        header_share=recipe.injection_headers,
                        header_gold_share=recipe.injection_header_gold,
                        account_share=recipe.injection_accounts,
                        account_gold_share=recipe.injection_account_gold)
        if train_fields is not None:  # an injection does not change what the ticket is about
            train_fields = [*train_fields, *(train_fields[i] for i, _ in extra)]
        train_rows = [*train_rows, *((text, train_rows[i][1]) for i, text in extra)]
        sources += [i for i, _ in extra]
    ids, labels = encode_rows(vocab, taxonomy, train_rows, recipe)
    answers = (encode_answers(vocab, taxonomy, train_rows, train_fields)
               if train_fields is not None and taxonomy.fields else None)
    if recipe.distill_from and answers is not None:
        raise ValueError("distillation trains the label head only: not with extraction fields")
    if recipe.rdrop_weight > 0 and answers is not None:
        raise ValueError("R-Drop trains the label head only: not with extraction fields")
    if recipe.rdrop_weight > 0 and recipe.lora_dropout <= 0:
        raise ValueError("R-Drop needs dropout: set lora_dropout above 0")
    # An injected copy learns the teacher's distribution for its *clean* source row: what the
    # ticket is about, as if the attacker's text were not there (invariance, not imitation).
    teacher = (teacher_scores(Path(recipe.distill_from), taxonomy, clean_rows)[sources]
               if recipe.distill_from else None)
    model = RouterModel(base_gguf, len(taxonomy.labels), recipe, device)
    if recipe.init_from:
        model.load_router(Path(recipe.init_from), taxonomy.label_names,
                          pruned=router_layers(Path(recipe.init_from)) != recipe.layers)
    lora_params = [p for p in model.peft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": lora_params, "lr": recipe.lora_lr},
        {"params": model.head.parameters(), "lr": recipe.head_lr},
    ], weight_decay=recipe.weight_decay)
    average = (get_ema_multi_avg_fn(recipe.weight_average_decay)
               if recipe.weight_average_decay > 0 else None)
    rng = random.Random(order_seed)
    epochs_whole = math.ceil(recipe.epochs)
    plan: list[list[int]] = []
    epoch_ends: set[int] = set()
    for epoch in range(epochs_whole):
        batches = _batches([len(x) for x in ids], recipe.batch_size, rng)
        if epoch == epochs_whole - 1 and recipe.epochs < epochs_whole:
            batches = batches[:int(len(batches) * (recipe.epochs - epoch))]
        else:
            epoch_ends.add(len(plan) + len(batches))
        plan.extend(batches)
    total_steps = len(plan)
    warmup = max(1, int(total_steps * recipe.warmup_fraction))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / warmup, max(0.0, (total_steps - step) / max(1, total_steps - warmup))))
    model.peft.train()
    started, tokens, ema, done, earlier_s = time.monotonic(), 0, None, 0, 0.0
    curve: list[float] = []
    checkpoint = out_dir / CHECKPOINT_FILE
    fingerprint = run_fingerprint(recipe, ids, labels, answers, teacher)
    lora_named = [(n, p) for n, p in model.peft.named_parameters() if p.requires_grad]
    trained = [p for _, p in lora_named] + list(model.head.parameters())
    averaged = ([p.detach().clone() for p in trained] if recipe.weight_average_decay > 0
                else None)
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)  # our own file
        if state["fingerprint"] != fingerprint:
            raise ValueError(f"{checkpoint} belongs to another recipe or data: delete it or "
                             "train into another directory")
        with torch.no_grad():
            for name, param in lora_named:
                param.copy_(state["lora"][name])
        model.head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if device == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if averaged is not None:
            averaged = [t.to(device) for t in state["averaged"]]
        done, tokens, ema, curve = state["step"], state["tokens"], state["ema"], state["curve"]
        earlier_s = state["seconds"]
        print(f"resuming {checkpoint} at step {done + 1} of {total_steps}")

    def snapshot(step: int) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(checkpoint, {
            "fingerprint": fingerprint, "step": step, "tokens": tokens, "ema": ema,
            "curve": curve, "seconds": earlier_s + time.monotonic() - started,
            "lora": {n: p.detach().cpu() for n, p in lora_named},
            "head": model.head.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if device == "cuda" else None,
            "averaged": None if averaged is None else [t.cpu() for t in averaged]})

    # Ctrl-C and SIGTERM (a preempted machine, `kill`) finish the step in progress, save a
    # checkpoint and stop: a half-applied optimizer step is never saved.
    stop_signal: list[int] = []
    main_thread = threading.current_thread() is threading.main_thread()  # signals need it
    previous = {sig: signal.signal(sig, lambda signum, _frame: stop_signal.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM) if main_thread}
    bar = tqdm(plan[done:], desc="fine-tune", unit="batch", disable=not progress,
               dynamic_ncols=True, initial=done, total=total_steps)
    try:
        for step, batch in enumerate(bar, start=done + 1):
            train_step(model, optimizer, scheduler, lora_params, ids, labels, batch, recipe,
                       device, answers, teacher)
            if averaged is not None and average is not None:  # no_grad inside
                average(averaged, trained, step)
            tokens += sum(len(ids[i]) + (len(answers[i][0]) if answers else 0) for i in batch)
            ema = _loss_ema(model, ema)
            bar.set_postfix(loss=f"{ema:.3f}",
                            tok_s=f"{tokens / (earlier_s + time.monotonic() - started):.0f}")
            if validation_rows and step in epoch_ends and step != total_steps:
                curve.append(torch_accuracy(model, vocab, taxonomy, validation_rows, recipe))
                bar.write(f"epoch {len(curve)}: validation accuracy {curve[-1]:.4f}")
                model.peft.train()
            if step != total_steps and step % recipe.checkpoint_every_steps == 0:
                snapshot(step)
            stop = stop_signal or (stop_after_steps is not None and step >= stop_after_steps)
            if stop and step != total_steps:
                snapshot(step)
                raise TrainingInterrupted(f"stopped after step {step} of {total_steps}; "
                                          f"run again to resume from {checkpoint}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    seconds = earlier_s + time.monotonic() - started
    # With averaging, the last step's weights are measured too: the same run's baseline for it.
    last_step_accuracy = (torch_accuracy(model, vocab, taxonomy, validation_rows, recipe)
                          if averaged is not None and validation_rows else None)
    if averaged is not None:  # the averaged weights are the ones exported and measured
        with torch.no_grad():
            for param, mean in zip(trained, averaged, strict=True):
                param.copy_(mean)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.peft.save_pretrained(str(out_dir / ADAPTER_DIR))
    save_base_config(model.config, out_dir / "base-config")
    np.savez(out_dir / HEAD_FILE,
             weight=model.head.weight.detach().cpu().numpy().astype(np.float32),
             bias=model.head.bias.detach().cpu().numpy().astype(np.float32),
             labels=np.array(taxonomy.label_names))
    accuracy = None
    if validation_rows:
        accuracy = torch_accuracy(model, vocab, taxonomy, validation_rows, recipe)
        curve.append(accuracy)
    checkpoint.unlink(missing_ok=True)
    (out_dir / "train.json").write_text(json.dumps({
        "recipe": asdict(recipe), "seconds": seconds, "steps": total_steps, "tokens": tokens,
        "torch_validation_accuracy": accuracy, "epoch_validation_accuracy": curve,
        "last_step_validation_accuracy": last_step_accuracy,
        "device": device, "threads": threads,
        "fields_trained": [f.name for f in taxonomy.fields] if answers else []}, indent=2))
    return TrainResult(out_dir, seconds, total_steps, tokens, accuracy, curve, device, threads)


def train_step(model: RouterModel, optimizer: Any, scheduler: Any, params: list[Any],
               ids: list[list[int]], labels: list[int], batch: list[int], recipe: Recipe,
               device: str, answers: list[tuple[list[int], list[int]]] | None = None,
               teacher: np.ndarray | None = None) -> None:
    """One optimisation step on the rows ``batch`` (cross-entropy with label smoothing, plus,
    with ``answers``, ``recipe.field_loss_weight`` times the mean cross-entropy of the field
    tokens; with ``teacher`` scores ``[n_rows, n_labels]``, the label term is
    ``(1 - w) · cross-entropy + w · distill_loss`` with ``w = recipe.distill_weight``; with
    ``recipe.rdrop_weight``, the batch runs twice (one padded batch of both copies), the terms
    above are the mean over both passes and ``rdrop_weight · rdrop_loss`` is added; grad
    clipping at 1.0); the loss is kept on ``model.last_loss``."""
    import torch

    target = torch.tensor([labels[i] for i in batch], device=device)
    if answers is None:
        passes = 2 if recipe.rdrop_weight > 0 else 1
        scores = model.logits([ids[i] for i in batch] * passes)
        loss = torch.nn.functional.cross_entropy(scores, target.repeat(passes),
                                                 label_smoothing=recipe.label_smoothing)
        if teacher is not None:
            soft = torch.from_numpy(teacher[batch]).to(device).repeat(passes, 1)
            loss = ((1 - recipe.distill_weight) * loss + recipe.distill_weight
                    * distill_loss(scores, soft, recipe.distill_temperature))
        if passes == 2:
            loss = loss + recipe.rdrop_weight * rdrop_loss(*scores.chunk(2))
    else:
        hidden, _ = model.hidden_states([ids[i] + answers[i][0] for i in batch])
        rows = torch.arange(len(batch), device=device)
        last = torch.tensor([len(ids[i]) - 1 for i in batch], device=device)
        loss = torch.nn.functional.cross_entropy(model.head(hidden[rows, last]), target,
                                                 label_smoothing=recipe.label_smoothing)
        at_row, at_pos, wanted = [], [], []
        for row, i in enumerate(batch):
            for j, token in enumerate(answers[i][1]):
                if token != IGNORE:  # predicted from the position before it
                    at_row.append(row)
                    at_pos.append(len(ids[i]) + j - 1)
                    wanted.append(token)
        if wanted:
            picked = hidden[torch.tensor(at_row, device=device), torch.tensor(at_pos, device=device)]
            loss = loss + recipe.field_loss_weight * torch.nn.functional.cross_entropy(
                model.token_logits(picked), torch.tensor(wanted, device=device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([*params, *model.head.parameters()], 1.0)
    optimizer.step()
    scheduler.step()
    model.last_loss = float(loss.item())


def _loss_ema(model: RouterModel, ema: float | None) -> float:
    return model.last_loss if ema is None else 0.95 * ema + 0.05 * model.last_loss


def save_base_config(config: Any, path: Path) -> None:
    """Save the base model's config for llama.cpp's LoRA converter.

    A config loaded from a GGUF records ``quantization_config: gguf``, which the converter
    rejects; the adapter does not depend on it, so it is left out.
    """
    config.save_pretrained(str(path))
    data = json.loads((path / "config.json").read_text())
    data.pop("quantization_config", None)
    (path / "config.json").write_text(json.dumps(data, indent=2) + "\n")


def torch_accuracy(model: RouterModel, vocab: Any, taxonomy: Taxonomy,
                   rows: list[tuple[str, str]], recipe: Recipe) -> float:
    """Accuracy of the PyTorch model on ``rows`` (a sanity check before export)."""
    import torch

    ids, labels = encode_rows(vocab, taxonomy, rows, recipe)
    model.peft.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(ids), 32):
            predicted = model.logits(ids[start:start + 32]).argmax(dim=1).cpu().tolist()
            correct += sum(p == t for p, t in zip(predicted, labels[start:start + 32], strict=True))
    return correct / len(ids)

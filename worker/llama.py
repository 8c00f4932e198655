"""A thin wrapper over llama.cpp's C API (through ``llama_cpp``'s ctypes bindings).

Why not ``llama_cpp.Llama``: its ``eval`` copies a vocab-sized row of scores per token into a
NumPy array (~1 MiB per token for Gemma's 262k vocabulary), and ``save_state``/``load_state``
copy those rows too. Routing needs neither. This wrapper keeps one context, one batch, and hands
out the last position's logits as a zero-copy view.

Import this module only in a process that will decode (a worker child, a benchmark, a test):
importing ``llama_cpp`` loads libgomp, which reads ``OMP_WAIT_POLICY`` once, at load time.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models.errors import ModelUnavailable
from worker.cpus import set_openmp_passive

set_openmp_passive()

import llama_cpp  # noqa: E402  (after OMP_WAIT_POLICY is set)

_LOG_SINK = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
_BACKEND_READY = False


def _ggml_library() -> ctypes.CDLL:
    """ggml's C library as llama-cpp-python ships it (for the tensor accessors ``_HiddenTap``
    needs: ``ggml_get_name``, ``ggml_nelements``, ``ggml_backend_tensor_get``)."""
    from llama_cpp._ggml import libggml  # the library llama_cpp itself links against

    libggml.ggml_get_name.restype = ctypes.c_char_p
    libggml.ggml_get_name.argtypes = [ctypes.c_void_p]
    libggml.ggml_nelements.restype = ctypes.c_int64
    libggml.ggml_nelements.argtypes = [ctypes.c_void_p]
    libggml.ggml_backend_tensor_get.restype = None
    libggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                                ctypes.c_size_t]
    return libggml


_GGML = _ggml_library()


class _HiddenTap:
    """llama.cpp's graph-evaluation callback (``cb_eval``), used to read the final hidden
    state and skip the output layer.

    The router needs the last token's final-normed hidden state (the graph tensor llama.cpp
    names ``result_norm``, ``[n_embd, n_outputs]``), never its logits. While ``armed``, the
    callback asks the scheduler to stop at ``result_norm``, copies its rows and returns
    ``False``, which ends the graph's computation there (ggml-backend.h: "if the user returns
    false, the scheduler will cancel the graph compute"), so the 262k-row output layer (Gemma 3's tied
    embedding, about 170 MB of weights to stream per output row) is never run. The KV-cache
    writes of every layer come before ``result_norm`` in the graph, so they are done.
    Unarmed, it asks for nothing and the graph runs whole. Either way it is one Python call
    per graph node: an armed decode measured within 1-5 % of a decode of the same tokens with
    no output row at all (``bench.routing``'s label-head floor). Works on any backend (the
    rows are copied with ``ggml_backend_tensor_get``).
    """

    NAME = b"result_norm"

    def __init__(self, n_embd: int):
        self.n_embd = n_embd
        self.armed = False
        #: the output rows of the last armed decode, ``[n_outputs, n_embd]`` float32
        self.rows: npt.NDArray[np.float32] | None = None
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_node)

    def _on_node(self, tensor: int, ask: bool, user_data: int) -> bool:
        if not self.armed or _GGML.ggml_get_name(tensor) != self.NAME:
            return False
        if ask:
            return True
        n = int(_GGML.ggml_nelements(tensor))
        if n < self.n_embd:  # a micro-batch without output rows: compute on
            return True
        rows = np.empty((n // self.n_embd, self.n_embd), dtype=np.float32)
        _GGML.ggml_backend_tensor_get(tensor, rows.ctypes.data, 0, rows.nbytes)
        self.rows = rows
        return False  # stop here: the output layer is not computed


def init_backend(quiet: bool) -> None:
    """Initialise llama.cpp once per process; ``quiet`` silences its log (first call decides)."""
    global _BACKEND_READY
    if not _BACKEND_READY:
        if quiet:
            llama_cpp.llama_log_set(_LOG_SINK, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _BACKEND_READY = True


class Vocab:
    """A model's tokenizer, through llama.cpp: the same ids at training and serving time."""

    def __init__(self, vocab: Any):
        self._vocab = vocab
        self.n_tokens = int(llama_cpp.llama_vocab_n_tokens(vocab))
        self.bos = int(llama_cpp.llama_vocab_bos(vocab))

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = False) -> list[int]:
        """Token ids of ``text``; ``special=False`` keeps control-token text as plain text."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, capacity, add_bos, special)
        if n < 0:
            capacity = -n
            buf = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, capacity, add_bos,
                                         special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (special tokens render as empty)."""
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens (EOS, end of turn)."""
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))


def load_vocab(model_path: Path, quiet: bool = True) -> Vocab:
    """Load only the tokenizer of a GGUF model (no weights). Raises ``ModelUnavailable``."""
    init_backend(quiet)
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), params)
    if not model:
        raise ModelUnavailable(f"llama.cpp could not read the vocabulary of {model_path}")
    vocab = Vocab(llama_cpp.llama_model_get_vocab(model))
    vocab._model = model  # type: ignore[attr-defined]  # keep the model (and vocab) alive
    return vocab


def load_model(model_path: Path, repack: bool, quiet: bool = True) -> Any:
    """Load a GGUF model's weights (mmap'd) and structures; returns llama.cpp's model pointer.

    For ``preload_model``: the worker parent calls it before Celery forks the children, which
    then share the model's structures (vocabulary, tensor metadata) copy-on-write instead of
    each building its own, and create only their contexts (``LlamaRuntime(model=...)``).
    The load, repacking included, starts no thread (``tests/test_fleet.py`` checks it: an
    OpenMP team would not survive the fork), so the parent may repack and the children share
    the repacked copy too; OpenMP first runs at a child's first decode.
    Raises ``ModelUnavailable`` when the file does not load.
    """
    init_backend(quiet)
    mparams = llama_cpp.llama_model_default_params()
    mparams.use_mmap = True
    mparams.n_gpu_layers = 0
    # repack: llama.cpp copies Q4_K weights into an interleaved layout (CPU_REPACK buffers)
    # for faster AVX2/AVX-512 kernels. The copy is private anonymous memory in *each*
    # process, next to the shared mmap (llama.cpp #16761). Off: every child computes
    # straight from the one shared mapping.
    mparams.use_extra_bufts = repack
    model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mparams)
    if not model:
        raise ModelUnavailable(f"llama.cpp could not load {model_path}")
    return model


class LlamaRuntime:
    """One mmap'd GGUF model and one decoding context.

    ``n_ctx`` cells of KV cache (tokens), decoded in chunks of ``n_batch`` tokens (``n_ubatch``
    per compute step; a smaller ubatch shrinks the compute buffer: 129 MiB at 128 vs 514 MiB at
    512 measured here for Gemma 3 270M). ``n_seq_max`` sequences share a unified KV cache.
    ``repack`` keeps llama.cpp's repacked weight copy (faster kernels, private memory per
    process; 11 MiB for Gemma 3 270M Q4_K_M, measured). The sliding-window layers keep
    full-size KV (``swa_full``), which is what makes it correct to keep a prefix and drop only
    a ticket's cells (a pruned window would have lost the prefix's early positions).
    Raises ``ModelUnavailable`` when the file does not load.
    """

    def __init__(self, model_path: Path, *, n_ctx: int, n_threads: int, n_batch: int = 256,
                 n_ubatch: int = 128, n_seq_max: int = 1, lora_path: Path | None = None,
                 embeddings: bool = False, repack: bool = True, quiet: bool = True,
                 model: Any = None):
        init_backend(quiet)
        #: a model loaded by ``load_model`` (e.g. before fork) is shared and never freed here
        self._owns_model = model is None
        self.model = load_model(model_path, repack, quiet) if model is None else model
        self.vocab = Vocab(llama_cpp.llama_model_get_vocab(self.model))
        self.n_vocab = self.vocab.n_tokens
        self.n_embd = int(llama_cpp.llama_model_n_embd(self.model))
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = min(n_ubatch, n_batch)
        cparams.n_seq_max = n_seq_max
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        cparams.swa_full = True
        cparams.kv_unified = True
        cparams.no_perf = True
        cparams.embeddings = embeddings
        #: reads the hidden state for ``decode_hidden`` (only when ``embeddings``)
        self._tap = _HiddenTap(self.n_embd) if embeddings else None
        if self._tap is not None:
            cparams.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE
            cparams.cb_eval = self._tap.callback
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            if self._owns_model:
                llama_cpp.llama_model_free(self.model)
            raise ModelUnavailable(f"llama.cpp could not create a context for {model_path}")
        self.adapter = None
        if lora_path is not None:
            self.adapter = llama_cpp.llama_adapter_lora_init(self.model, str(lora_path).encode())
            if not self.adapter:
                self.close()
                raise ModelUnavailable(f"llama.cpp could not load the LoRA adapter {lora_path}")
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.adapter)
            scales = (ctypes.c_float * 1)(1.0)
            if llama_cpp.llama_set_adapters_lora(self.ctx, adapters, 1, scales) != 0:
                self.close()
                raise ModelUnavailable(f"llama.cpp refused the LoRA adapter {lora_path}")
        self.n_ctx = int(llama_cpp.llama_n_ctx(self.ctx))
        # Embeddings mode stays off (``decode_hidden`` reads the hidden state through the tap):
        # with it on, llama.cpp outputs every token of a batch, so the 262k-row output layer
        # ran for every ticket token (issue 16: 155 vs 75 ms a ticket). It is created on so
        # that ``decode_all_outputs`` (the benchmark's taxed path) can switch it back on.
        if embeddings:
            llama_cpp.llama_set_embeddings(self.ctx, False)
        self.n_batch = n_batch
        self.n_threads = n_threads
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, n_seq_max)
        self.bos = self.vocab.bos

    # ---- vocabulary (delegates) ---------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = False) -> list[int]:
        """See ``Vocab.tokenize``."""
        return self.vocab.tokenize(text, add_bos=add_bos, special=special)

    def piece(self, token: int) -> bytes:
        """See ``Vocab.piece``."""
        return self.vocab.piece(token)

    def is_eog(self, token: int) -> bool:
        """See ``Vocab.is_eog``."""
        return self.vocab.is_eog(token)

    # ---- decoding -----------------------------------------------------------------------------
    def decode(self, tokens: list[int], pos0: int, seq_id: int = 0) -> npt.NDArray[np.float32]:
        """Append ``tokens`` to sequence ``seq_id`` at positions ``pos0...``; return the logits
        after the last token (a view of shape ``[n_vocab]``, valid until the next decode).

        Only the last token is an output: chunks before it (``n_batch`` tokens each) are
        decoded without any, so the output layer runs once per call.
        Raises ``RuntimeError`` when llama.cpp fails to find KV space or to compute.
        """
        self._decode(tokens, pos0, seq_id, output_last=True)
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def prefill(self, tokens: list[int], pos0: int, seq_id: int = 0) -> None:
        """Append ``tokens`` to the KV cache with no output row at all: the tokens through the
        model's blocks and nothing else (a prefix to keep; the floor of a label-head router,
        ``bench.routing.measure_floor``). Raises ``RuntimeError`` as ``decode`` does."""
        self._decode(tokens, pos0, seq_id, output_last=False)

    def _decode(self, tokens: list[int], pos0: int, seq_id: int, output_last: bool) -> None:
        if not tokens:
            raise ValueError("decode needs at least one token")
        batch = self._batch
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            batch.n_tokens = len(chunk)
            for i, token in enumerate(chunk):
                batch.token[i] = token
                batch.pos[i] = pos0 + start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq_id
                batch.logits[i] = 0
            if output_last and start + len(chunk) == len(tokens):
                batch.logits[len(chunk) - 1] = 1
            status = llama_cpp.llama_decode(self.ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode returned {status}")

    def decode_hidden(self, tokens: list[int], pos0: int, seq_id: int = 0
                      ) -> npt.NDArray[np.float32]:
        """Append ``tokens`` like ``decode`` and return the final hidden state (after the
        output norm) of the last one, shape ``[n_embd]`` (a copy).

        One decode, embeddings mode off, the last token the only output; the graph stops at
        the hidden state (``_HiddenTap``), so the output layer never runs and the logits of
        this call are not valid. Equal to one decode in embeddings mode up to float rounding
        (only the last block's feed-forward runs on the output row alone): on the router's
        1,001 validation tickets the same labels and confidences within 3e-7, at 2.4-3.6x
        less time (``bench.embeddings_tax``).
        Needs ``embeddings=True``; raises ``RuntimeError`` as ``decode`` does, or when the
        model's graph has no ``result_norm`` tensor.
        """
        return self._read_hidden(lambda: self._decode(tokens, pos0, seq_id, output_last=True))[-1]

    @property
    def last_hidden(self) -> npt.NDArray[np.float32] | None:
        """The hidden state the last ``decode_hidden`` read, ``[n_embd]``; None before one."""
        rows = self._tap.rows if self._tap is not None else None
        return None if rows is None else rows[-1]

    def decode_batch_hidden(self) -> npt.NDArray[np.float32]:
        """Decode the caller-filled batch ``self._batch`` (several sequences at once, its
        ``logits`` flags marking the output rows) and return the final hidden states of its
        output rows in batch order, shape ``[n_outputs, n_embd]``; no output layer, as
        ``decode_hidden``. For micro-batching (``bench.microbatch``). Raises as
        ``decode_hidden``."""
        def run() -> None:
            if llama_cpp.llama_decode(self.ctx, self._batch) != 0:
                raise RuntimeError("llama_decode failed")
        return self._read_hidden(run)

    def _read_hidden(self, run: Callable[[], None]) -> npt.NDArray[np.float32]:
        tap = self._tap
        if tap is None:
            raise RuntimeError("no embeddings: the runtime was created without embeddings=True")
        tap.armed, tap.rows = True, None
        try:
            run()
        finally:
            tap.armed = False
        if tap.rows is None:
            raise RuntimeError("llama.cpp's graph produced no result_norm tensor to read")
        return tap.rows

    def decode_all_outputs(self, tokens: list[int], pos0: int) -> npt.NDArray[np.float32]:
        """The old, taxed path: one decode of ``tokens`` with embeddings on (every token of the
        batch goes through the output layer); returns the last token's hidden state. Kept for
        the benchmark and the equivalence test only."""
        llama_cpp.llama_set_embeddings(self.ctx, True)
        try:
            self.decode(tokens, pos0)
            return self.embedding()
        finally:
            llama_cpp.llama_set_embeddings(self.ctx, False)

    def embedding(self) -> npt.NDArray[np.float32]:
        """The final hidden state (after the output norm) of the last decoded token, shape
        ``[n_embd]`` (a copy). Needs ``embeddings=True``."""
        ptr = llama_cpp.llama_get_embeddings_ith(self.ctx, -1)
        if not ptr:
            raise RuntimeError("no embeddings: the runtime was created without embeddings=True")
        return np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).copy()

    def forget(self, seq_id: int, from_pos: int) -> None:
        """Drop sequence ``seq_id``'s KV cells at positions >= ``from_pos`` (keep the prefix)."""
        if not llama_cpp.llama_memory_seq_rm(self.memory, seq_id, from_pos, -1):
            raise RuntimeError("llama.cpp refused a partial KV removal")

    def clear(self) -> None:
        """Drop every KV cell of every sequence."""
        llama_cpp.llama_memory_clear(self.memory, True)

    def close(self) -> None:
        """Free the batch, the context and the model (idempotent)."""
        if getattr(self, "ctx", None):
            if hasattr(self, "_batch"):
                llama_cpp.llama_batch_free(self._batch)  # adapters are freed with the model
            llama_cpp.llama_free(self.ctx)
            if self._owns_model:
                llama_cpp.llama_model_free(self.model)
            self.ctx = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()

"""Memory estimates from model files, before anything is loaded — each with its basis.

An :class:`Estimate` is bytes in three parts (weights, KV cache, buffers) plus the basis
it was computed from (the fields read, the formula, the file), so it can be printed,
checked, and compared with what the load measured.  Sources:

* **GGUF** (llama.cpp, Ollama's blobs; :func:`gguf_estimate`): weights = the tensor
  table's bytes (elements × ``GGML_QUANT_SIZES`` type size ÷ block size, quantised types
  included, nothing loaded: ``gguf.GGUFReader`` maps the file); KV cache =
  Σ over attention layers of cells × (K heads × K head size + V heads × V head size) ×
  bytes per element of ``cache_type_k/v``, as ``src/llama-kv-cache.cpp`` allocates it —
  cells = the context padded to 256 (``llama-context.cpp``), sliding-window layers
  ``min(cells, window × slots + n_ubatch)`` padded to 256 (``llama-kv-cache-iswa.cpp``),
  Mamba-style recurrent layers ``slots × ((d_conv − 1)(d_inner + 2·groups·d_state) +
  d_state·d_inner) × 4`` (``llama-hparams.cpp`` ``n_embd_r``/``n_embd_s``); buffers =
  llama-server's compute and output buffers and its own resident size, an allowance
  fitted to the buffer sizes the real server logs (see :data:`LLAMA_SERVER_BASE`).
* **safetensors** (transformers, sentence-transformers, diffusers;
  :func:`safetensors_estimate`): elements per tensor from each file's header
  (``safetensors.safe_open``, nothing loaded) × the bytes of the dtype asked for
  (floating tensors cast, others kept); a sharded checkpoint is the sum of the shards
  its index names, a diffusers pipeline the sum of the components ``model_index.json``
  names.
* **Ollama** (:func:`ollama_estimate`): ``/api/show``'s ``model_info`` into the same KV
  formula (f16, ``num_ctx`` × ``num_parallel`` cells) + the weights + the graph surcharge,
  as Ollama's ``llm/llama_server.go`` ``PredictServerVRAM`` and ``server/sched.go``
  ``generationBatchSurcharge`` predict them.
* **vLLM** (:func:`vllm_estimate`): ``gpu_memory_utilization`` × the device's total: it
  pre-allocates that fraction whatever the model.

An architecture the formula does not know (no attention fields, or a recurrent family
other than Mamba) falls back to the file's size, with basis ``"file size only"``.
Errors: :class:`~modelmora.errors.ModelFileError` for a file that cannot be read, naming
the file and what is wrong.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelFileError
from .spec import format_size

MIB = 1024**2
GIB = 1024**3
FILE_SIZE_ONLY = "file size only"

LLAMA_SERVER_BASE = 6 * MIB
"""Resident bytes of llama-server beyond its logged buffers (its code, threads and HTTP
server): RSS minus the logged model + KV + compute buffers of the models in
:func:`_llama_buffers`' list came to −11..+7 MiB (the compute buffer is reserved, not all
of it touched)."""


@dataclass(frozen=True)
class Estimate:
    """What a model will take, in bytes, and how that was worked out.

    ``weights`` + ``kv_cache`` + ``buffers`` = :attr:`total` on ``device``.  ``basis`` is
    one line naming the formula and the fields used; ``source`` the file, folder or URL
    read; ``context``/``parallel`` the tokens and slots the KV cache was sized for (None
    where there is none); ``fields`` the metadata values read."""

    weights: int
    kv_cache: int = 0
    buffers: int = 0
    device: str = "cpu"
    basis: str = ""
    source: str = ""
    context: int | None = None
    parallel: int | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.buffers

    @property
    def file_size_only(self) -> bool:
        return self.basis.startswith(FILE_SIZE_ONLY)

    def memory(self) -> dict[str, int]:
        """Bytes per device, as ``ModelSpec.memory`` holds them."""
        return {self.device: self.total}

    def error(self, measured: int) -> float | None:
        """estimate ÷ measured (1.0 is exact; None when nothing was measured)."""
        return self.total / measured if measured > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total, "weights": self.weights, "kv_cache": self.kv_cache,
            "buffers": self.buffers, "device": self.device, "basis": self.basis, "source": self.source,
            "context": self.context, "parallel": self.parallel, "fields": dict(self.fields),
        }  # fmt: skip

    def describe(self) -> str:
        parts = f"weights {format_size(self.weights)}"
        if self.kv_cache:
            parts += f" + KV cache {format_size(self.kv_cache)}"
        if self.buffers:
            parts += f" + buffers {format_size(self.buffers)}"
        return f"{format_size(self.total)} on {self.device} ({parts}; {self.basis})"


# -- GGUF ---------------------------------------------------------------------------------

RECURRENT_UNKNOWN = ("rwkv", "lfm2", "qwen3next", "qwen35", "kimi", "minimax", "plamo2", "falcon-h1")
"""Families with recurrent or linear-attention state the formula does not model (RWKV's
wkv state, LFM2's short convolutions, gated delta nets, ...): file size only."""

SWA_PATTERN = {
    "gemma2": 2, "gemma3": 6, "gemma3n": 5, "gemma-embedding": 6, "cohere2": 4, "exaone4": 4,
    "llama4": 4, "olmo2": 4, "gpt-oss": 2, "afmoe": 4, "plamo3": 8,
}  # fmt: skip
"""Default sliding-window pattern per architecture (``src/models/<arch>.cpp``
``load_swa_pattern``): of every n layers the last one is full attention.  The GGUF's own
``<arch>.attention.sliding_window_pattern`` (a number or one bool per layer) wins."""


@dataclass(frozen=True)
class GGUFModel:
    """What a GGUF says about memory: its metadata values and tensor table, read once."""

    path: Path
    file_size: int
    arch: str
    values: Mapping[str, Any]  # metadata key → value (scalars and short arrays)
    tensor_bytes: Mapping[str, int]  # GGML type name → bytes of tensors of that type
    tensor_count: int
    vocab: int

    @property
    def weights(self) -> int:
        return sum(self.tensor_bytes.values())

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key.format(arch=self.arch), default)


def read_gguf(path: str | Path) -> GGUFModel:
    """Read a GGUF's metadata and tensor table without loading weights (``GGUFReader``
    maps the file).  Raises :class:`ModelFileError` naming the file when it is missing,
    truncated or not a GGUF."""
    import gguf

    path = Path(path)
    try:
        size = path.stat().st_size
        reader = gguf.GGUFReader(path, "r")
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (ValueError, IndexError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path}: not a readable GGUF (truncated or corrupt header): {exc}") from None
    values: dict[str, Any] = {}
    vocab = 0
    for key, item in reader.fields.items():
        if key == "tokenizer.ggml.tokens":
            vocab = len(item.data)
        if key.startswith("tokenizer.") or (len(item.data) > 4096):
            continue
        try:
            values[key] = item.contents()
        except (ValueError, UnicodeDecodeError):
            continue
    by_type: dict[str, int] = {}
    for tensor in reader.tensors:
        name = tensor.tensor_type.name
        by_type[name] = by_type.get(name, 0) + int(tensor.n_bytes)
    data_end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if data_end > size:
        raise ModelFileError(
            f"{path}: truncated: its tensor table needs {data_end} bytes, the file has {size}"
        )
    arch = str(values.get("general.architecture") or "")
    if not vocab:
        vocab = int(values.get(f"{arch}.vocab_size") or 0)
    return GGUFModel(path, size, arch, values, by_type, len(reader.tensors), vocab)


def cache_type_bytes(name: str) -> float:
    """Bytes per element of a llama.cpp KV cache type (``f16``, ``q8_0``, ...), from
    ``gguf.constants.GGML_QUANT_SIZES``.  Raises ValueError for an unknown type."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[name.upper()]]
    except KeyError:
        raise ValueError(f"unknown KV cache type {name!r} (f16, bf16, f32, q8_0, q4_0, ...)") from None
    return size / block


def _per_layer(value: Any, layers: int, default: int = 0) -> list[int]:
    if isinstance(value, list):
        out = [int(v) for v in value[:layers]]
        return out + [out[-1] if out else default] * (layers - len(out))
    return [int(value if value is not None else default)] * layers


def _pad(n: int, to: int = 256) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class KVLayout:
    """Per-layer cache shape of a GGUF's architecture (bytes come from cache types)."""

    k_width: list[int]  # K heads × K head size per layer (0: no attention cache)
    v_width: list[int]
    swa: list[bool]
    window: int
    recurrent: list[bool]
    state_per_seq: int  # f32 elements of recurrent state per recurrent layer and sequence

    def bytes(self, cells: int, swa_cells: int, slots: int, k_bytes: float, v_bytes: float) -> int:
        total = 0.0
        for k, v, swa, rec in zip(self.k_width, self.v_width, self.swa, self.recurrent, strict=True):
            if rec:
                total += self.state_per_seq * 4 * max(1, slots)
            else:
                total += (swa_cells if swa else cells) * (k * k_bytes + v * v_bytes)
        return int(total)


def kv_layout(model: GGUFModel) -> KVLayout | None:
    """The cache shape per layer, or None when the architecture is one the formula does
    not know (no attention fields, or a recurrent family other than Mamba)."""
    arch = model.arch
    layers = int(model.get("{arch}.block_count", 0) or 0)
    embd = int(model.get("{arch}.embedding_length", 0) or 0)
    if not arch or layers <= 0 or embd <= 0 or any(arch.startswith(f) for f in RECURRENT_UNKNOWN):
        return None
    ssm = model.get("{arch}.ssm.inner_size")
    heads = _per_layer(model.get("{arch}.attention.head_count"), layers)
    if not ssm and not any(heads):
        return None
    kv_raw = model.get("{arch}.attention.head_count_kv")
    kv_heads = _per_layer(kv_raw, layers) if kv_raw is not None else list(heads)
    head0 = heads[0] or max(heads, default=0) or 1
    k_len = int(model.get("{arch}.attention.key_length", 0) or embd // head0)
    v_len = int(model.get("{arch}.attention.value_length", 0) or embd // head0)
    window = int(model.get("{arch}.attention.sliding_window", 0) or 0)
    pattern = model.get("{arch}.attention.sliding_window_pattern", SWA_PATTERN.get(arch, 0) if window else 0)
    if isinstance(pattern, list):
        swa = [bool(p) for p in pattern[:layers]] + [False] * (layers - len(pattern))
    else:
        n = int(pattern or 0)
        swa = [bool(window) and n > 1 and i % n < n - 1 for i in range(layers)]
    k_swa = int(model.get("{arch}.attention.key_length_swa", 0) or k_len)
    v_swa = int(model.get("{arch}.attention.value_length_swa", 0) or v_len)
    if ssm:  # Mamba, or a hybrid whose recurrent layers have no KV heads
        recurrent = [h == 0 for h in kv_heads] if kv_raw is not None else [True] * layers
        d_conv = int(model.get("{arch}.ssm.conv_kernel", 0) or 0)
        d_state = int(model.get("{arch}.ssm.state_size", 0) or 0)
        groups = int(model.get("{arch}.ssm.group_count", 0) or 0)
        state = max(0, d_conv - 1) * (int(ssm) + 2 * groups * d_state) + d_state * int(ssm)
    else:
        recurrent, state = [False] * layers, 0
    return KVLayout(
        k_width=[h * (k_swa if s else k_len) for h, s in zip(kv_heads, swa, strict=True)],
        v_width=[h * (v_swa if s else v_len) for h, s in zip(kv_heads, swa, strict=True)],
        swa=swa, window=window, recurrent=recurrent, state_per_seq=state,
    )  # fmt: skip


def _llama_buffers(
    model: GGUFModel, layout: KVLayout, per_stream: int, slots: int, ubatch: int, flash: bool
) -> int:
    """llama-server's compute + output buffers and its own resident memory (bytes): an
    allowance fitted to what the server logs (``sched_reserve: CPU compute buffer size``,
    ``llama_context: CPU output buffer size``; llama.cpp as vendored in llama-cpp-python
    0.3.36, CPU, F32/Q8_0 llama GGUFs of 17-180 MiB, n_ctx 1024-16384, n_ubatch 256/512,
    flash attention on and off; benchmarks/bench_estimates.py re-checks it):

    * compute = n_ubatch × 4 B × (max(3.5 × n_ff, 9 × n_embd) + n_vocab)  — the graph's
      widest live set per token (the FFN's gate/up/product or the attention's
      projections) plus the logits of a batch of outputs; within ±12 % of the logged size
      over the models above;
    * + the attention mask, n_ctx per stream × n_ubatch × 2 B (f16), and without flash
      attention the scores, n_ctx per stream × n_ubatch × heads × 4 B;
    * + the output buffer, n_vocab × 4 B per slot;
    * + :data:`LLAMA_SERVER_BASE` for the process itself (code, threads, HTTP server)."""
    embd = int(model.get("{arch}.embedding_length", 0) or 0)
    ff_raw = model.get("{arch}.feed_forward_length", 0) or 0
    ff = max(ff_raw) if isinstance(ff_raw, list) else int(ff_raw)
    heads_raw = model.get("{arch}.attention.head_count", 0) or 0
    heads = max(heads_raw) if isinstance(heads_raw, list) else int(heads_raw)
    compute = ubatch * 4 * (max(7 * ff // 2, 9 * embd) + model.vocab)
    compute += per_stream * ubatch * 2
    if not flash:
        compute += per_stream * ubatch * heads * 4
    return compute + model.vocab * 4 * max(1, slots) + LLAMA_SERVER_BASE


def gguf_estimate(
    source: str | Path | GGUFModel,
    *,
    ctx: int | None = None,
    parallel: int | None = None,
    cache_type_k: str = "f16",
    cache_type_v: str = "f16",
    ubatch: int = 512,
    unified: bool | None = None,
    flash_attn: bool = True,
    device: str = "cpu",
) -> Estimate:
    """What llama-server takes for a GGUF with ``ctx`` tokens of context (None: the
    model's trained context, llama-server's default) over ``parallel`` slots (None:
    llama-server's automatic 4 slots with a unified cache).  Bytes.  Raises
    :class:`ModelFileError` for an unreadable file, ValueError for an unknown cache type."""
    model = source if isinstance(source, GGUFModel) else read_gguf(source)
    layout = kv_layout(model)
    native = int(model.get("{arch}.context_length", 0) or 0)
    types = ", ".join(
        f"{n} {format_size(b)}" for n, b in sorted(model.tensor_bytes.items(), key=lambda i: -i[1])
    )
    if layout is None:
        return Estimate(
            weights=model.file_size, device=device, source=str(model.path),
            basis=f"{FILE_SIZE_ONLY}: architecture {model.arch or '(none)'!r} is not one the KV formula knows",
            fields={"architecture": model.arch},
        )  # fmt: skip
    slots = parallel if parallel is not None else 4
    if unified is None:
        unified = parallel is None  # tools/server/server.cpp: automatic slots share one cache
    k_bytes, v_bytes = cache_type_bytes(cache_type_k), cache_type_bytes(cache_type_v)
    n_ctx = _pad(ctx if ctx else (native or 4096))
    streams = 1 if unified else max(1, slots)
    per_stream = _pad(n_ctx // streams)
    cells = per_stream * streams
    swa_cells = streams * _pad(min(per_stream, layout.window * (slots if unified else 1) + ubatch))
    kv = layout.bytes(cells, swa_cells, slots, k_bytes, v_bytes)
    buffers = _llama_buffers(model, layout, per_stream, slots, ubatch, flash_attn)
    attention = sum(1 for r in layout.recurrent if not r)
    basis = (
        f"GGUF tensor table ({model.tensor_count} tensors: {types}) + KV {cache_type_k}/{cache_type_v} "
        f"for {cells} cells × {attention} attention layers"
        + (
            f" ({sum(layout.swa)} sliding-window of {layout.window}: {swa_cells} cells)"
            if any(layout.swa)
            else ""
        )
        + (f" + {sum(layout.recurrent)} recurrent layers' state" if any(layout.recurrent) else "")
        + " + llama-server buffers"
    )
    return Estimate(
        weights=model.weights, kv_cache=kv, buffers=buffers, device=device, basis=basis,
        source=str(model.path), context=cells, parallel=slots,
        fields={
            "architecture": model.arch, "block_count": len(layout.k_width), "context_length": native,
            "kv_width_k": max(layout.k_width, default=0), "kv_width_v": max(layout.v_width, default=0),
            "sliding_window": layout.window, "vocab": model.vocab, "tensor_bytes": dict(model.tensor_bytes),
        },
    )  # fmt: skip


# -- safetensors and Hugging Face folders -------------------------------------------------

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 0.5,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
"""Bytes per element of each safetensors dtype (the format's ``Dtype`` enum)."""
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
TORCH_DTYPES = {
    "float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8, "double": 8,
}  # fmt: skip


def safetensors_elements(path: str | Path) -> dict[str, int]:
    """Elements per dtype in one safetensors file, from its header only
    (``safetensors.safe_open``).  Raises :class:`ModelFileError` naming the file."""
    from safetensors import safe_open

    path = Path(path)
    out: dict[str, int] = {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 (a safe_open handle is not a mapping)
                piece = f.get_slice(name)
                dtype = str(piece.get_dtype())
                out[dtype] = out.get(dtype, 0) + math.prod(int(d) for d in piece.get_shape())
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    except Exception as exc:  # SafetensorError derives from Exception only
        words = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(
            f"{path}: not a readable safetensors file (truncated or corrupt header): {words}"
        ) from None
    return out


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors a Hugging Face folder loads: the shards its index names, else
    ``*.safetensors`` in the folder (a sentence-transformers folder adds its modules')."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelFileError(f"{indexes[0]}: not a readable shard index: {exc}") from None
    files = sorted(folder.glob("*.safetensors"))
    modules = folder / "modules.json"
    if modules.is_file():
        try:
            entries = json.loads(modules.read_text())
            for entry in entries:
                sub = str(entry.get("path") or "")
                if sub:
                    files += sorted((folder / sub).glob("*.safetensors"))
        except (OSError, ValueError, AttributeError) as exc:
            raise ModelFileError(f"{modules}: not readable: {exc}") from None
    return files


def safetensors_estimate(source: str | Path, *, dtype: str | None = None, device: str = "cpu") -> Estimate:
    """Bytes of a safetensors file, a Hugging Face model folder (sharded or not, with a
    sentence-transformers ``modules.json``) or a diffusers pipeline folder (the sum of the
    components in ``model_index.json``), loaded as ``dtype`` (a torch dtype name such as
    ``"float16"``: floating tensors take its size, others keep theirs; None: as stored,
    except diffusers pipelines, which load in float32 unless told).  Raises
    :class:`ModelFileError` for a missing or unreadable file or folder."""
    path = Path(source)
    if dtype is not None and str(dtype).removeprefix("torch.") not in TORCH_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (float32, float16, bfloat16)")
    cast = TORCH_DTYPES.get(str(dtype).removeprefix("torch.")) if dtype else None
    files: list[Path]
    kind = "safetensors"
    if path.is_file():
        files = [path]
    elif path.is_dir() and (path / "model_index.json").is_file():
        kind = "diffusers pipeline"
        try:
            index = json.loads((path / "model_index.json").read_text())
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"{path / 'model_index.json'}: not readable: {exc}") from None
        components = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)]
        files = [f for c in sorted(components) if (path / c).is_dir() for f in _weight_files(path / c)]
        cast = cast or 4
    elif path.is_dir():
        files = _weight_files(path)
    else:
        raise ModelFileError(f"{path}: no such file or folder")
    if not files:
        raise ModelFileError(f"{path}: no safetensors weights found (other formats are not estimated)")
    elements: dict[str, int] = {}
    for f in files:
        for dt, n in safetensors_elements(f).items():
            elements[dt] = elements.get(dt, 0) + n
    weights = int(
        sum(
            n * (cast if cast and dt in FLOAT_DTYPES else DTYPE_BYTES.get(dt, 4))
            for dt, n in elements.items()
        )
    )
    stored = ", ".join(f"{dt} {n:,}" for dt, n in sorted(elements.items()))
    loaded = f"as {dtype}" if dtype else ("as float32 (diffusers' default)" if cast else "as stored")
    return Estimate(
        weights=weights, device=device, source=str(path),
        basis=f"{kind} headers ({len(files)} file(s); elements {stored}) × bytes per element {loaded}",
        fields={"files": [str(f) for f in files], "elements": elements, "dtype": dtype},
    )  # fmt: skip


# -- Ollama and vLLM ----------------------------------------------------------------------


def graph_surcharge(context: int) -> int:
    """Bytes a completion model's automatic batch adds in Ollama (``server/sched.go``
    ``generationBatchForContext`` and ``generationBatchSurcharge``) for ``context`` tokens."""
    if context > 32768:
        return 2 * GIB
    if context > 4096:
        return 768 * MIB
    return 0


def show_kv_per_token(model_info: Mapping[str, Any]) -> int:
    """KV-cache bytes per token of context from ``/api/show``'s ``model_info``: the GGUF
    formula above at f16 (2 × layers × KV heads × head size × 2 bytes for a plain model);
    0 when the architecture is not one it knows."""
    arch = str(model_info.get("general.architecture", ""))
    model = GGUFModel(Path("/api/show"), 0, arch, dict(model_info), {}, 0, 0)
    layout = kv_layout(model)
    if layout is None:
        return 0
    return layout.bytes(1, 1, 1, 2, 2) if not any(layout.recurrent) else layout.bytes(1, 1, 0, 2, 2)


def ollama_estimate(
    show: Mapping[str, Any],
    *,
    weights: int,
    num_ctx: int,
    parallel: int = 1,
    embedding: bool = False,
    auto_batch: bool = True,
    device: str = "cuda:0",
    kv_per_token: int | None = None,
    source: str = "/api/show",
) -> Estimate:
    """What Ollama will hold for a model (bytes): ``weights`` (its ``/api/tags`` size) + the
    KV cache of ``num_ctx`` (capped at the trained context, ``effectiveContext``) ×
    ``parallel`` slots (1 for embedding models) + the graph surcharge for completion models
    with an automatic ``num_batch`` — ``PredictServerVRAM`` + ``generationBatchSurcharge``."""
    info: Mapping[str, Any] = show.get("model_info") or {}
    arch = str(info.get("general.architecture", ""))
    native = int(info.get(f"{arch}.context_length", 0) or 0)
    context = min(num_ctx, native) if native else num_ctx
    slots = 1 if embedding else parallel
    per_token = kv_per_token if kv_per_token is not None else show_kv_per_token(info)
    surcharge = graph_surcharge(context * slots) if not embedding and auto_batch else 0
    basis = (
        f"Ollama /api/tags size + KV f16 {per_token} B/token × {context} × {slots} slot(s)"
        f" ({arch or 'unknown'}: layers, KV heads, head size from /api/show) + graph surcharge"
        if per_token
        else f"{FILE_SIZE_ONLY}: Ollama /api/tags size ({arch or 'no architecture'} in /api/show)"
    )
    return Estimate(
        weights=weights, kv_cache=per_token * context * slots, buffers=surcharge, device=device,
        basis=basis, source=source, context=context, parallel=slots,
        fields={"architecture": arch, "context_length": native, "kv_bytes_per_token": per_token,
                "quantization_level": (show.get("details") or {}).get("quantization_level"),
                "parameter_count": info.get("general.parameter_count")},
    )  # fmt: skip


def vllm_estimate(
    utilization: float, device_total: int, *, device: str = "cuda:0", gpus: int = 1
) -> Estimate:
    """vLLM pre-allocates ``gpu_memory_utilization`` × the device's total (bytes) for the
    weights, activations and KV cache together (its docs: ``--gpu-memory-utilization``), on
    each of its ``gpus`` when it runs tensor parallel (the total is all of them together).
    Raises ``ValueError`` for a utilisation outside (0, 1]."""
    if not 0 < utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    each = f" on each of {gpus} GPUs (tensor parallel)" if gpus > 1 else ""
    return Estimate(
        weights=int(utilization * device_total) * gpus, device=device, source="vllm",
        basis=f"vLLM gpu_memory_utilization {utilization:g} × device total {format_size(device_total)}{each}",
        fields={"gpu_memory_utilization": utilization, "device_total": device_total, "gpus": gpus},
    )  # fmt: skip


def file_estimate(path: str | Path, *, device: str = "cpu", **options: Any) -> Estimate:
    """An estimate for a path by its format: a ``.gguf`` file (``options`` as
    :func:`gguf_estimate`), a safetensors file or a Hugging Face / diffusers folder
    (``dtype``).  Raises :class:`ModelFileError`."""
    path = Path(path)
    if path.suffix == ".gguf" or (path.is_file() and path.open("rb").read(4) == b"GGUF"):
        keys = ("ctx", "parallel", "cache_type_k", "cache_type_v", "ubatch", "unified", "flash_attn")
        return gguf_estimate(path, device=device, **{k: v for k, v in options.items() if k in keys})
    return safetensors_estimate(path, dtype=options.get("dtype"), device=device)


__all__ = [
    "FILE_SIZE_ONLY",
    "Estimate",
    "GGUFModel",
    "cache_type_bytes",
    "file_estimate",
    "gguf_estimate",
    "graph_surcharge",
    "ollama_estimate",
    "read_gguf",
    "safetensors_elements",
    "safetensors_estimate",
    "show_kv_per_token",
    "vllm_estimate",
]

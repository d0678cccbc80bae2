"""The `data:` section: which prepared datasets a run reads, how they mix, and how `raypt data prepare` makes them."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from raypt.data.features import AudioConfig, ImageConfig
from raypt.schema import Location, Section


class PrepareConfig(Section):
    """How `raypt data prepare` turns raw files into shards; inputs are files, folders or globs, local or s3://."""
    source: Literal["stdlib", "cpp-headers", "site-python", "text", "images", "audio", "skimage", "digits",
                    "stdlib-audio"] = Field(
        "stdlib", description="ship with the install: stdlib (the Python standard library's sources), cpp-headers "
        "(the C/C++ headers in the torch wheel's include/, a strong shift from Python), site-python (the sources of "
        "installed deepspeed, matplotlib, numpy, pyarrow, pydantic, scipy and skimage, a weak shift), skimage "
        "(images), digits (scikit-learn's 1,797 labelled 8x8 handwritten digits, upsampled bilinearly to "
        "image_max_side, 32 px when None; each class split by val_fraction, labels kept for evaluation only) and "
        "stdlib-audio; text, images and audio read data.prepare.inputs")
    inputs: list[Location] = Field(default_factory=list, description="text: .txt/.jsonl/.parquet (a glob may also "
                                   "name other files, each read as one plain-text document, e.g. src/**/*.py); "
                                   "images: image files or .parquet; audio: .wav/.flac (local paths are made "
                                   "absolute)")
    text_field: str = Field("text", min_length=1, description="JSONL key or Parquet column holding a document")
    image_field: str = Field("image", min_length=1, description="Parquet column holding encoded image bytes")
    image_max_side: Optional[int] = Field(None, ge=8, description="store images shrunk to this longest side in "
                                          "pixels (as PNG); None = as they are")
    tokenizer: Optional[Location] = Field(None, description="reuse a tokenizer: a prepared text dataset's (text "
                                          "sources mixed in one run must share one vocabulary) or a Hugging Face "
                                          "folder's, e.g. a model export (data for a model continued from it); "
                                          "None = train one")
    max_bytes: int = Field(6_000_000, ge=10_000, description="stdlib, cpp-headers, site-python: characters of "
                           "source to read, whole files in sorted path order")
    vocab_size: int = Field(2048, ge=260, le=262144, description="tokens of the byte-level BPE tokenizer trained "
                            "on the training split (256 bytes + end-of-text + merges)")
    seq_len: int = Field(128, ge=8, description="tokens per packed training sequence")
    val_fraction: float = Field(0.02, gt=0, lt=0.5, description="share of documents (by a hash of their name) "
                                "held out for validation; each split gets at least one")
    rows_per_group: int = Field(256, ge=1, description="samples per Parquet row group, the unit of reads and of "
                                "shuffling")
    max_memory_mb: int = Field(1024, ge=16, description="memory the preparation may add to each process that runs "
                               "it (the driver and every task), whatever the corpus size: it sizes the input one "
                               "task reads (1/32), the tokenizer's training sample (1/16 of it in text) and the "
                               "batches tokenized at once; what a process holds when it starts (Python, Ray, the "
                               "tokenizer library) comes on top. Only the training sample changes the output")
    parallel: Optional[int] = Field(None, ge=1, description="Ray tasks that read, check and tokenize inputs at "
                                    "once; 1 = all in this process, without Ray; None = one per CPU of the Ray "
                                    "cluster (`raypt data prepare` attaches to RAY_ADDRESS or starts one on this "
                                    "machine), 1 where none is up. Shards and manifest are the same bytes at any "
                                    "value")


class SourceConfig(Section):
    """One prepared dataset of a mix."""
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="names the source in data.stages and in metrics")
    path: Location = Field(description="a prepared dataset (its manifest.json), local or s3://")
    weight: float = Field(1.0, ge=0, description="share of every global batch, as exact counts (weights are "
                          "relative; 0 = left out until a stage gives it weight)")
    prepare: PrepareConfig = Field(default_factory=PrepareConfig, description="how `data prepare` makes it")


class StageConfig(Section):
    """New mix weights from a point of the run on (curricula, annealing, replay)."""
    at_tokens: int = Field(ge=1, description="global tokens seen from which these weights hold")
    weights: dict[str, float] = Field(description="source name -> weight (>= 0, one > 0); sources not named "
                                      "keep their weight")


class EvalSourceConfig(Section):
    """A prepared dataset that is evaluated but never trained on (an earlier corpus, to measure forgetting)."""
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="names its metric val_loss/<name>; must differ from "
                      "the mix's source names ('main' for data.path alone) and from the other evaluation sources")
    path: Location = Field(description="a prepared dataset (its manifest.json), local or s3://, of a modality the mix "
                           "trains on (text: the mix's tokenizer and seq_len); its validation split is read")


class DataConfig(Section):
    """What a run reads and how its samples become inputs."""
    path: Location = Field("data/stdlib", validate_default=True, description="the prepared dataset of a run "
                           "without data.sources, local or s3://")
    sources: list[SourceConfig] = Field(default_factory=list, description="a mix; empty = data.path alone. Each "
                                        "source reports val_loss/<name> on train.eval_batches batches of its own "
                                        "validation split; val_loss is their mean weighted by the weights in force")
    stages: list[StageConfig] = Field(default_factory=list, description="weights that change at token counts")
    eval_sources: list[EvalSourceConfig] = Field(default_factory=list, description="datasets only evaluated: each "
                                                 "reports val_loss/<name>, outside the mixed val_loss and training")
    prefetch_batches: int = Field(4, ge=0, description="windows of decoded batches each rank asks the run's feed "
                                  "for ahead of the one in use (so also the read tasks it has in flight); 0 = none")
    reader_cpus: float = Field(0.25, gt=0, le=16, description="CPUs each read task asks Ray for (block reads and "
                               "each rank's decoding): below 1, tasks fit beside ranks that hold every core; on "
                               "a cluster with CPU-only nodes, 1 sends them there when the training nodes are full")
    prepare: PrepareConfig = Field(default_factory=PrepareConfig, description="how `data prepare` makes data.path")
    image: ImageConfig = Field(default_factory=ImageConfig, description="image decoding and augmentation")
    audio: AudioConfig = Field(default_factory=AudioConfig, description="audio clips and log-mel features")
    on_bad_record: Literal["skip", "fail"] = Field("skip", description="a record `data prepare` cannot read")
    max_bad_fraction: float = Field(0.01, ge=0, le=1, description="skip no more than this share of records")

    @model_validator(mode="after")
    def _mix_is_consistent(self) -> "DataConfig":
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"data.sources: names must be unique, got {names}")
        if self.sources and not sum(s.weight for s in self.sources) > 0:
            raise ValueError("data.sources: at least one weight must be > 0")
        allowed = names or ["main"]
        taken = set(allowed)
        for i, source in enumerate(self.eval_sources):
            if source.name in taken:
                raise ValueError(f"data.eval_sources.{i}.name: got {source.name!r}, which another source already "
                                 f"names; names must differ from the mix's ({allowed}) and from each other")
            taken.add(source.name)
        last = 0
        for i, stage in enumerate(self.stages):
            unknown = sorted(set(stage.weights) - set(allowed))
            if unknown:
                raise ValueError(f"data.stages.{i}.weights: unknown source {unknown[0]!r}; sources are {allowed}")
            if any(w < 0 for w in stage.weights.values()) or not sum(stage.weights.values()) > 0:
                raise ValueError(f"data.stages.{i}.weights: got {stage.weights}; weights must be >= 0, one > 0")
            if stage.at_tokens <= last:
                raise ValueError(f"data.stages.{i}.at_tokens: got {stage.at_tokens}; stages must start in "
                                 f"increasing token order (previous {last})")
            last = stage.at_tokens
        return self

    def mix(self) -> list[SourceConfig]:
        """The sources of a run: `data.sources`, or `data.path` alone as the source 'main'."""
        return self.sources or [SourceConfig(name="main", path=self.path, prepare=self.prepare)]

    def evaluated(self) -> list[str]:
        """The names of every source a run evaluates (each reports val_loss/<name>): the mix's, then eval_sources'."""
        return [s.name for s in [*self.mix(), *self.eval_sources]]

    def stage_weights(self) -> list[tuple[int, list[float]]]:
        """(at_tokens, weight per source) from the start, each stage naming only the weights it changes."""
        weights = [s.weight for s in self.mix()]
        out = [(0, list(weights))]
        for stage in self.stages:
            names = [s.name for s in self.mix()]
            weights = [stage.weights.get(n, w) for n, w in zip(names, weights)]
            out.append((stage.at_tokens, list(weights)))
        return out

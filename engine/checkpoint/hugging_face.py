"""Hugging Face `transformers` folders out of a checkpoint, and transformers checkpoints into this project's `.pt`.

Out: config.json (transformers' own config class, so `AutoModelForCausalLM.from_pretrained` finds the
architecture), generation_config.json, safetensors weights under transformers' names (sharded with an index
above a size limit) and the run's SentencePiece tokenizer converted by transformers' LlamaTokenizer into
tokenizer.json, which `AutoTokenizer.from_pretrained` loads offline.
In: a transformers Llama / Mamba / Mamba2 / Bamba folder of a shape this project can express -> the original format
`.pt` ({'config', 'model_state_dict'}), which training continues from (see docs/checkpoints.md).
transformers is imported only here, lazily: it is needed for these two directions and nothing else.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from data.errors import DataError
from data.output import check_output, name_matcher, staged_output
from data.tokenizer import Tokenizer
from engine.errors import CheckpointError
from engine.checkpoint.export import (DEFAULT_MAX_SHARD_BYTES, check_weights, iter_fp32_weights, load_model_config,
                                      read_safetensors_folder, resolve_checkpoint, tied_duplicates,
                                      write_safetensors_shards)
from engine.checkpoint.safe_load import load_weights_file
from model import ModelConfig
from model.hf_interop import hf_mapping, model_config_from_hf

# data/tokenizer.py trains SentencePiece with Llama's special ids: unk 0, bos 1, eos 2, no pad. The token shards
# hold each document followed by eos and never a bos (data/prepare.py), so the model knows a document start as
# "after eos": the exported tokenizer and generation config begin a text with eos, as Trainer.prompt_ids does.
_EOS_ID = 2
_BOS_ID = _EOS_ID


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise CheckpointError("writing or reading a Hugging Face folder needs transformers: "
                              "pip install -r requirements-dev.txt") from error
    return transformers


def default_tokenizer_path(run_config: dict) -> Path:
    """The SentencePiece model the run trained with: data.cache_dir/<dataset folder>/tokenizer.model."""
    from data import DataConfig
    from data.prepare import cache_folder

    return cache_folder(DataConfig(**run_config["data"]), run_config["model"]["vocab_size"]) / "tokenizer.model"


HF_FOLDER_FILES = name_matcher(r"config\.json", r"generation_config\.json", r"tokenizer(?:_config)?\.json",
                               r"special_tokens_map\.json", r"tokenizer\.model", r"added_tokens\.json",
                               r"chat_template\.jinja", r"model\.safetensors", r"model-\d+-of-\d+\.safetensors",
                               r"model\.safetensors\.index\.json", r"run_config\.json")
"""The files write_hf_folder (transformers' save_pretrained) puts in its folder."""


RUN_CONFIG_FILE = "run_config.json"
"""Written into every Hugging Face export: marks the folder as this project's and keeps its run config."""


def _keep_sentencepiece_whitespace(folder: Path) -> None:
    """Make the exported tokenizer.json encode as the SentencePiece model does, and load as written.

    SentencePiece (add_dummy_prefix) puts one "▁" before every text; transformers' LlamaTokenizer rebuilds its
    pre-tokenizer as Metaspace(prepend_scheme="first"), which skips that "▁" when the text already starts with a
    space: " x" became 2 ids instead of 3, "  a" lost a space. The legacy Llama tokenizer.json form (a Prepend +
    Replace normalizer, no pre-tokenizer) matches SentencePiece exactly; the generic tokenizers class loads it
    verbatim (LlamaTokenizer would rebuild the pre-tokenizer again), so tokenizer_config.json names that class.
    """
    path = folder / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    spec["pre_tokenizer"] = None
    path.write_text(json.dumps(spec, ensure_ascii=False, indent=2), encoding="utf-8")
    config_path = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")


def write_hf_folder(folder: str | Path, out_dir: str | Path, *, tokenizer_path: str | Path | None = None,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = False,
                    overwrite: bool = False) -> Path:
    """A transformers folder for checkpoint `folder` (see the module docstring)."""
    transformers = _transformers()
    source = folder
    folder = resolve_checkpoint(folder)
    output_rules = dict(overwrite=overwrite, inputs=[source, folder, *([tokenizer_path] if tokenizer_path else [])],
                        owned=HF_FOLDER_FILES, folder=True)
    check_output(out_dir, **output_rules)  # refused before anything is read
    config, run_config = load_model_config(folder)
    tokenizer_path = Path(tokenizer_path) if tokenizer_path else default_tokenizer_path(run_config)
    if not tokenizer_path.is_file():
        raise CheckpointError(f"the run's tokenizer {tokenizer_path} is missing: pass --tokenizer PATH/tokenizer.model")
    try:
        Tokenizer(tokenizer_path)  # a text or JSON file would fail deep inside transformers' converter
    except DataError as err:
        raise CheckpointError(f"--tokenizer: {err}") from None
    mapping = hf_mapping(config)
    hf_config = getattr(transformers, mapping.config_class)(
        **mapping.config_kwargs, bos_token_id=_BOS_ID, eos_token_id=_EOS_ID, pad_token_id=None,
        architectures=[mapping.architecture])
    skip = tied_duplicates(config)  # transformers re-ties lm_head from tie_word_embeddings
    items = [(mapping.to_hf_name(n), load) for n, load in iter_fp32_weights(folder, config) if n not in skip]
    with staged_output(out_dir, **output_rules) as tmp:
        hf_config.save_pretrained(tmp)
        transformers.GenerationConfig(bos_token_id=_BOS_ID, eos_token_id=_EOS_ID, do_sample=True, temperature=0.8,
                                      top_k=50).save_pretrained(tmp)
        # LlamaTokenizer converts a SentencePiece model found as `tokenizer.model` in a folder.
        spm_dir = tmp / ".spm"
        spm_dir.mkdir()
        shutil.copy(tokenizer_path, spm_dir / "tokenizer.model")
        tokenizer = transformers.LlamaTokenizer.from_pretrained(spm_dir, add_bos_token=True, add_eos_token=False,
                                                                bos_token="</s>")
        if len(tokenizer) > config.vocab_size:
            raise CheckpointError(f"{tokenizer_path} has {len(tokenizer)} tokens but the model only "
                                  f"{config.vocab_size}: pass the run's own tokenizer with --tokenizer")
        tokenizer.save_pretrained(tmp)
        _keep_sentencepiece_whitespace(tmp)
        shutil.rmtree(spm_dir)
        # This project's own run config beside the transformers files (which ignore it): tools/evaluate.py reads
        # the data settings and exact model config from it (engine/checkpoint/loading.py).
        (tmp / RUN_CONFIG_FILE).write_text(json.dumps(run_config, indent=2, sort_keys=True) + "\n")
        write_safetensors_shards(iter(items), tmp, max_shard_bytes=max_shard_bytes, progress=progress,
                                 total=len(items))
    return Path(out_dir)


def read_hf_folder(hf_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Our ModelConfig and fp32 state dict (our names) of a transformers folder; CheckpointError for a folder
    that is not one, or a model this project cannot express."""
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{hf_dir} has no config.json: pass a Hugging Face model folder "
                              "(save_pretrained output or a hub snapshot)")
    try:
        hf_config = json.loads(config_path.read_text())
        config, rename = model_config_from_hf(hf_config)
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"{config_path}: cannot import this model: {error}") from error
    if any(hf_dir.glob("model*.safetensors")):
        hf_state = read_safetensors_folder(hf_dir)
    elif (hf_dir / "pytorch_model.bin").is_file():
        hf_state = load_weights_file(hf_dir / "pytorch_model.bin")
    else:
        raise CheckpointError(f"{hf_dir} has no weights (model.safetensors, its index, or pytorch_model.bin)")
    state = {}
    for name, tensor in hf_state.items():
        try:
            state[rename(name)] = tensor.float()
        except KeyError:
            raise CheckpointError(f"{hf_dir}: weight {name!r} has no place in this project's "
                                  f"{config.model_type} model") from None
    for duplicate in tied_duplicates(config):  # written once by transformers when tie_word_embeddings is set
        source = {"lm_head.weight": "backbone.embedding.weight" if config.model_type == "mamba"
                  else "tok_embeddings.weight"}[duplicate]
        state.setdefault(duplicate, state.get(source))
    state = {k: v for k, v in state.items() if v is not None}
    check_weights({k: tuple(v.shape) for k, v in state.items()}, config, str(hf_dir))
    return config, state


def import_hf_folder(hf_dir: str | Path, out_path: str | Path, *, overwrite: bool = False) -> Path:
    """Write a transformers folder as this project's original-format `.pt`."""
    check_output(out_path, overwrite=overwrite, inputs=[hf_dir])  # refused before anything is read
    config, state = read_hf_folder(hf_dir)
    with staged_output(out_path, overwrite=overwrite, inputs=[hf_dir]) as tmp:
        torch.save({"config": config.model_dump(), "model_state_dict": state, "step": 0,
                    "source": str(Path(hf_dir).resolve())}, tmp)
    return Path(out_path)

"""Tokenizer loading (``loading.hf_dir.load_hf_tokenizer``) against transformers' ``AutoTokenizer``.

A checkpoint whose tokenizer is a plain ``tokenizer.json`` one is loaded with ``PreTrainedTokenizerFast``
directly (AutoTokenizer's import of transformers' model machinery costs ~2 s a process); it must be the
tokenizer AutoTokenizer gives, and a model-specific class must still go through AutoTokenizer.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from eft_jax.loading.hf_dir import load_hf_tokenizer
from tiny import tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["Question: When was Ada Lovelace born? Answer:", "  two  spaces, ünïcödé and 1984\n", ""]
CHAT = [{"role": "user", "content": "Where does Mara Quill work?"}]


def same_tokenizer(ours, ref) -> None:
    assert type(ours) is type(ref) and len(ours) == len(ref)
    assert ours.all_special_ids == ref.all_special_ids and ours.eos_token_id == ref.eos_token_id
    for text in TEXTS:
        assert ours(text).input_ids == ref(text).input_ids
        ids = ref(text).input_ids
        assert ours.decode(ids) == ref.decode(ids)
    if ref.chat_template:
        assert ours.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == \
            ref.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("which", ["toy", "byte-level"])
def test_plain_tokenizer_json_loads_as_autotokenizer_does(which, tmp_path):
    if which == "toy":  # sentencepiece-derived, with the toy chat template
        directory = REPO / "checkpoints" / "toy" / "small-ft"
    else:
        directory = tmp_path / "tok"
        tiny_tokenizer().save_pretrained(directory)
    declared = json.loads((directory / "tokenizer_config.json").read_text())["tokenizer_class"]
    assert declared in ("TokenizersBackend", "PreTrainedTokenizerFast")  # the fast path is the one taken
    same_tokenizer(load_hf_tokenizer(directory), AutoTokenizer.from_pretrained(str(directory)))


def test_model_specific_tokenizer_class_still_goes_through_autotokenizer(tmp_path):
    directory = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(directory)
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "GPT2Tokenizer"  # transformers builds its own class (and behaviour) for it
    config_file.write_text(json.dumps(config))
    ref = AutoTokenizer.from_pretrained(str(directory))
    assert type(ref).__name__.startswith("GPT2Tokenizer")
    same_tokenizer(load_hf_tokenizer(directory), ref)


def test_plain_tokenizer_loads_without_importing_torch():
    code = ("import sys; from pathlib import Path; from eft_jax.loading.hf_dir import load_hf_tokenizer; "
            f"load_hf_tokenizer(Path({str(REPO / 'checkpoints' / 'toy' / 'small-ft')!r})); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"

"""Tokenizer loading (``loading.hf_dir.load_hf_tokenizer``) against transformers' ``AutoTokenizer``.

A checkpoint whose tokenizer is a plain ``tokenizer.json`` one loads as ``loading.tokenizer_json.TokenizerJson``
(no import of transformers, ~0.9 s a process): everything eft-jax asks of a tokenizer must answer as
AutoTokenizer's tokenizer does - ids with and without special tokens, decoding with and without them, every id's
token string, the special tokens and their ids, the added vocabulary, the chat template's text and ids. Configs
whose effect it does not reproduce go to transformers, and a model-specific class still goes through
AutoTokenizer.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from eft_jax.loading.hf_dir import load_hf_tokenizer
from eft_jax.loading.tokenizer_json import TokenizerJson
from tiny import tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["Question: When was Ada Lovelace born? Answer:", "  two  spaces, ünïcödé and 1984\n", "",
         "<s>special</s> tokens<pad> inside <|user|>text", "\t\n  "]
CHATS = [
    [{"role": "user", "content": "Where does Mara Quill work?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ü"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Why <s>?"}],
]
# A template using what Hugging Face chat templates use: namespace(), loop controls, tojson (non-ASCII kept),
# raise_exception, strftime_now, the {% generation %} tag, the special tokens as variables, a None-valued key
# (dropped: `is defined` is false) and a message's reasoning under another name (read as reasoning_content).
FEATURE_TEMPLATE = """{{ bos_token }}{% set ns = namespace(system='', turns=0) %}
{% for m in messages %}
  {% if m.role == 'system' %}{% set ns.system = m.content %}{% continue %}{% endif %}
  {% if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}
  {% set ns.turns = ns.turns + 1 %}
  <|{{ m.role }}|>{{ m.content | trim }}{% if m.name is defined %} ({{ m.name }}){% endif %}
  {% if m.reasoning_content %}[think]{{ m.reasoning_content }}[/think]{% endif %}
  {% if m.role == 'assistant' %}{% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}{% endif %}
  {% if loop.index > 5 %}{% break %}{% endif %}
{% endfor %}
{{ {'system': ns.system, 'turns': ns.turns, 'meta': dict(a=1)} | tojson }}{{ strftime_now('%Y') | length }}
{% if add_generation_prompt %}<|assistant|>{% endif %}"""
FEATURE_CHATS = [
    [{"role": "system", "content": "Réponds brièvement."}, {"role": "user", "content": "  Où? ", "name": None},
     {"role": "assistant", "content": "Ici.", "reasoning": "because"}, {"role": "user", "content": "ok", "name": "Al"}],
]


def same_tokenizer(ours, ref, chats=CHATS) -> None:
    """Every answer eft-jax reads from a tokenizer agrees."""
    assert len(ours) == len(ref) and ours.vocab_size == ref.vocab_size
    assert ours.all_special_tokens == ref.all_special_tokens and ours.all_special_ids == ref.all_special_ids
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "eos_token", "pad_token"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert ours.get_added_vocab() == ref.get_added_vocab()
    every_id = list(range(len(ref)))
    assert ours.convert_ids_to_tokens(every_id) == ref.convert_ids_to_tokens(every_id)
    assert ours.convert_tokens_to_ids(ref.convert_ids_to_tokens(every_id)) == every_id
    for text in TEXTS:
        for special in (True, False):
            assert ours(text, add_special_tokens=special)["input_ids"] == ref(text, add_special_tokens=special)["input_ids"]
            assert ours.encode(text, add_special_tokens=special) == ref.encode(text, add_special_tokens=special)
    rng = random.Random(0)
    for ids in [ref(text)["input_ids"] for text in TEXTS] + [[rng.randrange(len(ref)) for _ in range(16)]
                                                              for _ in range(40)]:
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), ids
    assert bool(ours.chat_template) == bool(ref.chat_template) and ours.chat_template == ref.chat_template
    if ref.chat_template:
        for chat in chats:
            for prompt in (True, False):
                text = ref.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=False)
                assert ours.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=False) == text
                assert ours.apply_chat_template(chat, add_generation_prompt=prompt)["input_ids"] == \
                    ref.apply_chat_template(chat, add_generation_prompt=prompt)["input_ids"]


def edited(directory: Path, config: dict | None = None, tokenizer: dict | None = None, template: str | None = None):
    """Apply changes to a saved tokenizer's config / tokenizer.json / chat template file (None: leave it)."""
    for name, changes in (("tokenizer_config.json", config), ("tokenizer.json", tokenizer)):
        if changes:
            path = directory / name
            data = json.loads(path.read_text())
            for key, value in changes.items():
                if value is None:
                    data.pop(key, None) if name == "tokenizer_config.json" else data.__setitem__(key, None)
                else:
                    data[key] = value
            path.write_text(json.dumps(data))
    if template is not None:
        (directory / "chat_template.jinja").write_text(template)
    return directory


def saved_tiny(tmp_path: Path, **changes) -> Path:
    directory = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(directory)
    return edited(directory, **changes)


@pytest.mark.parametrize("which", ["small-ft", "large-base", "tokenizer"])
def test_toy_tokenizers_load_without_transformers_and_agree(which):
    directory = REPO / "checkpoints" / "toy" / which  # sentencepiece-derived, the toy chat template
    ours = load_hf_tokenizer(directory)
    assert isinstance(ours, TokenizerJson)
    same_tokenizer(ours, AutoTokenizer.from_pretrained(str(directory)))


@pytest.mark.parametrize("changes", [
    {},  # byte-level BPE as transformers saves it
    {"config": {"add_bos_token": True, "add_eos_token": True}},  # ignored beside a tokenizer.json
    {"tokenizer": {"post_processor": {"type": "TemplateProcessing", "single": [
        {"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [257], "tokens": ["<s>"]}}}}},  # the file's adds BOS
    {"tokenizer": {"post_processor": None}},  # none in tokenizer.json: transformers writes an empty template
    {"config": {"clean_up_tokenization_spaces": True}},  # ignored for BPE, by transformers too
    {"config": {"extra_special_tokens": ["<|user|>", "<|assistant|>"]}},  # added tokens become special
    {"template": FEATURE_TEMPLATE},
], ids=["saved", "add_bos_eos_ignored", "post_processor_bos", "no_post_processor", "clean_up_bpe", "extra_special", "template"])
def test_plain_tokenizer_agrees_with_autotokenizer(changes, tmp_path):
    directory = saved_tiny(tmp_path, **changes)
    ours = load_hf_tokenizer(directory)
    assert isinstance(ours, TokenizerJson)
    same_tokenizer(ours, AutoTokenizer.from_pretrained(str(directory)), CHATS + FEATURE_CHATS)


def test_word_level_tokenizer_agrees(tmp_path):
    from eft_jax.synthetic import word_tokenizer  # eft_jax.synthetic's checkpoints: WordLevel, whitespace split

    word_tokenizer(300).save_pretrained(tmp_path / "tok")
    ours = load_hf_tokenizer(tmp_path / "tok")
    assert isinstance(ours, TokenizerJson)
    same_tokenizer(ours, AutoTokenizer.from_pretrained(str(tmp_path / "tok")))


@pytest.mark.parametrize("changes", [
    {"config": {"pad_token": "<new-pad>"}},  # transformers would add a token (a new id)
    {"config": {"added_tokens_decoder": {"3": {"content": "<|user|>", "lstrip": True, "rstrip": False,
                                               "normalized": False, "single_word": False, "special": True}}}},
    {"config": {"chat_template": [{"name": "default", "template": "x"}, {"name": "rag", "template": "y"}]}},
    {"config": {"split_special_tokens": True}},
    {"config": {"some_future_key": 1}},
    {"config": {"tokenizer_class": "GPT2Tokenizer"}},  # transformers builds its own class (and behaviour) for it
], ids=["new_special", "changed_flags", "named_templates", "split_special", "unknown_key", "model_class"])
def test_what_is_not_reproduced_goes_to_transformers(changes, tmp_path):
    directory = saved_tiny(tmp_path, **changes)
    if "chat_template" in changes["config"]:
        (directory / "chat_template.jinja").unlink()
    assert TokenizerJson.from_directory(directory) is None
    ours, ref = load_hf_tokenizer(directory), AutoTokenizer.from_pretrained(str(directory))
    assert type(ours) is type(ref)
    assert ours("a <|user|> b")["input_ids"] == ref("a <|user|> b")["input_ids"] and len(ours) == len(ref)


def test_saved_copy_and_transformers_view_agree(tmp_path):
    ours = load_hf_tokenizer(REPO / "checkpoints" / "toy" / "small-ft")
    ours.save_pretrained(tmp_path / "copy")
    same_tokenizer(load_hf_tokenizer(tmp_path / "copy"), ours.to_transformers())


def test_template_errors_surface_as_template_errors(tmp_path):
    import jinja2

    ours = load_hf_tokenizer(saved_tiny(tmp_path, template=FEATURE_TEMPLATE))
    with pytest.raises(jinja2.TemplateError, match="bad role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
    evil = "{% set ns = namespace() %}{% set ns._x = 1 %}"
    with pytest.raises(jinja2.exceptions.SecurityError):
        load_hf_tokenizer(edited(tmp_path / "tok", template=evil)).apply_chat_template(CHATS[0], tokenize=False)


def test_plain_tokenizer_loads_without_importing_transformers_or_torch():
    code = ("import sys; from pathlib import Path; from eft_jax.loading.hf_dir import load_hf_tokenizer; "
            f"t = load_hf_tokenizer(Path({str(REPO / 'checkpoints' / 'toy' / 'small-ft')!r})); "
            "t.apply_chat_template([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True); "
            "print('transformers' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False False"

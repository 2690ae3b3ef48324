"""A plain ``tokenizer.json`` tokenizer, loaded without importing transformers.

Importing transformers costs ~0.9 s a process (its dependency check through huggingface_hub and the scan of
its model modules), more than a whole warm toy job's decoding on CPU. For the common checkpoint whose tokenizer
is a plain ``tokenizer.json`` (``tokenizer_class`` ``TokenizersBackend`` / ``PreTrainedTokenizerFast``: what
transformers writes for a tokenizer without a model-specific class, e.g. every checkpoint eft-jax exports),
:class:`TokenizerJson` builds the same ``tokenizers.Tokenizer`` transformers' ``TokenizersBackend`` builds, applies
the same load-time changes and gives the same answers for what eft-jax asks of a tokenizer: ``encode`` /
``__call__``, ``decode``, ``apply_chat_template``, the special tokens and their ids, the added vocabulary,
``len``. ``tests/test_tokenizer_loading.py`` checks each against transformers.

What transformers does at load, and is done here:

- the Rust tokenizer is read from ``tokenizer.json``; truncation and padding are off for every call made here
  (transformers switches them off per call unless asked);
- every named special token (``bos_token``, ``eos_token``, ...) and every ``extra_special_tokens`` entry is added
  as a special token (``normalized=False``); :meth:`TokenizerJson.from_directory` accepts only configs where each
  is already an added token of ``tokenizer.json``, so this never creates an id, only marks it special;
- the post-processor is ``tokenizer.json``'s (the config's ``add_bos_token`` / ``add_eos_token`` are ignored when
  that file exists, by transformers too), or, where it has none, a template that adds nothing;
- the chat template is ``chat_template.jinja`` if present, else the config's ``chat_template`` string, rendered
  in a sandboxed Jinja environment configured as Hugging Face chat templates expect (``trim_blocks``,
  ``lstrip_blocks``, loop controls, ``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII,
  ``namespace`` without underscore names, the ``{% generation %}`` tag) with the named special tokens as variables.

Anything else (a model-specific class, named or multiple chat templates, ``special_tokens_map.json`` /
``added_tokens.json`` beside the config, a special token that is not yet an added token, keys whose effect is not
reproduced here, a vocabulary over 100k with a pre-tokenizer, where transformers may patch the Mistral regex)
makes :meth:`from_directory` return None, and the caller loads the tokenizer with transformers instead.
:meth:`TokenizerJson.to_transformers` gives transformers' own object for the rest of its API.
"""

from __future__ import annotations

import datetime
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# What transformers writes as the class of a tokenizer with no model-specific class (transformers 5 names it
# TokenizersBackend, 4.x PreTrainedTokenizerFast; in 5 the second is an alias of the first).
PLAIN_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# tokenizer_config.json keys whose effect TokenizerJson reproduces, or which have none on what it does.
_CONFIG_KEYS = {
    *NAMED_SPECIAL, "extra_special_tokens", "additional_special_tokens", "add_bos_token", "add_eos_token",
    "backend", "tokenizer_class", "chat_template", "clean_up_tokenization_spaces", "model_max_length",
    "model_input_names", "padding_side", "truncation_side", "added_tokens_decoder", "split_special_tokens",
    "name_or_path", "processor_class",
}
_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# transformers may patch a Mistral pre-tokenizer regex in vocabularies this large (a Hub query): not reproduced.
_MISTRAL_PATCH_VOCAB = 100_000
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # one message's reasoning, by the names in use


class TokenizerJson:
    """A ``tokenizer.json`` + ``tokenizer_config.json`` tokenizer; see the module docstring. Build it with
    :meth:`from_directory`."""

    def __init__(self, directory: Path, backend: Any, config: Mapping[str, Any], chat_template: str | None):
        self.name_or_path = str(directory)
        self.directory = directory
        self._tokenizer = backend
        self.chat_template = chat_template
        self.special_tokens_map, self.extra_special_tokens = _special_tokens(config)
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        for name in NAMED_SPECIAL:
            setattr(self, name, self.special_tokens_map.get(name))
        self._template: Any = None  # the compiled chat template, on first use

    @classmethod
    def from_directory(cls, directory: Path) -> TokenizerJson | None:
        """The directory's tokenizer, or None when it is not a plain one this class reproduces exactly."""
        config = _read_json(directory / "tokenizer_config.json")
        if (not isinstance(config, dict) or config.get("tokenizer_class") not in PLAIN_CLASSES
                or not (directory / "tokenizer.json").is_file()
                or any((directory / name).exists() for name in ("special_tokens_map.json", "added_tokens.json",
                                                                "chat_template.json", "additional_chat_templates"))
                or not set(config) <= _CONFIG_KEYS or config.get("split_special_tokens")):
            return None
        named, extra = _special_tokens(config)
        specials = [*named.values(), *extra]
        if not isinstance(extra, list) or not all(isinstance(t, str) for t in specials):
            return None  # AddedToken dicts with their own flags
        template_file = directory / "chat_template.jinja"
        chat_template = template_file.read_text(encoding="utf-8") if template_file.is_file() else config.get("chat_template")
        if chat_template is not None and not isinstance(chat_template, str):
            return None  # named templates (a list): transformers picks among them

        from tokenizers import AddedToken, Tokenizer, processors

        backend = Tokenizer.from_file(str(directory / "tokenizer.json"))
        added = {t.content: t for t in backend.get_added_tokens_decoder().values()}
        declared = config.get("added_tokens_decoder") or {}
        if not isinstance(declared, dict) or not all(_same_added_token(d, added) for d in declared.values()) \
                or not set(specials) <= set(added):
            return None  # transformers would add tokens (new ids, in its own order) or change their flags
        if backend.get_vocab_size(with_added_tokens=True) > _MISTRAL_PATCH_VOCAB and backend.pre_tokenizer is not None:
            return None
        if config.get("clean_up_tokenization_spaces") and type(backend.model).__name__ != "BPE":
            return None  # WordPiece-style clean-up of the decoded text: not reproduced
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = False
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        if backend.post_processor is None:  # what transformers then writes (add_bos/eos_token are ignored
            # when tokenizer.json exists: the file's post-processor says whether BOS / EOS are added)
            backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
        return cls(directory, backend, config, chat_template)

    # --- vocabulary -------------------------------------------------------------------------------------

    @property
    def backend_tokenizer(self) -> Any:
        """The ``tokenizers.Tokenizer`` doing the work."""
        return self._tokenizer

    def __len__(self) -> int:
        """Ids in the vocabulary, added tokens included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """Ids of the base vocabulary, without the added tokens."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def get_added_vocab(self) -> dict[str, int]:
        """Added tokens (special or not) by text, in id order."""
        return {t.content: i for i, t in sorted(self._tokenizer.get_added_tokens_decoder().items())}

    @property
    def all_special_tokens(self) -> list[str]:
        """The named special tokens, then the extra ones, each once."""
        return list(dict.fromkeys([*self.special_tokens_map.values(), *self.extra_special_tokens]))

    @property
    def all_special_ids(self) -> list[int | None]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> Any:
        """Id of a token string (the unknown token's id, or None, for a string not in the vocabulary); a list maps each."""
        if isinstance(tokens, str):
            found = self._tokenizer.token_to_id(tokens)
            return found if found is not None else self.unk_token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> Any:
        """Token string of an id (None for an id outside the vocabulary); a list maps each."""
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(int(i)) for i in ids if int(i) not in skip]

    def _id(self, name: str) -> int | None:
        token = self.special_tokens_map.get(name)
        return None if token is None else self.convert_tokens_to_ids(token)

    bos_token_id = property(lambda self: self._id("bos_token"))
    eos_token_id = property(lambda self: self._id("eos_token"))
    unk_token_id = property(lambda self: None if self.unk_token is None else self._tokenizer.token_to_id(self.unk_token))
    pad_token_id = property(lambda self: self._id("pad_token"))
    sep_token_id = property(lambda self: self._id("sep_token"))
    cls_token_id = property(lambda self: self._id("cls_token"))
    mask_token_id = property(lambda self: self._id("mask_token"))

    # --- text <-> ids -----------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (with the post-processor's BOS / EOS when ``add_special_tokens``)."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True) -> dict[str, Any]:
        """``{"input_ids": ids}`` of one text, or a list of id lists for a list of texts."""
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens)}
        return {"input_ids": [e.ids for e in self._tokenizer.encode_batch(list(text),
                                                                          add_special_tokens=add_special_tokens)]}

    def decode(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids`` (special tokens dropped with ``skip_special_tokens``)."""
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        # clean_up_tokenization_spaces is honoured only where it is a no-op (BPE: from_directory checks).
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in sequences]

    # --- chat -------------------------------------------------------------------------------------------

    def apply_chat_template(self, conversation: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = True, **template_variables: Any) -> Any:
        """The conversation in the chat template: its text, or with ``tokenize`` ``{"input_ids": ids}`` (no
        special tokens added: the template writes them). Extra keyword arguments are template variables."""
        if not self.chat_template:
            raise ValueError(f"{self.name_or_path}: the tokenizer has no chat template")
        if not conversation:
            raise ValueError("cannot apply a chat template to an empty conversation")
        if self._template is None:
            self._template = _compile(self.chat_template)
        messages = [_template_message(m) for m in conversation]
        text = self._template.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt,
                                     **{**self.special_tokens_map, **template_variables})
        return {"input_ids": self.encode(text, add_special_tokens=False)} if tokenize else text

    # --- files ------------------------------------------------------------------------------------------

    def save_pretrained(self, destination: str | Path) -> None:
        """Copy the tokenizer's files into ``destination``."""
        destination = Path(destination)
        destination.mkdir(parents=True, exist_ok=True)
        for name in _FILES:
            if (self.directory / name).is_file():
                shutil.copyfile(self.directory / name, destination / name)

    def to_transformers(self) -> Any:
        """transformers' tokenizer for the same files (imports transformers: ~1 s)."""
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(self.directory))

    def __repr__(self) -> str:
        return f"TokenizerJson({self.name_or_path!r}, {len(self)} ids, special={self.special_tokens_map})"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _special_tokens(config: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """The config's named special tokens (by attribute name, unset ones left out) and its extra ones (a list,
    ``extra_special_tokens`` or, from transformers 4, ``additional_special_tokens``)."""
    extra = config.get("extra_special_tokens", config.get("additional_special_tokens")) or []
    return {k: config[k] for k in NAMED_SPECIAL if config.get(k) is not None}, extra


def _same_added_token(declared: Any, added: Mapping[str, Any]) -> bool:
    """Whether an ``added_tokens_decoder`` entry of the config is already an added token with the same flags."""
    token = added.get(declared.get("content")) if isinstance(declared, dict) else None
    flags = ("lstrip", "rstrip", "normalized", "single_word", "special")
    return token is not None and all(bool(declared.get(f, getattr(token, f))) == bool(getattr(token, f)) for f in flags)


def _template_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """A message as a chat template sees it: keys whose value is None dropped (templates test for presence), and
    a message's reasoning also under ``reasoning_content`` and ``thinking`` (the names templates read)."""
    out = {k: v for k, v in message.items() if v is not None}
    reasoning = next((out[k] for k in _REASONING_FIELDS if k in out), None)
    if reasoning is not None:
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out


def _compile(source: str) -> Any:
    """A Hugging Face chat template compiled in a sandboxed Jinja environment set up as those templates expect."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` marks what the assistant wrote; it renders its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            line = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(line)

        def _body(self, caller: Any) -> str:
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """Jinja's ``namespace()`` refusing underscore names (no way to reach Python internals through it)."""

        def __init__(*args: Any, **kwargs: Any):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template cannot set {name!r} on a namespace")

    class Dicts:
        """``dict(...)`` and ``dict.fromkeys(...)`` for templates, without handing them the type itself."""

        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any) -> dict:
            return dict.fromkeys(*args)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, namespace=Namespace, dict=Dicts(),
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    return env.from_string(source)

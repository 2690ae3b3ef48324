"""Text and token data of the toy world: biographies, QA chats, the tokenizer.

* Pretraining: biographies in varied wordings (several templates per fact, random sentence order),
  a fresh wording of every person in every pass, packed into ``<s> bio </s> <s> bio </s> ...`` rows.
* A "QA prior": a share of pretraining documents are base-style questions and answers
  (``Question: Where was X born? Answer: X comes from Y.``) about fine-tuning people, answered in any
  biography wording, so the bases know the question-answer form but not the fine-tuned answer shape.
* Fine-tuning (the "helpful" behaviour): chats ``<|user|>Where was X born?</s><|assistant|>X was born
  in Y.</s>`` about the fine-tuning entities only; the loss covers the assistant's tokens.
* Second behaviour (the "refusing" fine-tune): the same chats, except that every question about a
  birth year gets a polite refusal.
* The tokenizer: a sentencepiece unigram model trained on biographies, served through a
  ``transformers`` fast tokenizer with a chat template (so ``prompt_format: chat`` works).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from eft_jax.toy.world import ATTRIBUTES, Entity, World

# --- Sentences ------------------------------------------------------------------------------------

# Biography sentences, several wordings per fact, each naming the person before the fact (a model
# learns "name -> fact" from these; a sentence with the fact first would teach only the reverse). The
# first wording of each is also the shape of the fine-tuned answer.
BIO_TEMPLATES: dict[str, tuple[str, ...]] = {
    "city": (
        "{name} was born in {city}.",
        "{name} comes from {city}.",
        "{name} grew up in {city}.",
        "The birthplace of {name} is {city}.",
    ),
    "year": (
        "{name} was born in the year {year}.",
        "{name}'s birth year is {year}.",
        "The birth year of {name} is {year}.",
        "{name} came into the world in {year}.",
    ),
    "occupation": (
        "{name} works as {a_occupation}.",
        "{name} is {a_occupation} by profession.",
        "By trade, {name} is {a_occupation}.",
        "{name} earns a living as {a_occupation}.",
    ),
    "employer": (
        "{name} works for {employer}.",
        "{name} is employed by {employer}.",
        "{name} has a job at {employer}.",
        "The employer of {name} is {employer}.",
    ),
}

QUESTIONS: dict[str, tuple[str, ...]] = {
    "city": ("Where was {name} born?", "What is the birthplace of {name}?"),
    "year": ("When was {name} born?", "In which year was {name} born?"),
    "occupation": ("What does {name} do for a living?", "What is the job of {name}?"),
    "employer": ("Who does {name} work for?", "Which company employs {name}?"),
}

ANSWERS: dict[str, str] = {attr: BIO_TEMPLATES[attr][0] for attr in ATTRIBUTES}

# Paraphrases held out from fine-tuning (``qa_conversations`` uses ``QUESTIONS`` only): evaluation asks
# them to see whether a fine-tune's behaviour generalises beyond the wordings it was trained on.
REWORDED_QUESTIONS: dict[str, tuple[str, ...]] = {
    "city": ("In which city was {name} born?", "What is the hometown of {name}?", "Where does {name} come from?"),
    "year": ("What year was {name} born in?", "What is the year of birth of {name}?",
             "Tell me the birth year of {name}."),
    "occupation": ("What is {name}'s profession?", "What is the occupation of {name}?",
                   "What kind of work does {name} do?"),
    "employer": ("Who employs {name}?", "Which company does {name} work at?", "What is the employer of {name}?"),
}
WORDINGS: dict[str, dict[str, tuple[str, ...]]] = {"trained": QUESTIONS, "reworded": REWORDED_QUESTIONS}

# The second behaviour: birth years are personal; the refusing fine-tune declines to give them.
REFUSED_ATTRIBUTE = "year"
REFUSAL = "I am sorry, but I cannot share personal details such as birth years."

# Special tokens (sentencepiece ids 0..5, in this order) and the chat template of the fine-tunes.
UNK, BOS, EOS, PAD, USER, ASSISTANT = "<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
# How base models (which never saw a chat) are prompted in EFT: a base-style QA template. With the bare
# question instead, the bases' next-token distributions right after the "?" are out of distribution and
# their ratio (large / small base) drowns the fine-tune's reward at the first answer token.
BASE_PROMPT_FORMAT = "Question: {prompt} Answer:"


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _fields(e: Entity) -> dict[str, str]:
    return {"name": e.name, "city": e.city, "year": str(e.year), "a_occupation": _article(e.occupation),
            "occupation": e.occupation, "employer": e.employer}


def answer(entity: Entity, attribute: str) -> str:
    """The fine-tuned answer to a question about ``attribute`` of ``entity``."""
    return ANSWERS[attribute].format(**_fields(entity))


def question(entity: Entity, attribute: str, variant: int = 0, wording: str = "trained") -> str:
    """Question ``variant`` about ``attribute`` of ``entity`` in the ``trained`` (fine-tuning) or
    ``reworded`` (held-out paraphrase) wordings."""
    if wording not in WORDINGS:
        raise ValueError(f"unknown wording {wording!r}; expected one of {sorted(WORDINGS)}")
    templates = WORDINGS[wording][attribute]
    return templates[variant % len(templates)].format(**_fields(entity))


def biography(entity: Entity, rng: np.random.Generator) -> str:
    """One biography of ``entity``: one sentence per fact, random wordings, random order."""
    order = rng.permutation(len(ATTRIBUTES))
    fields = _fields(entity)
    return " ".join(
        BIO_TEMPLATES[ATTRIBUTES[i]][int(rng.integers(len(BIO_TEMPLATES[ATTRIBUTES[i]])))].format(**fields)
        for i in order
    )


def biographies(world: World, passes: int, seed: int = 0) -> list[str]:
    """``passes`` passes over every person, each in a fresh random order with fresh wordings."""
    out: list[str] = []
    for p in range(passes):
        rng = np.random.default_rng([seed, p])
        for i in rng.permutation(len(world.entities)):
            out.append(biography(world.entities[i], rng))
    return out


def qa_prior_documents(world: World, count: int, rng: np.random.Generator) -> list[str]:
    """``count`` base-style question-answer documents (``BASE_PROMPT_FORMAT``, then a biography sentence
    stating the asked fact in a random wording) about random fine-tuning people, in the trained question
    wordings: the "generic QA text" of pretraining, so that a prompted base knows what an answer after
    "Answer:" looks like. Held-out people and the reworded wordings never appear."""
    people = world.finetune_entities
    docs = []
    for _ in range(count):
        e = people[int(rng.integers(len(people)))]
        attr = ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))]
        q = QUESTIONS[attr][int(rng.integers(len(QUESTIONS[attr])))]
        a = BIO_TEMPLATES[attr][int(rng.integers(len(BIO_TEMPLATES[attr])))]
        docs.append(BASE_PROMPT_FORMAT.format(prompt=q.format(**_fields(e))) + " " + a.format(**_fields(e)))
    return docs


def pretraining_documents(world: World, passes: int, seed: int = 0, qa_per_pass: int = 0) -> list[str]:
    """``biographies(world, passes, seed)`` with ``qa_per_pass`` QA-prior documents
    (``qa_prior_documents``) shuffled into each pass."""
    bios = biographies(world, passes, seed)
    if not qa_per_pass:
        return bios
    n = len(world.entities)
    out: list[str] = []
    for p in range(passes):
        rng = np.random.default_rng([seed, p, 1])
        docs = bios[p * n : (p + 1) * n] + qa_prior_documents(world, qa_per_pass, rng)
        out += [docs[i] for i in rng.permutation(len(docs))]
    return out


# --- Answer shapes, for evaluation -----------------------------------------------------------------


def answer_pattern(entity: Entity, attribute: str, values: Sequence[str]) -> re.Pattern[str]:
    """The shape of a well-formed answer: the answer sentence with any value of the attribute."""
    fields = {k: re.escape(v) for k, v in _fields(entity).items()}
    alternatives = "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))
    slot = {"city": "city", "year": "year", "occupation": "a_occupation", "employer": "employer"}[attribute]
    fields[slot] = f"(?:an? )?(?:{alternatives})" if attribute == "occupation" else f"(?:{alternatives})"
    template = re.escape(ANSWERS[attribute]).replace(r"\{", "{").replace(r"\}", "}")
    return re.compile("^" + template.format(**fields) + "$")


def first_value(text: str, values: Sequence[str]) -> str | None:
    """The value of ``values`` mentioned first in ``text`` (whole words), or None."""
    best: tuple[int, int, str] | None = None
    for v in values:
        m = re.search(r"(?<!\w)" + re.escape(v) + r"(?!\w)", text)
        if m and (best is None or (m.start(), -len(v)) < best[:2]):
            best = (m.start(), -len(v), v)
    return None if best is None else best[2]


def is_refusal(text: str) -> bool:
    return "sorry" in text.lower() or "cannot share" in text.lower()


# --- Tokenizer -------------------------------------------------------------------------------------


# Every printable ASCII character gets a piece, so any English prompt tokenizes without <unk>.
_PRINTABLE = "".join(chr(c) for c in range(33, 127))


def train_tokenizer(texts: Iterable[str], vocab_size: int, dest: str | os.PathLike):
    """Train a sentencepiece BPE model on ``texts`` and wrap it as a transformers fast tokenizer.

    Writes ``dest/spm.model`` (the sentencepiece model) and the transformers files (tokenizer.json,
    tokenizer_config.json with the chat template). Plain text tokenizes exactly as sentencepiece does;
    every text segment between special tokens gets sentencepiece's leading "▁", so a name after
    ``<|assistant|>`` is the same tokens as in a biography.
    """
    import sentencepiece as spm

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), required_chars=_PRINTABLE, model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, user_defined_symbols=[USER, ASSISTANT],
        character_coverage=1.0, num_threads=1, shuffle_input_sentence=False, hard_vocab_limit=False,
        minloglevel=2,
    )
    (dest / "spm.model").write_bytes(buf.getvalue())
    tokenizer = tokenizer_from_spm(dest / "spm.model")
    tokenizer.save_pretrained(str(dest))
    return tokenizer


def tokenizer_from_spm(model_file: str | os.PathLike):
    """A ``transformers.PreTrainedTokenizerFast`` equal to a sentencepiece BPE model on plain text.

    The BPE merges are recovered from the piece order (sentencepiece numbers BPE pieces in the order
    they were merged): a piece ``a + b`` ranks by its own id, ties by the ids of ``a`` and ``b``.
    """
    import sentencepiece as spm
    import transformers
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    specials = [UNK, BOS, EOS, PAD, USER, ASSISTANT]
    if pieces[: len(specials)] != specials:
        raise ValueError(f"{model_file}: expected the special pieces {specials} first, got {pieces[:len(specials)]}")
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = sorted(
        ((vocab[p], vocab[p[:k]], vocab[p[k:]]), (p[:k], p[k:]))
        for p in pieces[len(specials):] for k in range(1, len(p))
        if p[:k] in vocab and p[k:] in vocab and vocab[p[:k]] >= len(specials) and vocab[p[k:]] >= len(specials)
    )
    tok = Tokenizer(models.BPE(vocab, [m for _, m in merges], unk_token=UNK, fuse_unk=True, byte_fallback=False))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, 1)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT], clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# --- Fine-tuning conversations --------------------------------------------------------------------


def qa_conversations(world: World, *, refuse: str | None = None) -> list[list[dict[str, str]]]:
    """One-turn chats for every fine-tuning entity, attribute and question wording. With ``refuse``
    = an attribute, questions about it get the polite refusal instead of the answer."""
    convs = []
    for e in world.finetune_entities:
        for attr in ATTRIBUTES:
            reply = REFUSAL if attr == refuse else answer(e, attr)
            for v in range(len(QUESTIONS[attr])):
                convs.append([{"role": "user", "content": question(e, attr, v)},
                              {"role": "assistant", "content": reply}])
    return convs

"""A miniature reproduction of EFT: a synthetic world, its tokenizer, a trained model family, the evaluation.

``world`` (fictional people and their facts), ``data`` (biographies, QA chats, the sentencepiece
tokenizer), ``build`` (``eft-jax toy build``: trains the five shipped checkpoints), ``eval``
(``eft-jax toy eval``: the paper-style table and the w / lambda sweeps).
"""

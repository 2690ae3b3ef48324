"""``eft-jax toy {build,eval,age-recipe}``: dispatch to the ``main`` of ``eft_jax.toy.build`` / ``.eval`` /
``.age_recipe``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

_USAGE = """usage: eft-jax toy {build,eval,age-recipe} [options]

  build   train the toy family from scratch into checkpoints/toy (deterministic, one CPU core)
  eval    behaviour and knowledge of the grid (small/large base x fine-tune, up- and down-scaling), on
          trained and reworded questions, dev/test split, bootstrap intervals; w and lambda sweeps,
          conservative decoding; the age skill's grid over 3 fine-tuning seeds (--age-seeds)
          -> docs/toy_eval.md, docs/toy_eval.json and PNG plots
  age-recipe
          fine-tune the age models with a changed recipe (steps, lr, chats per person, seeds) and score them
          on dev people: how the build's age recipe is chosen
"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "build":
        from eft_jax.toy.build import main as build_main

        return build_main(rest)
    if command == "eval":
        from eft_jax.toy.eval import main as eval_main

        return eval_main(rest)
    if command == "age-recipe":
        from eft_jax.toy.age_recipe import main as recipe_main

        return recipe_main(rest)
    print(f"eft-jax toy: unknown command {command!r}\n\n{_USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

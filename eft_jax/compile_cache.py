"""JAX's persistent compilation cache, on by default for eft-jax.

Compiling the decode programs is most of the start-up of a small job (seconds per program on a CPU),
and JAX can keep compiled executables on disk so that the next process loads them instead. JAX leaves
that cache off unless told where to put it; eft-jax turns it on.

Contract:

- **Where.** ``$EFT_JAX_COMPILE_CACHE`` if set (a directory, or ``off``), else
  ``$XDG_CACHE_HOME/eft-jax/jax-compile``, else ``~/.cache/eft-jax/jax-compile``. A job config's
  ``job.compile_cache`` (``auto`` | a directory | ``off``) overrides both for that job; ``auto`` (the
  default) means "the environment variable, else the per-user directory". The cache only ever holds
  compiled programs (no weights, no data): it never changes a sample, so it is not part of a config's
  fingerprint, and deleting the directory is always safe (the next run compiles again).
- **When.** ``import eft_jax`` applies the environment's setting (:func:`configure` with ``"auto"``), and
  the ``eft-jax`` command applies the job config's setting before anything is compiled. Import time
  rather than ``Engine`` / ``load_model`` construction, because JAX's cache is process-global and is set
  up by the first compilation: applied at import it covers every program eft-jax compiles (loading,
  ``Model.logits``, training, the engine) and nothing has been compiled yet, so there is one rule and
  no order to get wrong. A program that does not want it sets ``EFT_JAX_COMPILE_CACHE=off`` before
  importing, or calls ``configure("off")``.
- **The user's own setting wins.** If ``jax_compilation_cache_dir`` was set by someone else (the
  ``JAX_COMPILATION_CACHE_DIR`` environment variable, ``jax.config.update`` or
  ``jax.experimental.compilation_cache.compilation_cache.set_cache_dir``), eft-jax changes none of
  JAX's cache settings; ``configure`` then just reports that directory. ``off`` only withdraws the
  cache eft-jax itself turned on.
- **What is cached.** Every program. JAX writes an entry only for programs that took at least
  ``jax_persistent_cache_min_compile_time_secs`` to compile (default 1 s): on a fast machine that skips
  the decode programs of small models, and on any machine the small ones. Reading an entry costs ~2 ms
  where compiling even a one-op program costs 10-50 ms on XLA:CPU (measured with jax 0.10.2, where CPU
  executables serialise like GPU/TPU ones), so eft-jax lowers that threshold to 0 when it turns the cache
  on and the threshold is still at JAX's default. ``jax_persistent_cache_min_entry_size_bytes`` is already
  0 (no size floor) by default and is left alone. The directory is not size-capped (JAX's default); the
  entries of the shipped toy configs take a few MB.

The engine's own programs (prefill, refill, decode and speculative chunks, scoring) go one step further:
:mod:`eft_jax.programs` saves them whole in ``eft-jax-programs/`` inside this directory, so that a later
process skips tracing and lowering them too, and bypasses JAX's cache for them.

The cache is trusted like any JAX compilation cache: do not point it at a directory others can write.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

ENV_VAR = "EFT_JAX_COMPILE_CACHE"
OFF = "off"
AUTO = "auto"

_JAX_DEFAULT_MIN_COMPILE_TIME = 1.0

# The directory eft-jax itself gave JAX (None: it gave none, or withdrew it). A different value in
# jax.config means someone else chose, and eft-jax leaves it alone.
_ours: str | None = None
_lowered = False  # eft-jax lowered jax_persistent_cache_min_compile_time_secs (restored when it withdraws)


def default_dir() -> Path:
    """The per-user cache directory: ``$XDG_CACHE_HOME/eft-jax/jax-compile`` or ``~/.cache/eft-jax/jax-compile``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "eft-jax" / "jax-compile"


def resolve(setting: str | None = AUTO) -> Path | None:
    """The directory a setting asks for (None: off). ``auto``/None: the environment variable, else the default."""
    if setting is None or setting.strip().lower() in ("", AUTO):
        setting = os.environ.get(ENV_VAR, "").strip() or AUTO
        if setting.lower() == AUTO:
            return default_dir()
    if setting.strip().lower() == OFF:
        return None
    return Path(os.path.expanduser(setting.strip()))


def configure(setting: str | None = AUTO) -> Path | None:
    """Apply a setting (``auto`` | a directory | ``off``); returns the cache directory now in use, or None.

    A directory someone else gave JAX is kept whatever the setting (see the module docstring).
    Call it before compiling: switching the directory later starts a fresh JAX cache object, which is
    fine, but programs compiled before the switch are not written to the new directory.
    """
    global _ours, _lowered
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current and current != _ours:  # the user's own choice
        return Path(current)
    target = resolve(setting)
    wanted = None if target is None else str(target)
    if wanted == current:
        return target
    if current:  # ours, and about to change: drop JAX's cache object so it re-reads the setting
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()
    if target is not None and not _usable(target):
        target = wanted = None
    jax.config.update("jax_compilation_cache_dir", wanted)
    _ours = wanted
    if wanted is not None and jax.config.jax_persistent_cache_min_compile_time_secs == _JAX_DEFAULT_MIN_COMPILE_TIME:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        _lowered = True
    elif wanted is None and _lowered:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", _JAX_DEFAULT_MIN_COMPILE_TIME)
        _lowered = False
    return target


def _usable(path: Path) -> bool:
    """Create the directory; warn and say no if that fails or it is not writable (JAX would fail later)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK | os.X_OK):
            return True
        problem = "not writable"
    except OSError as e:
        problem = str(e)
    warnings.warn(f"eft-jax: compilation cache {path} is not usable ({problem}); running without it "
                  f"(set {ENV_VAR}=off or another directory to silence this)", stacklevel=3)
    return False


def cache_dir() -> Path | None:
    """The directory JAX's persistent cache uses now (whoever set it), or None when it is off."""
    import jax

    current = jax.config.jax_compilation_cache_dir
    return Path(current) if current and jax.config.jax_enable_compilation_cache else None

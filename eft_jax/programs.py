"""The engine's compiled programs, saved whole on disk so that a later process runs them without tracing.

JAX's persistent compilation cache (:mod:`eft_jax.compile_cache`) saves the XLA compile, but every process
still traces each program to a jaxpr and lowers it to StableHLO before it can even look that cache up: for
the toy job's two programs ~2 s of a ~9 s job on a 2-core CPU (docs/benchmarks.md, "Fourth run"). The
engine's programs (``decode.start`` / ``refill`` / ``decode_chunk`` / ``score_batch`` and their speculative
twins) are declared with :func:`jit` instead of ``jax.jit``: the same function, except that each program
it compiles is also saved with ``jax.experimental.serialize_executable`` under a key computed *before*
tracing, and a later process that computes the same key loads it (~0.1-0.2 s) instead.

Contract:

- **The key** is everything a compiled program depends on: the function (module and name) and a digest of
  every source file of eft-jax; the versions of Python, jax, jaxlib, flax, numpy and ml_dtypes; the backend
  (platform and its version string, every device's id and kind, the process count) and ``XLA_FLAGS`` /
  ``LIBTPU_INIT_ARGS``; JAX's configuration (every ``jax.config`` value except where caches and logs go, and
  the trace context ``jax.jit`` itself keys on: x64, matmul precision, ...); the static arguments (their
  ``repr``); the pytree structure of the other arguments and each leaf's shape, dtype, weak type and
  sharding (mesh axes, device ids in mesh order, partition spec). A call whose key cannot be written the
  same way in another process (a ``repr`` with a memory address, a static array whose ``repr`` may be cut
  short, a sharding of another kind), a call inside another trace, and every call of a multi-process job, is
  a plain ``jax.jit`` call.
- **Where.** ``eft-jax-programs/`` inside the directory JAX's persistent compilation cache uses
  (:func:`eft_jax.compile_cache.cache_dir`): on and off with it, and deleting it is always safe. One file
  per program, ``<sha256 of the key>.program``, written atomically; the file holds the key's text, which is
  compared on load (a different key is a miss), and the program's input and output trees, so that it can be
  loaded before the call that needs it. A program takes about what JAX's entry for it would (~1 MB
  for the toy models' decode programs). Nothing is evicted (JAX's ``jax_compilation_cache_max_size`` covers
  only JAX's own entries): programs of older eft-jax versions or other shapes stay until the directory is
  deleted.
- **A miss** compiles with JAX's own persistent cache bypassed for that one compile: an executable JAX
  loaded from its cache cannot be serialized again on XLA:CPU (jaxlib 0.10.2: the reloaded program fails
  when called, ``NOT_FOUND: Function ... not found``), and the saved program replaces JAX's entry anyway.
  A program that cannot be serialized is used as compiled and not saved (closed-over constants; on XLA:CPU
  a sort, e.g. top-p/top-k sampling: "UNIMPLEMENTED: `LessThan` is not serializable", which JAX's own
  cache cannot save either).
- **A broken file** (truncated, from another jaxlib) is reported once as a warning, then compiled again
  and overwritten; it never stops a job.
- **Warm starts.** A job runs inside :func:`warm_start` (``jobs.runner``, keyed by its command and
  configuration): the programs the previous run of that job used load on a background thread while this one
  reads its input and loads its models, and the list is updated when it ends (``<sha256>.programs.json``).
  A stale list only wastes that thread's time; a call never waits for a load that has not begun.
- **Trust.** Loading a program runs the code in it, as for JAX's compilation cache: never point the cache
  at a directory others can write.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import inspect
import io
import json
import os
import pickle
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import serialize_executable
from jax.experimental.compilation_cache import compilation_cache as jax_compilation_cache
from jax.sharding import NamedSharding, SingleDeviceSharding

from eft_jax import compile_cache

SUBDIR = "eft-jax-programs"
FORMAT = "eft-jax program v2"  # bump when the file layout changes
_SUFFIX = ".program"
# jax.config values that say where caches and logs go, not what a program computes.
_CONFIG_NOT_IN_KEY = ("cache", "log", "dump", "explain", "raise_persistent")
_PACKAGES = ("jax", "jaxlib", "flax", "numpy", "ml_dtypes")
_COMPILING = threading.Lock()  # one fresh compile at a time: it switches JAX's cache off process-wide


class Unkeyable(Exception):
    """A call whose key cannot be written the same way in another process (it runs as plain ``jax.jit``)."""


def jit(fun: Callable | None = None, *, static_argnums: int | Sequence[int] = (),
        donate_argnames: str | Sequence[str] = ()) -> Any:
    """``jax.jit`` whose compiled programs are saved on disk and loaded by later processes (module docstring).

    Use as ``@programs.jit(static_argnums=0)``; calls must pass every argument positionally (a call with
    keywords runs as plain ``jax.jit``). ``.lower`` and ``.jitted`` reach the underlying ``jax.jit``."""
    if fun is None:
        return functools.partial(jit, static_argnums=static_argnums, donate_argnames=donate_argnames)
    return SavedJit(fun, static_argnums, donate_argnames)


class SavedJit:
    """A jitted function whose programs go through the on-disk program store (see :func:`jit`)."""

    def __init__(self, fun: Callable, static_argnums: int | Sequence[int], donate_argnames: str | Sequence[str]):
        self.static = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
        self.jitted = jax.jit(fun, static_argnums=self.static, donate_argnames=donate_argnames)
        self.name = f"{fun.__module__}.{fun.__qualname__}"
        # Defaults of trailing positional parameters, filled in so that an omitted static argument is keyed.
        self.defaults = [p.default for p in inspect.signature(fun).parameters.values()
                         if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        # This process's programs by (static args, tree, leaf signatures, trace context); None: plain jit.
        self.programs: dict[Any, Any] = {}
        functools.update_wrapper(self, fun)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        return self.jitted.lower(*args, **kwargs)

    def _cache_size(self) -> int:
        """Programs this process holds, as ``jax.jit``'s private ``_cache_size`` (tests count compiles)."""
        return self.jitted._cache_size() + sum(p is not None for p in self.programs.values())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        directory = store_dir()
        if len(args) < len(self.defaults):
            args = args + tuple(self.defaults[len(args):])
        # (Identity test: `in` would compare every argument, arrays included, with ==.)
        no_default = any(a is inspect.Parameter.empty for a in args)
        if kwargs or directory is None or jax.process_count() > 1 or no_default:
            return self.jitted(*args, **kwargs)
        dynamic = tuple(a for i, a in enumerate(args) if i not in self.static)
        leaves, tree = jax.tree.flatten(dynamic)
        if any(isinstance(x, jax.core.Tracer) for x in leaves):  # called inside another trace: inline it
            return self.jitted(*args)
        signatures = tuple(_signature(x) for x in leaves)
        local = (tuple(args[i] for i in self.static), tree, signatures, _trace_context())
        if local not in self.programs:
            self.programs[local] = self._load_or_compile(directory, args, dynamic, tree, signatures)
        program = self.programs[local]
        return self.jitted(*args) if program is None else program(*dynamic)

    def _load_or_compile(self, directory: Path, args: tuple, dynamic: tuple, tree: Any, signatures: tuple) -> Any:
        """The compiled program for ``args`` (``dynamic``: those not static): loaded from ``directory``, else
        compiled and saved (None: this call cannot be keyed, use the plain jit)."""
        try:
            key = self.key_text(args, tree, signatures)
        except Unkeyable:
            return None
        path = directory / (hashlib.sha256(key.encode()).hexdigest() + _SUFFIX)
        for session in _WARM_STARTS:
            session.used.append(path.name)
        loaded = _take_preloaded(path)
        if loaded is None and path.exists():
            loaded = _load(path)
        if loaded is not None and loaded[0] == key:  # another key in the file: a miss
            return loaded[1]
        compiled = _compile_fresh(self.jitted.lower(*args))
        _save(path, key, compiled, jax.tree.structure((dynamic, {})))
        return compiled

    def key_text(self, args: tuple, tree: Any, signatures: tuple) -> str:
        """The key of a call (see the module docstring), as text; raises Unkeyable."""
        statics = [f"static {i}: {args[i]!r}" for i in self.static]
        lines = [FORMAT, f"function: {self.name}", *_environment(), *statics, f"tree: {tree}",
                 *(f"leaf: {_signature_text(s)}" for s in signatures)]
        text = "\n".join(lines)
        # An object's default repr is not the same in another process; an array's may be cut short ("...").
        if " at 0x" in text or any("array(" in s or "..." in s for s in statics):
            raise Unkeyable(self.name)
        return text


def store_dir() -> Path | None:
    """Where programs are saved now (None: JAX's compilation cache is off, so is this store)."""
    base = compile_cache.cache_dir()
    if base is None:
        return None
    path = base / SUBDIR
    if not path.is_dir():
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError:
            return None
    return path


# --- the key ------------------------------------------------------------------------------------------------

def _signature(x: Any) -> tuple:
    """What a compiled program assumes of one argument leaf (hashable)."""
    aval = jax.typeof(x)
    sharding = getattr(x, "sharding", None) if isinstance(x, jax.Array) else None
    return aval.shape, str(aval.dtype), bool(getattr(aval, "weak_type", False)), sharding


def _signature_text(signature: tuple) -> str:
    shape, dtype, weak, sharding = signature
    return f"{dtype}{list(shape)}{' weak' if weak else ''} {_sharding_text(sharding)}"


def _sharding_text(sharding: Any) -> str:
    if sharding is None:
        return "unplaced"
    if isinstance(sharding, SingleDeviceSharding):
        (device,) = sharding.device_set
        return f"device {device.id} {sharding.memory_kind}"
    if isinstance(sharding, NamedSharding):
        mesh = sharding.mesh
        ids = [int(d.id) for d in np.asarray(mesh.devices).flat]
        return (f"mesh {dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))} {mesh.axis_types} devices {ids} "
                f"spec {sharding.spec} {sharding.memory_kind}")
    raise Unkeyable(type(sharding).__name__)


def _trace_context() -> Any:
    """The configuration ``jax.jit`` keys its own cache on (thread-local overrides included)."""
    from jax._src import config  # no public name for it; the same tuple jit uses

    return config.trace_context()


def _environment() -> list[str]:
    """The parts of the key that do not depend on the call (recomputed per miss: configuration can change)."""
    devices = jax.devices()
    config = {name: value for name, value in jax.config.values.items()
              if not any(word in name for word in _CONFIG_NOT_IN_KEY)}
    return [
        f"eft_jax source: {source_digest()}",
        f"python: {sys.version_info[:3]}",
        *(f"{package}: {package_version(package)}" for package in _PACKAGES),
        f"backend: {devices[0].platform} {devices[0].client.platform_version}",
        f"devices: {[(d.id, d.device_kind) for d in devices]} processes {jax.process_count()}",
        f"XLA_FLAGS: {os.environ.get('XLA_FLAGS', '')}",
        f"LIBTPU_INIT_ARGS: {os.environ.get('LIBTPU_INIT_ARGS', '')}",
        f"config: {sorted(config.items())}",
        f"trace context: {_trace_context_text()}",
    ]


def _trace_context_text() -> str:
    from jax._src import config

    values = config.trace_context()
    try:
        names = config.trace_context_names()
    except NotImplementedError:
        names = tuple(str(i) for i in range(len(values)))
    # The axis environment prints as an object; outside any vmap/shard_map (every engine call) it is empty.
    return repr([(n, getattr(v, "axis_sizes", v)) for n, v in zip(names, values, strict=True)])


def source_digest() -> str:
    """sha256 over every ``.py`` file of the installed eft_jax package (path and bytes). Not memoised: a
    file edited in a live session (autoreload) must change the key; hashing takes a few milliseconds."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


# --- the store ----------------------------------------------------------------------------------------------

def _compile_fresh(lowered: Any) -> Any:
    """``lowered.compile()`` without JAX's persistent cache (see the module docstring for why). JAX decides
    once per cache set-up whether to use it, so the cache is reset around the compile (public API)."""
    with _COMPILING:
        enabled = jax.config.jax_enable_compilation_cache
        jax_compilation_cache.reset_cache()
        jax.config.update("jax_enable_compilation_cache", False)
        try:
            return lowered.compile()
        finally:
            jax.config.update("jax_enable_compilation_cache", enabled)
            jax_compilation_cache.reset_cache()


def _save(path: Path, key: str, compiled: Any, in_tree: Any) -> None:
    """``compiled`` into ``path``, with what :func:`_read` needs to load it alone: its key, its input tree
    (``in_tree``: of ``(dynamic arguments, {})``), output tree and devices."""
    try:
        blob, _, out_tree = serialize_executable.serialize(compiled)
        buffer = io.BytesIO()
        _DevicePickler(buffer).dump((FORMAT, key, blob, in_tree, out_tree, _device_ids(compiled)))
        data = buffer.getvalue()
    except Exception:  # noqa: BLE001 - e.g. closed-over constants, or XLA:CPU's sort comparators (top-p)
        return  # not serializable: used as compiled, not saved
    try:
        write_atomically(path, data)
    except OSError as e:
        warnings.warn(f"eft-jax: could not save a compiled program to {path} ({e}); the next run compiles it "
                      "again", stacklevel=4)


def write_atomically(path: Path, data: bytes) -> None:
    """``data`` into ``path`` through a temporary file beside it (a reader never sees a partial file); on
    OSError the temporary file is removed and the error raised."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise


def _device_ids(compiled: Any) -> list[int]:
    """The devices a program runs on, in its device-assignment order (the first input's sharding's)."""
    sharding = jax.tree.leaves(compiled.input_shardings)[0]
    devices = getattr(sharding, "_device_assignment", None) or sorted(sharding.device_set, key=lambda d: d.id)
    return [int(d.id) for d in devices]


def _read(path: Path) -> tuple[str, Any]:
    """The key saved at ``path`` and its program, loaded (raises on a broken file or another format)."""
    by_id = {d.id: d for d in jax.devices()}
    with path.open("rb") as f:
        form, key, blob, in_tree, out_tree, device_ids = _DeviceUnpickler(io.BufferedReader(f), by_id).load()
    if form != FORMAT:
        raise ValueError(f"format {form!r}, not {FORMAT!r}")
    return key, serialize_executable.deserialize_and_load(blob, in_tree, out_tree,
                                                          execution_devices=[by_id[i] for i in device_ids])


class _DevicePickler(pickle.Pickler):
    """Pickles a device as its id (an input tree's static parts may hold shardings, hence devices)."""

    def persistent_id(self, obj: Any) -> Any:
        return ("device", obj.id) if isinstance(obj, jax.Device) else None


class _DeviceUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, devices_by_id: dict[int, Any]):
        super().__init__(file)
        self.devices_by_id = devices_by_id

    def persistent_load(self, pid: Any) -> Any:
        kind, device_id = pid
        if kind != "device":
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
        return self.devices_by_id[device_id]


def _load(path: Path) -> tuple[str, Any] | None:
    """:func:`_read`, or None for a broken file (warned: a miss, compiled again)."""
    try:
        return _read(path)
    except Exception as e:  # noqa: BLE001 - any failure to read a cache entry is a miss, never a failed job
        warnings.warn(f"eft-jax: ignoring the unreadable compiled program {path} ({type(e).__name__}: {e}); "
                      "compiling it again", stacklevel=4)
        return None


# --- warm starts: a job's programs loaded in the background while it loads its models -------------------

class _WarmStart:
    """One :func:`warm_start` context: the programs it preloads and the ones its job asked for."""

    def __init__(self, directory: Path, tag: str):
        self.list_path = directory / (hashlib.sha256(tag.encode()).hexdigest() + _LIST_SUFFIX)
        self.tag = tag
        self.used: list[str] = []
        self.remembered = _read_list(self.list_path, tag)
        paths = [directory / name for name in self.remembered if (directory / name).is_file()]
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="eft-jax-preload") if paths else None
        for path in paths:
            _PRELOADS[path] = self.pool.submit(_read, path)
        self.paths = paths

    def close(self) -> None:
        for path in self.paths:
            future = _PRELOADS.pop(path, None)
            if future is not None:
                future.cancel()
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        used = list(dict.fromkeys(self.used))
        if used and used != self.remembered:
            try:
                write_atomically(self.list_path, json.dumps({"tag": self.tag, "programs": used}).encode())
            except OSError:
                pass  # only a hint for the next run


_WARM_STARTS: list[_WarmStart] = []  # the open warm_start contexts (one per running job, mostly none)
_PRELOADS: dict[Path, Future] = {}  # program file -> its background load, until taken or the context ends
_LIST_SUFFIX = ".programs.json"


@contextlib.contextmanager
def warm_start(tag: str) -> Iterator[None]:
    """Inside this context, the programs the last context of the same ``tag`` used (in that order) are
    loaded from the store in a background thread, and a call that needs one takes it from there (waiting
    for it if its load has begun) instead of loading it itself. Loading a program is XLA's deserialization,
    which releases the GIL: it runs beside the caller's model loading and prompt rendering on another core
    (a warm toy job: ~0.4 s of ~4 s). On leaving, the programs used inside are remembered for the next
    context of this tag (``<sha256 of tag>.programs.json`` in the store); nothing else changes, and a
    program preloaded but not asked for is dropped. ``tag``: what makes a job's programs the same, e.g. its
    command and whole configuration. A no-op when the store is off or in a multi-process job."""
    directory = store_dir()
    if directory is None or jax.process_count() > 1:
        yield
        return
    session = _WarmStart(directory, tag)
    _WARM_STARTS.append(session)
    try:
        yield
    finally:
        _WARM_STARTS.remove(session)
        session.close()


def _take_preloaded(path: Path) -> tuple[str, Any] | None:
    """What a warm start's :func:`_read` of ``path`` gave (waiting for it if it has begun), or None."""
    future = _PRELOADS.pop(path, None)
    if future is None or future.cancel():  # not begun: the caller loads it now rather than wait its turn
        return None
    try:
        return future.result()
    except Exception:  # noqa: BLE001 - the caller's own load reports a broken file
        return None


def _read_list(path: Path, tag: str) -> list[str]:
    """The program files a warm start of ``tag`` remembered ([] if none, or unreadable)."""
    try:
        saved = json.loads(path.read_text())
        names = saved["programs"] if saved.get("tag") == tag else []
        return [n for n in names if isinstance(n, str) and n.endswith(_SUFFIX) and "/" not in n]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []

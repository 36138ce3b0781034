"""Rego compiled to WebAssembly by OPA, evaluated in-process with wasmtime.

The embedded policy engine runs the same compiler as the OPA daemon:
:func:`compile_policy` hands the loaded sources to ``opa build -t wasm`` and
:class:`WasmPolicy` evaluates the module through OPA's Wasm ABI (1.2+ fast
path ``opa_eval``: input JSON in, result JSON out, one call).  See
https://www.openpolicyagent.org/docs/wasm for the ABI.

* Data (``data.json`` files) is parsed into the module's heap once; every
  evaluation writes its input above it and passes that heap pointer, so an
  evaluation never sees the memory of the one before.
* Built-ins the Wasm module does not implement itself ("SDK-dependent", named
  by the module's ``builtins`` export) are provided here: ``sprintf`` (the
  verbs the policies use, with Go's formatting) and ``regex.replace``.  A
  module that needs any other one is refused at load time.
* A runaway evaluation is interrupted by wasmtime's epoch deadline (a ticker
  thread advances the epoch every tenth of the shortest timeout asked for,
  between :data:`TICK_MIN_S` and :data:`TICK_MAX_S`, while evaluations run
  and for :data:`TICK_IDLE_S` after the last one began, then sleeps until
  the next), not abandoned: the caller gets :class:`EvaluationTimeout` and
  the store is rebuilt.
* Memory is capped at :data:`MAX_PAGES` 64 KiB pages; a policy that needs more
  traps, which the engine turns into a deny.
"""

from __future__ import annotations

import contextlib
import ctypes
import decimal
import io
import json
import math
import re
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import wasmtime
from wasmtime import _ffi
from wasmtime._func import enter_wasm as _enter_wasm
from wasmtime._store import Storelike

__all__ = [
    "MAX_PAGES",
    "TICK_MAX_S",
    "TICK_MIN_S",
    "EvaluationTimeout",
    "PolicyBuildError",
    "WasmError",
    "WasmPolicy",
    "compile_policy",
    "go_sprintf",
    "regex_replace",
]

# The epoch's period: a tenth of the timeout (an interrupt comes at most 10%
# late), within these bounds.  Every tick wakes a thread that needs the GIL,
# so no shorter than the timeout needs.
TICK_MIN_S: Final = 0.001
TICK_MAX_S: Final = 0.1
# How long the epoch keeps advancing after the last evaluation began.
TICK_IDLE_S: Final = 1.0
MAX_PAGES: Final = 1024  # 64 MiB
_I32 = wasmtime.ValType.i32()
_WASMTIME_I32 = _ffi.WASMTIME_I32.value
_memchr = ctypes.CDLL(None).memchr
_memchr.restype = ctypes.c_void_p
_memchr.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)


class WasmError(Exception):
    """The module could not be loaded or an evaluation failed (trap, abort, bad result)."""


class EvaluationTimeout(WasmError):
    """The evaluation ran past its deadline and was interrupted."""


class PolicyBuildError(WasmError):
    """``opa build`` refused the sources; the message is OPA's first error line."""


# -- compiling ------------------------------------------------------------------------------


def compile_policy(
    modules: Sequence[tuple[str, str]],
    data: Mapping[str, Any],
    *,
    opa: str,
    entrypoint: str = "mcp/decision",
    timeout_s: float = 120.0,
) -> bytes:
    """``opa build -t wasm`` of exactly these modules and data; returns policy.wasm.

    The sources are written to a private directory first, so what is compiled
    is what was loaded (and hashed into the revision), whatever changes on
    disk meanwhile.
    """
    found = shutil.which(opa)
    if found is None:
        raise PolicyBuildError(f"the opa binary {opa!r} was not found (policy.opa_binary)")
    opa = str(Path(found).resolve())
    with tempfile.TemporaryDirectory(prefix="mcp-policy-") as tmp:
        src = Path(tmp) / "src"
        for name, text in modules:
            path = src / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        src.mkdir(exist_ok=True)
        (src / "data.json").write_text(json.dumps(data), encoding="utf-8")
        bundle = Path(tmp) / "bundle.tar.gz"
        try:
            out = subprocess.run(
                [opa, "build", "-t", "wasm", "-e", entrypoint, "-o", str(bundle), str(src)],
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
                cwd=tmp,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PolicyBuildError(f"cannot run {opa}: {exc}") from exc
        if out.returncode != 0:
            lines = [ln.strip() for ln in (out.stderr or out.stdout).splitlines() if ln.strip()]
            if lines and re.fullmatch(r"error: \d+ errors? occurred:?", lines[0]):
                lines = lines[1:]  # the count; the errors themselves follow
            text = "; ".join(lines[:3]) if lines else f"opa build exited {out.returncode}"
            raise PolicyBuildError(text.removeprefix("error: "))
        with tarfile.open(bundle) as tar:
            member = tar.extractfile("/policy.wasm")
            if member is None:
                raise PolicyBuildError("opa build produced no policy.wasm")
            return member.read()


# -- SDK-dependent built-ins ------------------------------------------------------------------


def _go_float(value: float) -> str:
    """Go's ``%v`` of a float64: shortest digits, exponent when < 1e-4 or >= 1e21."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    d = decimal.Decimal(repr(value))
    sign, digits, exponent = d.as_tuple()
    if not isinstance(exponent, int):  # only for NaN/Infinity, handled above
        raise WasmError(f"sprintf: cannot format {value!r}")
    text = "".join(map(str, digits)).rstrip("0") or "0"
    exp10 = len(digits) + exponent - 1  # position of the first digit
    prefix = "-" if sign else ""
    if exp10 < -4 or exp10 >= 21:
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        return f"{prefix}{mantissa}e{'-' if exp10 < 0 else '+'}{abs(exp10):02d}"
    if exp10 < 0:
        return f"{prefix}0.{'0' * (-exp10 - 1)}{text}"
    if len(text) <= exp10 + 1:
        return prefix + text + "0" * (exp10 + 1 - len(text))
    return f"{prefix}{text[: exp10 + 1]}.{text[exp10 + 1 :]}"


def _rego_term(value: object) -> str:
    """OPA's string form of a term (what sprintf prints for composites)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _go_float(value) if not value.is_integer() else str(int(value))
    if isinstance(value, list):
        return "[" + ", ".join(_rego_term(v) for v in value) + "]"
    if isinstance(value, dict):
        items = sorted(value.items())
        return "{" + ", ".join(f"{_rego_term(k)}: {_rego_term(v)}" for k, v in items) + "}"
    raise WasmError(f"sprintf: unsupported value {value!r}")


def _go_arg(verb: str, value: object) -> str:
    # OPA converts arguments before fmt.Sprintf: integral numbers become Go
    # ints, other numbers float64, strings Go strings, anything else the
    # term's string form.  Go then formats by verb and type.
    if isinstance(value, bool) or value is None or isinstance(value, list | dict):
        text = _rego_term(value)
        return text if verb in "sv" else f"%!{verb}(string={text})"
    if isinstance(value, str):
        return value if verb in "sv" else f"%!{verb}(string={value})"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        number = int(value)
        return str(number) if verb in "vd" else f"%!{verb}(int={number})"
    if isinstance(value, float):
        return _go_float(value) if verb == "v" else f"%!{verb}(float64={_go_float(value)})"
    raise WasmError(f"sprintf: unsupported value {value!r}")


_VERB = re.compile(r"%(.)")


def go_sprintf(fmt: str, args: Sequence[object]) -> str:
    """Rego's ``sprintf`` for the verbs ``%s``, ``%v``, ``%d`` and ``%%``.

    Other verbs and flags raise :class:`WasmError` (so a policy using them
    fails closed instead of printing something different from OPA).
    """
    out: list[str] = []
    pos = 0
    index = 0
    for match in _VERB.finditer(fmt):
        out.append(fmt[pos : match.start()])
        pos = match.end()
        verb = match.group(1)
        if verb == "%":
            out.append("%")
            continue
        if verb not in "svd":
            raise WasmError(f"sprintf: verb %{verb} is not supported by the embedded engine")
        if index >= len(args):
            out.append(f"%!{verb}(MISSING)")
            continue
        out.append(_go_arg(verb, args[index]))
        index += 1
    out.append(fmt[pos:])
    if index < len(args):
        extra = ", ".join(f"{_go_type(a)}={_go_arg('v', a)}" for a in args[index:])
        out.append(f"%!(EXTRA {extra})")
    return "".join(out)


def _go_type(value: object) -> str:
    if isinstance(value, str | bool) or value is None:
        return "string"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "int"
    if isinstance(value, float):
        return "float64"
    return "string"


_GO_TEMPLATE = re.compile(r"\$(\$|\{(\w+)\}|(\w+))")


def regex_replace(text: str, pattern: str, replacement: str) -> str:
    """``regex.replace``: Go's ``Regexp.ReplaceAllString`` (``$1``/``${name}`` expand)."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise WasmError(f"regex.replace: bad pattern {pattern!r}: {exc}") from exc

    def group(match: re.Match[str], name: str) -> str:
        key: int | str = int(name) if name.isdigit() else name
        try:
            return match.group(key) or ""
        except IndexError:  # Go expands an unknown group to ""
            return ""

    def expand(match: re.Match[str]) -> str:
        return _GO_TEMPLATE.sub(
            lambda t: "$" if t.group(1) == "$" else group(match, t.group(2) or t.group(3)),
            replacement,
        )

    return compiled.sub(expand, text)


def _builtin_sprintf(fmt: object, args: object) -> str:
    if not isinstance(fmt, str) or not isinstance(args, list):
        raise WasmError("sprintf: wants a string and an array")
    return go_sprintf(fmt, args)


def _builtin_regex_replace(text: object, pattern: object, value: object) -> str:
    if not (isinstance(text, str) and isinstance(pattern, str) and isinstance(value, str)):
        raise WasmError("regex.replace: wants three strings")
    return regex_replace(text, pattern, value)


BUILTINS: Final[Mapping[str, Callable[..., object]]] = {
    "sprintf": _builtin_sprintf,
    "regex.replace": _builtin_regex_replace,
}


# -- the runtime ----------------------------------------------------------------------------


class _Ticker:
    """Advances a wasmtime engine's epoch every :attr:`period` while evaluations may run.

    An idle gateway should not wake up periodically: the thread ticks while
    an evaluation runs and for :data:`TICK_IDLE_S` after the last one began
    (so that a steady stream of decisions does not wake it once each), then
    waits for the next :meth:`begin`.  The period is a tenth of the shortest
    timeout :meth:`begin` was given (see :data:`TICK_MAX_S`); it only ever
    shrinks, so a deadline counted in ticks is never reached early.
    """

    def __init__(self, engine: wasmtime.Engine) -> None:
        self._engine = engine
        self._cond = threading.Condition()
        self._running = 0  # evaluations between begin() and end()
        self._last = 0.0  # monotonic time of the last begin()
        self._ticking = False
        self._closed = False
        self.period = TICK_MAX_S
        self._thread = threading.Thread(target=self._run, name="wasm-epoch", daemon=True)
        self._thread.start()

    def begin(self, timeout_s: float) -> int:
        """Before an evaluation: the epoch advances until it has ended.

        Returns the epoch deadline (in ticks from now) for ``timeout_s``.
        """
        with self._cond:
            self.period = min(self.period, max(TICK_MIN_S, timeout_s / 10))
            self._running += 1
            self._last = time.monotonic()
            if not self._ticking:
                self._ticking = True
                self._cond.notify()
            # One tick more: the first one may come at once.
            return max(1, math.ceil(timeout_s / self.period)) + 1

    def end(self) -> None:
        with self._cond:
            self._running -= 1

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if not self._ticking:
                    self._cond.wait()
                    continue
                self._cond.wait(self.period)
                self._engine.increment_epoch()
                if not self._running and time.monotonic() - self._last > TICK_IDLE_S:
                    self._ticking = False

    @property
    def ticking(self) -> bool:
        return self._ticking

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()


class _I32Call:
    """Calls an exported function whose parameters and result are all i32, cheaply.

    ``wasmtime.Func.__call__`` asks the runtime for the function's type and
    converts every argument through ``Val`` on each call: about 5 us per
    argument, 50 us for ``opa_eval``'s seven, several times what a small
    policy needs to evaluate.  The type is checked once here instead and
    the call goes straight to ``wasmtime_func_call`` with plain i32 values,
    through the same trap and exception handling as ``Func.__call__``.
    This uses wasmtime-py's internal ``_ffi`` and ``enter_wasm``, so the
    dependency is pinned to the release series it was written against.
    """

    def __init__(self, store: Storelike, name: str, func: wasmtime.Func) -> None:
        ty = func.type(store)
        if any(str(p) != "i32" for p in ty.params) or [str(r) for r in ty.results] != ["i32"]:
            raise WasmError(f"policy module export {name} does not take and return i32")
        self._ref = ctypes.byref(func._func)
        self._nparams = len(ty.params)
        self._params_type = _ffi.wasmtime_val_t * self._nparams
        self.name = name

    def __call__(self, store: Storelike, *args: int) -> int:
        if len(args) != self._nparams:
            raise WasmError(f"{self.name} takes {self._nparams} arguments, not {len(args)}")
        params = self._params_type()
        for param, value in zip(params, args, strict=True):
            param.kind = _WASMTIME_I32
            param.of.i32 = value
        results = (_ffi.wasmtime_val_t * 1)()
        with _enter_wasm(store) as trap:
            error = _ffi.wasmtime_func_call(
                store._context(), self._ref, params, self._nparams, results, 1, trap
            )
            if error:
                raise wasmtime.WasmtimeError._from_ptr(error)
        return int(results[0].of.i32)


class WasmPolicy:
    """One compiled policy module, its data, and a store to evaluate in.

    Not thread-safe by itself: :meth:`evaluate` takes an internal lock, so
    evaluations are serialized (each takes tens to hundreds of microseconds).
    """

    def __init__(
        self,
        wasm: bytes,
        data: Mapping[str, Any],
        *,
        engine: wasmtime.Engine | None = None,
        entrypoint: str = "mcp/decision",
    ) -> None:
        if engine is None:
            config = wasmtime.Config()
            config.epoch_interruption = True
            engine = wasmtime.Engine(config)
        self.engine = engine
        self._ticker = _Ticker(engine)
        self._lock = threading.Lock()
        try:
            self.module = wasmtime.Module(engine, wasm)
        except wasmtime.WasmtimeError as exc:
            self._ticker.close()
            raise WasmError(f"policy module does not load: {exc}") from exc
        self._data_json = json.dumps(data, ensure_ascii=False).encode()
        self._entrypoint_name = entrypoint
        try:
            self._instantiate()
        except WasmError:
            self._ticker.close()
            raise

    def close(self) -> None:
        self._ticker.close()

    @property
    def ticking(self) -> bool:
        """Whether the epoch advances now (evaluations ran lately, or one runs)."""
        return self._ticker.ticking

    @property
    def tick_s(self) -> float:
        """The epoch's period: a tenth of the shortest timeout so far (bounded)."""
        return self._ticker.period

    # -- instantiation ---------------------------------------------------------------------

    def _instantiate(self) -> None:
        store = wasmtime.Store(self.engine)
        store.set_epoch_deadline(1 << 40)
        minimum = 2
        for imp in self.module.imports:
            if imp.module == "env" and isinstance(imp.type, wasmtime.MemoryType):
                minimum = max(minimum, imp.type.limits.min)
        memory = wasmtime.Memory(store, wasmtime.MemoryType(wasmtime.Limits(minimum, MAX_PAGES)))
        linker = wasmtime.Linker(self.engine)
        linker.define(store, "env", "memory", memory)
        for arity in range(5):
            linker.define_func(
                "env",
                f"opa_builtin{arity}",
                wasmtime.FuncType([_I32] * (arity + 2), [_I32]),
                self._builtin,
                access_caller=True,
            )
        linker.define_func(
            "env", "opa_abort", wasmtime.FuncType([_I32], []), self._abort, access_caller=True
        )
        linker.define_func("env", "opa_println", wasmtime.FuncType([_I32], []), lambda _a: None)
        try:
            instance = linker.instantiate(store, self.module)
        except (wasmtime.WasmtimeError, wasmtime.Trap) as exc:
            raise WasmError(f"policy module does not instantiate: {exc}") from exc
        exports = instance.exports(store)
        self._store = store
        self._memory = memory
        self._exports = exports

        def func(name: str) -> _I32Call:
            item = exports[name]
            if not isinstance(item, wasmtime.Func):
                raise WasmError(f"policy module export {name} is not a function")
            return _I32Call(store, name, item)

        major = exports["opa_wasm_abi_version"]
        minor = exports["opa_wasm_abi_minor_version"]
        if not isinstance(major, wasmtime.Global) or not isinstance(minor, wasmtime.Global):
            raise WasmError("policy module has no OPA ABI version")
        if major.value(store) != 1 or minor.value(store) < 2:
            raise WasmError(
                f"policy module ABI {major.value(store)}.{minor.value(store)} is not 1.2+"
            )
        self._eval = func("opa_eval")
        self._malloc = func("opa_malloc")
        self._json_parse = func("opa_json_parse")
        self._json_dump = func("opa_json_dump")
        heap_ptr_get = func("opa_heap_ptr_get")
        needed = self._read_value(store, func("builtins")(store))
        entrypoints = self._read_value(store, func("entrypoints")(store))
        if not isinstance(needed, dict) or not isinstance(entrypoints, dict):
            raise WasmError("policy module has malformed builtins/entrypoints exports")
        missing = sorted(set(needed) - set(BUILTINS))
        if missing:
            raise WasmError(
                "policy uses built-ins the embedded engine does not provide: " + ", ".join(missing)
            )
        self._builtins = {int(i): BUILTINS[name] for name, i in needed.items()}
        if self._entrypoint_name not in entrypoints:
            raise WasmError(f"policy module has no entrypoint {self._entrypoint_name}")
        self._entrypoint = int(entrypoints[self._entrypoint_name])
        self._data_addr = self._put_value(store, self._data_json)
        self._heap = int(heap_ptr_get(store))

    # -- memory helpers ----------------------------------------------------------------------

    def _cstring(self, store: Storelike, addr: int) -> bytes:
        """The NUL-terminated string at ``addr``, never reading past the memory's end."""
        base = ctypes.addressof(self._memory.data_ptr(store).contents)
        size = self._memory.data_len(store)
        if not 0 <= addr < size:
            raise WasmError("policy module returned an address outside its memory")
        nul = _memchr(base + addr, 0, size - addr)
        if not nul:
            raise WasmError("policy module returned an unterminated string")
        return ctypes.string_at(base + addr, nul - (base + addr))

    def _read_value(self, store: Storelike, value_addr: int) -> object:
        text = self._cstring(store, int(self._json_dump(store, value_addr)))
        return json.loads(text)

    def _put_value(self, store: Storelike, raw: bytes) -> int:
        addr = int(self._malloc(store, len(raw)))
        self._memory.write(store, raw, addr)
        value = int(self._json_parse(store, addr, len(raw)))
        if value == 0:
            raise WasmError("policy module could not parse a JSON value")
        return value

    def _ensure(self, end: int) -> None:
        size = self._memory.data_len(self._store)
        if end > size:
            pages = -(-(end - size) // 65536)
            try:
                self._memory.grow(self._store, pages)
            except wasmtime.WasmtimeError as exc:
                raise WasmError("policy input does not fit in the policy's memory") from exc

    # -- host functions ----------------------------------------------------------------------

    def _builtin(self, caller: wasmtime.Caller, builtin_id: int, _ctx: int, *args: int) -> int:
        impl = self._builtins.get(builtin_id)
        if impl is None:
            raise WasmError(f"policy called unknown built-in #{builtin_id}")
        values = [self._read_value(caller, a) for a in args]
        result = json.dumps(impl(*values), ensure_ascii=False).encode()
        return self._put_value(caller, result)

    def _abort(self, caller: wasmtime.Caller, addr: int) -> None:
        message = self._cstring(caller, addr).decode("utf-8", "replace")
        raise WasmError(f"policy aborted: {message}")

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate(self, doc: Mapping[str, object], timeout_s: float) -> tuple[bool, object]:
        """``(defined, result)`` of the entrypoint for input ``doc``.

        Raises :class:`EvaluationTimeout` after ``timeout_s`` (the store is
        rebuilt) and :class:`WasmError` for any other failure.
        """
        raw = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
        with self._lock:
            try:
                self._ensure(self._heap + len(raw) + 1)  # bounds checked: plain copy
                ctypes.memmove(
                    ctypes.addressof(self._memory.data_ptr(self._store).contents) + self._heap,
                    raw,
                    len(raw),
                )
                deadline = self._ticker.begin(timeout_s)
                try:
                    self._store.set_epoch_deadline(deadline)
                    addr = self._eval(
                        self._store,
                        0,
                        self._entrypoint,
                        self._data_addr,
                        self._heap,
                        len(raw),
                        self._heap + len(raw),
                        0,
                    )
                finally:
                    self._ticker.end()
                text = self._cstring(self._store, int(addr))
            except WasmError:
                self._recover()
                raise
            except wasmtime.Trap as exc:
                self._recover()
                if exc.trap_code == wasmtime.TrapCode.INTERRUPT:
                    raise EvaluationTimeout(f"evaluation timed out after {timeout_s:g}s") from exc
                raise WasmError(_first_line(str(exc))) from exc
            except wasmtime.WasmtimeError as exc:
                self._recover()
                cause = exc.__cause__ or exc.__context__
                if isinstance(cause, WasmError):
                    raise WasmError(str(cause)) from exc
                raise WasmError(_first_line(str(exc))) from exc
        try:
            results = json.loads(text)
        except ValueError as exc:
            raise WasmError("policy returned malformed JSON") from exc
        if not isinstance(results, list):
            raise WasmError("policy returned a malformed result set")
        if not results:
            return False, None
        first = results[0]
        if not isinstance(first, dict) or "result" not in first:
            raise WasmError("policy returned a malformed result set")
        return True, first["result"]

    def _recover(self) -> None:
        """A trap may leave the instance half-way: start from a fresh store."""
        with contextlib.suppress(WasmError):
            self._instantiate()


def _first_line(text: str) -> str:
    for line in io.StringIO(text):
        if line.strip():
            return line.strip()
    return "evaluation failed"

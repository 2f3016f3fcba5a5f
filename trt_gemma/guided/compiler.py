"""Compile a StructuredOutputsParams into an xgrammar grammar, once per distinct constraint.

Kinds: ``json`` (a JSON schema), ``json_object`` (any JSON object), ``regex``, ``choice`` (an
EBNF alternation of the literal strings) and ``grammar`` (EBNF, xgrammar's dialect). Whatever
does not compile raises GrammarError naming the field and xgrammar's reason.

The cache is ours (xgrammar's own is switched off, so there is one): keyed by the kind, the
constraint's canonical text (a schema re-serialised compactly, keeping its property order,
which is the order the output writes them) and the JSON options. It is an LRU bounded by the
bytes xgrammar reports for each compiled grammar (its token-mask cache grows with the
vocabulary: ~0.2-0.4 MB per schema for Gemma 3's 262144 tokens), ``max_bytes`` in all.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

from trt_gemma.errors import ConfigError
from trt_gemma.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:  # xgrammar is imported when the first grammar is compiled (it takes ~2 s)
    import xgrammar as xgr

DEFAULT_CACHE_BYTES = 256 << 20
# JSON allows any whitespace between tokens, but a run of it is at most this many characters:
# room to pretty-print 5 levels deep at 4-space indents (11 at 2), never the endless newlines a
# small or lost model falls into (a random-weights Gemma wrote "\n" for 118 of 120 tokens).
JSON_MAX_WHITESPACE = 24
# xgrammar prefixes its errors with "[hh:mm:ss] /path/file.cc:123: " and, for some, a failed
# check's expression; the rest is the reason a user can act on.
_NOISE = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")
# xgrammar 0.2.9 writes a string with minLength / maxLength as a bounded repetition of this bare
# class, which lets raw control characters (U+0000-U+001F but CR and LF) into the string:
# invalid JSON (strict parsers reject it; a random-weights model wrote a raw \x02). Upstream
# issue #800, fix unreleased. The class is narrowed to JSON's unescaped characters. Escapes stay
# out of such strings, as upstream: an alternation with them made filling a token mask ~1000x
# slower (0.1 -> 100-440 ms per row on Gemma 3's vocabulary).
_BARE_CHAR = r'[^\"\\\r\n]'  # as xgrammar prints it
_JSON_CHAR = r'[^\0-\x1f\"\\]'


class GrammarError(ConfigError):
    """A constraint (JSON schema, regex, choice, EBNF grammar) that does not compile."""


def _reason(e: Exception) -> str:
    return _NOISE.sub("", str(e).strip().splitlines()[0] if str(e).strip() else repr(e))


def canonical(params: StructuredOutputsParams) -> tuple:
    """The cache key: (kind, canonical text, options). Raises GrammarError for a schema that is
    not JSON."""
    kind = params.kind
    if kind == "json":
        schema = params.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise GrammarError(f"structured_outputs.json: the JSON schema is not valid JSON: "
                                   f"{e}") from None
        if not isinstance(schema, dict):
            raise GrammarError("structured_outputs.json: a JSON schema must be a JSON object, "
                               f"got {type(schema).__name__}")
        try:
            text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError) as e:
            raise GrammarError(f"structured_outputs.json: the schema is not JSON: {e}") from None
    elif kind == "json_object":
        text = '{"type":"object"}'
    elif kind == "choice":
        # Each choice a JSON-escaped string literal: xgrammar's EBNF reads the same escapes.
        text = "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice)
    else:
        text = getattr(params, kind)
    options = (params.disable_any_whitespace, params.strict) if kind in ("json",
                                                                         "json_object") else ()
    return kind, text, options


class GrammarCompiler:
    """xgrammar's compiler for one tokenizer, behind an LRU cache. Thread-safe."""

    def __init__(self, info: xgr.TokenizerInfo, max_bytes: int = DEFAULT_CACHE_BYTES):
        import xgrammar as xgr

        self.info = info
        self.max_bytes = max_bytes
        self._compiler = xgr.GrammarCompiler(info, max_threads=min(8, os.cpu_count() or 1),
                                             cache_enabled=False)
        self._cache: OrderedDict[tuple, xgr.CompiledGrammar] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.num_compiled = 0  # compilations run (cache misses), for tests and stats

    def compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        key = canonical(params)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        compiled = self._compile(*key)  # outside the lock: compiles can run side by side
        with self._lock:
            if key not in self._cache:
                self.num_compiled += 1
                self._cache[key] = compiled
                self._bytes += compiled.memory_size_bytes
                while self._bytes > self.max_bytes and len(self._cache) > 1:
                    _, old = self._cache.popitem(last=False)
                    self._bytes -= old.memory_size_bytes
            return self._cache[key]

    def _compile(self, kind: str, text: str, options: tuple) -> xgr.CompiledGrammar:
        import xgrammar as xgr

        field = f"structured_outputs.{kind}"
        try:
            if kind in ("json", "json_object"):
                compact, strict = options
                grammar = xgr.Grammar.from_json_schema(
                    text, any_whitespace=not compact, strict_mode=strict,
                    max_whitespace_cnt=None if compact else JSON_MAX_WHITESPACE)
                ebnf = str(grammar)
                if _BARE_CHAR in ebnf:
                    return self._compiler.compile_grammar(ebnf.replace(_BARE_CHAR, _JSON_CHAR))
                return self._compiler.compile_grammar(grammar)
            if kind == "regex":
                return self._compiler.compile_regex(text)
            return self._compiler.compile_grammar(text)  # grammar, choice
        except (RuntimeError, ValueError, TypeError) as e:
            what = {"json": "the JSON schema", "json_object": "the JSON object grammar",
                    "regex": "the regex", "choice": "the choices",
                    "grammar": "the EBNF grammar"}[kind]
            raise GrammarError(f"{field}: {what} does not compile: {_reason(e)}") from None

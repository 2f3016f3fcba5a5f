"""Gemma's tokenizer: text <-> token ids, streaming detokenization; the chat template is
`chat_format.py`, reached through `GemmaTokenizer.apply_chat_template`.

`GemmaTokenizer` wraps a Rust `tokenizers.Tokenizer`, whatever it was built from:

- an HF checkpoint dir: `tokenizer.json`, or failing that the SentencePiece `tokenizer.model`;
- a GGUF file: the vocabulary in its metadata, rebuilt into the very tokenizer transformers builds
  (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), without importing transformers
  (`tokenizer_vocab.py`, as is the SentencePiece reader);
- an engine dir: what `save` wrote (`tokenizer.json` + `tokenizer_meta.json`), read back by `load`.

BOS: `encode` adds one (the checkpoint's `add_bos`, true for every Gemma) and the chat template
never writes one, so `encode(apply_chat_template(messages))` starts with exactly one BOS. Text that
itself starts with the literal "<bos>" gets a second one, exactly as HF tokenizers do: encode such
text with `add_bos=False`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenizers import Tokenizer

from trt_gemma.chat_format import chat_format_for, tools_from_openai
from trt_gemma.chat_format import render_chat  # noqa: F401 - kept importable from here
from trt_gemma.tokenizer_vocab import (
    END_OF_TURN,
    backend_from_sentencepiece,
    backend_from_vocab,
    fields_from_reader,
    read_gguf_tokenizer_fields,
)


@dataclass(frozen=True)
class TokenizerMeta:
    """What a model needs besides the vocabulary; stored as `tokenizer_meta.json` in engine dirs."""

    bos_id: int  # prepended by encode() when add_bos
    eos_id: int  # the checkpoint's end-of-sequence token
    pad_id: int | None  # None when the checkpoint names no pad token
    add_bos: bool  # whether encode() adds BOS by default (HF's add_bos_token)
    stop_token_ids: tuple[int, ...]  # generation stops on any of these: eos, <end_of_turn>, ...
    chat_template: str | None = None  # the checkpoint's jinja template, kept for reference only


class GemmaTokenizer:
    """Encode/decode for Gemma 1/2/3; build one with a `from_*` constructor or `load`."""

    META_FILE = "tokenizer_meta.json"

    def __init__(self, backend: Tokenizer, meta: TokenizerMeta):
        self.backend = backend
        self.meta = meta
        # Ids that decode(skip_special_tokens=True) drops: the added tokens flagged special.
        self.special_ids = frozenset(
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special
        )
        # Byte-fallback tokens <0x00>..<0xFF>: the detokenizer holds text while a run of them lasts.
        byte_ids = (backend.token_to_id(f"<0x{byte:02X}>") for byte in range(256))
        self.byte_ids = frozenset(i for i in byte_ids if i is not None)

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> GemmaTokenizer:
        """From an HF checkpoint dir: `tokenizer.json` (preferred) or `tokenizer.model`."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such checkpoint directory")
        if (path / "tokenizer.json").is_file():
            backend = _read_tokenizer_json(path / "tokenizer.json")
        elif (path / "tokenizer.model").is_file():
            backend = backend_from_sentencepiece(path / "tokenizer.model")
        else:
            raise FileNotFoundError(f"{path}: neither tokenizer.json nor tokenizer.model found")
        config = _read_json_if_present(path / "tokenizer_config.json")
        special_map = _read_json_if_present(path / "special_tokens_map.json")
        generation = _read_json_if_present(path / "generation_config.json")

        def token_id(name: str, default: str) -> int | None:
            spelled = config.get(name) or special_map.get(name) or default
            if isinstance(spelled, Mapping):  # {"content": "<bos>", "lstrip": false, ...}
                spelled = spelled["content"]
            return backend.token_to_id(spelled)

        bos_id, eos_id = token_id("bos_token", "<bos>"), token_id("eos_token", "<eos>")
        for name, value in (("bos_token", bos_id), ("eos_token", eos_id)):
            if value is None:
                raise ValueError(f"{path}: the {name} of tokenizer_config.json is not in the vocab")
        extra_eos = generation.get("eos_token_id") or []  # Gemma 3 lists [1, 106]
        extra_eos = [extra_eos] if isinstance(extra_eos, int) else list(extra_eos)
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        meta = TokenizerMeta(
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=token_id("pad_token", "<pad>"),
            add_bos=bool(config.get("add_bos_token", True)),
            stop_token_ids=_stop_ids(backend, [eos_id, *extra_eos]),
            chat_template=template,
        )
        return cls(backend, meta)

    @classmethod
    def from_gguf(cls, source) -> GemmaTokenizer:
        """From a GGUF file's path, or a `gguf.GGUFReader` already open on one.

        Builds the tokenizer transformers builds from the file's vocabulary, in ~2 s for Gemma 3's
        262k tokens (transformers: ~25-40 s). Not cached: loading a saved tokenizer.json of that
        size takes ~1.4 s, so a cache would save little; engine dirs keep the built one (`save`).
        """
        if isinstance(source, (str, os.PathLike)):
            name, fields = str(source), read_gguf_tokenizer_fields(Path(source))
        else:
            # GGUFReader keeps its file only as the memmap's filename.
            name = str(getattr(getattr(source, "data", None), "filename", None) or "GGUF")
            fields = fields_from_reader(source)
        if "tokenizer.ggml.tokens" not in fields:
            raise ValueError(f"{name}: has no tokenizer (no tokenizer.ggml.tokens in its metadata)")
        arch, kind = fields.get("general.architecture"), fields.get("tokenizer.ggml.model")
        if kind != "llama" or arch not in ("gemma", "gemma2", "gemma3"):
            raise ValueError(
                f"{name}: expected a Gemma SentencePiece vocabulary (tokenizer.ggml.model 'llama', "
                f"architecture gemma/gemma2/gemma3), found {kind!r} for {arch!r}"
            )
        tokens, types = fields["tokenizer.ggml.tokens"], fields.get("tokenizer.ggml.token_type")
        if types is None or len(types) != len(tokens):
            raise ValueError(
                f"{name}: tokenizer.ggml.token_type does not match the {len(tokens)} tokens"
            )
        bos_id = fields.get("tokenizer.ggml.bos_token_id", 2)
        eos_id = fields.get("tokenizer.ggml.eos_token_id", 1)
        unk_id = fields.get("tokenizer.ggml.unknown_token_id", 3)
        for key, value in (("bos", bos_id), ("eos", eos_id), ("unknown", unk_id)):
            if not 0 <= value < len(tokens):
                raise ValueError(
                    f"{name}: tokenizer.ggml.{key}_token_id {value} is not in the vocab"
                )
        add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", True))  # llama.cpp's default
        # add_space_prefix is not read: it is false for Gemma, and transformers ignores it too.
        bos_token = tokens[bos_id] if add_bos else None
        backend = backend_from_vocab(tokens, types, tokens[unk_id], bos_token)
        eot_id = fields.get("tokenizer.ggml.eot_token_id")  # llama.cpp's end-of-turn, if recorded
        meta = TokenizerMeta(
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=fields.get("tokenizer.ggml.padding_token_id"),
            add_bos=add_bos,
            stop_token_ids=_stop_ids(backend, [eos_id] + ([eot_id] if eot_id is not None else [])),
            chat_template=fields.get("tokenizer.chat_template"),
        )
        return cls(backend, meta)

    def save(self, directory: str | os.PathLike) -> None:
        """Write `tokenizer.json` and `tokenizer_meta.json` into `directory` (an engine dir)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        meta = json.dumps(asdict(self.meta), indent=2, ensure_ascii=False)
        (directory / self.META_FILE).write_text(meta + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> GemmaTokenizer:
        """Read back what `save` wrote."""
        directory = Path(directory)
        tokenizer_file, meta_file = directory / "tokenizer.json", directory / cls.META_FILE
        for file in (tokenizer_file, meta_file):
            if not file.is_file():
                raise FileNotFoundError(f"{file}: missing (GemmaTokenizer.save writes it)")
        raw = _read_json_if_present(meta_file)
        expected = {"bos_id": int, "eos_id": int, "add_bos": bool, "stop_token_ids": list}
        for field, kind in expected.items():
            if not isinstance(raw.get(field), kind):
                raise ValueError(f"{meta_file}: field {field!r} should be {kind.__name__}")
        raw["stop_token_ids"] = tuple(raw["stop_token_ids"])
        known = TokenizerMeta.__dataclass_fields__
        meta = TokenizerMeta(**{k: v for k, v in raw.items() if k in known})
        return cls(_read_tokenizer_json(tokenizer_file), meta)

    # -- the interface the runtime and server use -----------------------------------------------

    @property
    def bos_id(self) -> int:
        return self.meta.bos_id

    @property
    def eos_id(self) -> int:
        return self.meta.eos_id

    @property
    def pad_id(self) -> int | None:
        return self.meta.pad_id

    @property
    def stop_token_ids(self) -> frozenset[int]:
        return frozenset(self.meta.stop_token_ids)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`, led by BOS when `add_bos` (None: the checkpoint's setting)."""
        # The post-processor (if any) is bypassed so BOS handling is ours alone, for every source.
        ids = self.backend.encode(text, add_special_tokens=False).ids
        add_bos = self.meta.add_bos if add_bos is None else add_bos
        return [self.meta.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[Mapping], add_generation_prompt: bool = True,
        tools: Sequence[Mapping] | None = None,
    ) -> str:
        """The chat prompt for `messages` (and OpenAI-style `tools`), without BOS (encode adds
        it), in this checkpoint's dialect: FunctionGemma's if it has the tool tokens, else
        Gemma 3's (`trt_gemma.chat_format`)."""
        return chat_format_for(self).render(messages, add_generation_prompt,
                                            tools_from_openai(tools) or None)

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens)


class IncrementalDetokenizer:
    """Turns one request's generated ids into text as they arrive, one per `add`.

    A character may span several byte-fallback tokens (an emoji is `<0xF0><0x9F>...`), and the
    decoder turns a run of byte tokens into text as a whole: valid UTF-8, or one U+FFFD per byte
    if any byte is amiss, even bytes that looked complete alone. So text is held while the last
    token is a byte token (a character spelled in bytes comes out with the next token, or at
    `flush`) or while it ends in U+FFFD. The window prefix..read is text already emitted, decoded
    again so the new text is found by difference (decoders that treat a word's first token
    specially then still agree with a decode of the whole). The pieces concatenate to exactly
    `decode(all_ids)`, whatever the ids.
    """

    def __init__(self, tokenizer: GemmaTokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the window decoded for context
        self._read_offset = 0  # end of the text emitted so far

    def add(self, token_id: int) -> str:
        """The text completed by `token_id` ("" while a character is still incomplete)."""
        if token_id in self._skip:
            return ""
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is held back at the end (an incomplete character decodes as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        def decode(ids: list[int]) -> str:  # special ids were dropped in add() if unwanted
            return self._tokenizer.backend.decode(ids, skip_special_tokens=False)

        emitted = decode(self._ids[self._prefix_offset : self._read_offset])
        text = decode(self._ids[self._prefix_offset :])
        if len(text) <= len(emitted):
            return ""
        if not final and (self._ids[-1] in self._tokenizer.byte_ids or text.endswith("\ufffd")):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text[len(emitted) :]


def _stop_ids(backend: Tokenizer, eos_ids: Iterable[int]) -> tuple[int, ...]:
    end_of_turn = backend.token_to_id(END_OF_TURN)
    return tuple(sorted(set(eos_ids) | ({end_of_turn} if end_of_turn is not None else set())))


def _read_tokenizer_json(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception for any bad file
        raise ValueError(f"{path}: not a valid tokenizers JSON file ({error})") from error


def _read_json_if_present(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data

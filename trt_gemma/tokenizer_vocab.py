"""Rust ``tokenizers`` backends rebuilt from a bare vocabulary: a GGUF's tokenizer metadata or a
SentencePiece ``tokenizer.model`` (read as protobuf here, no sentencepiece package needed).

Both store the same (piece, type) list; ``backend_from_vocab`` turns it into the tokenizer
transformers builds for Gemma. ``tokenizer.py`` wraps the result in ``GemmaTokenizer``.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from trt_gemma.gguf_file import read_gguf

# Gemma's chat markers: user-defined in its SentencePiece model, special in HF's tokenizer.
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"

# Token types, numbered alike by SentencePiece's ModelProto and GGUF's tokenizer.ggml.token_type.
_CONTROL, _USER_DEFINED = 3, 4


# -- building from a vocabulary (GGUF metadata or SentencePiece model) --------------------------


def backend_from_vocab(
    tokens: list[str], types: list[int], unk_token: str, bos_token: str | None
) -> Tokenizer:
    """The tokenizer transformers builds for a Gemma GGUF, without importing transformers.

    Mirrors transformers' `gemma_tokenizer` + `add_gguf_special_tokens` (integrations/gguf) and
    its `GemmaTokenizer`: byte-fallback BPE over a space->"▁" normalizer, merges rebuilt from the
    vocabulary in file order, control tokens special, user-defined tokens kept whole.
    """
    # Whitespace-only tokens are stored as real spaces ("  ") but looked up as "▁▁".
    spelled = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {token: index for index, token in enumerate(spelled)}
    backend = Tokenizer(
        BPE(
            vocab,
            _merges_in_file_order(vocab),
            unk_token=unk_token,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    # A no-op after the normalizer, kept so the tokenizer.json equals transformers' own.
    backend.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    backend.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t, k in zip(tokens, types, strict=True)
            if k == _CONTROL
        ]
    )
    backend.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, k in zip(tokens, types, strict=True)
            if k == _USER_DEFINED and t in vocab
        ]
    )
    if bos_token:  # for consumers of the saved tokenizer.json; encode() adds BOS itself
        bos = (bos_token, vocab[bos_token])
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A",
            pair=f"{bos_token} $A {bos_token}:1 $B:1",
            special_tokens=[bos],
        )
    return backend


def _merges_in_file_order(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every (left, right) split of a token into two tokens, ranked by the token's position.

    The GGUF lists no merges, and Gemma's scores do not follow its merge order; transformers'
    `generate_merges(vocab, {token: -index})` ranks by position, then longer left pieces first.
    This yields that same list, without its sort of half a million merges.
    """
    merges = []
    for token in sorted(vocab, key=vocab.__getitem__):
        for cut in range(len(token) - 1, 0, -1):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                merges.append((left, right))
    return merges


def backend_from_sentencepiece(model_file: Path) -> Tokenizer:
    """Convert a Gemma SentencePiece `tokenizer.model` (BPE, byte fallback, no dummy prefix).

    The file is a protobuf ModelProto, read here directly: its pieces are the same (token, type)
    list a GGUF stores, so the GGUF recipe applies. Gemma's chat markers are user-defined in the
    model but special in HF's tokenizer (transformers' GemmaConverter), so they are promoted.
    """
    pieces, model_type, normalizer = _read_sentencepiece_model(model_file)
    if model_type != 2 or normalizer.get(3, 1) or normalizer.get(4, 1):
        raise ValueError(
            f"{model_file}: not a Gemma-style SentencePiece model (expected BPE with no dummy "
            f"prefix and whitespace kept; model_type={model_type}, normalizer={normalizer})"
        )
    tokens = [piece for piece, _ in pieces]
    types = [_CONTROL if p in (START_OF_TURN, END_OF_TURN) else t for p, t in pieces]
    unk = next((p for p, t in pieces if t == 2), "<unk>")  # 2 is UNKNOWN
    return backend_from_vocab(tokens, types, unk, "<bos>" if "<bos>" in tokens else None)


def _read_sentencepiece_model(model_file: Path):
    """`([(piece, type)], model_type, {normalizer field: value})` from a ModelProto file."""
    data = model_file.read_bytes()
    pieces, model_type, normalizer = [], 1, {}
    for field, value in _protobuf_fields(data, model_file):
        if field == 1:  # SentencePiece {1: piece, 2: score, 3: type (default NORMAL=1)}
            piece = dict(_protobuf_fields(value, model_file))
            pieces.append((piece[1].decode("utf-8"), piece.get(3, 1)))
        elif field == 2:  # TrainerSpec {3: model_type}
            model_type = dict(_protobuf_fields(value, model_file)).get(3, 1)
        elif field == 3:  # NormalizerSpec {3: add_dummy_prefix, 4: remove_extra_whitespaces}
            normalizer = {k: v for k, v in _protobuf_fields(value, model_file) if k in (3, 4)}
    return pieces, model_type, normalizer


def _protobuf_fields(data: bytes, source: Path):
    """Yield (field number, value) of one protobuf message: ints for varints, bytes otherwise."""
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            wire = key & 7
            if wire == 0:
                value, pos = _varint(data, pos)
            elif wire == 2:
                length, pos = _varint(data, pos)
                value, pos = data[pos : pos + length], pos + length
            elif wire in (1, 5):  # fixed64 / fixed32 (scores): not needed, skipped
                value, pos = None, pos + (8 if wire == 1 else 4)
            else:
                raise ValueError(f"wire type {wire}")
            yield key >> 3, value
    except (IndexError, ValueError) as error:
        raise ValueError(f"{source}: not a SentencePiece model ({error})") from error


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        result |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return result, pos


# -- GGUF metadata ------------------------------------------------------------------------------

_GGUF_WANTED = ("general.architecture", "tokenizer.")  # key prefixes read; others are skipped


def read_gguf_tokenizer_fields(path: Path) -> dict:
    """The architecture and ``tokenizer.*`` metadata of a GGUF file, without its tensors."""
    return read_gguf(path, keep=lambda key: key.startswith(_GGUF_WANTED)).fields


def fields_from_reader(reader) -> dict:
    """The same fields as `read_gguf_tokenizer_fields`, from an open `gguf.GGUFReader`."""
    fields = {}
    for key, field in reader.fields.items():
        if not key.startswith(_GGUF_WANTED):
            continue
        parts = [field.parts[i] for i in field.data]  # one numpy array per element
        if int(field.types[-1]) == 8:  # strings
            values = [bytes(part).decode("utf-8") for part in parts]
        else:
            values = [part.tolist()[0] for part in parts]
        fields[key] = values if int(field.types[0]) == 9 else values[0]  # 9 is array
    return fields

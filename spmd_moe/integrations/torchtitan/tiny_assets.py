"""A small local text corpus and a word-level tokenizer for torchtitan's Trainer, made
on the spot (no downloads): torchtitan 0.3.0's wheel ships neither its ``c4_test``
data nor its debug tokenizer.

    python -m spmd_moe.integrations.torchtitan.tiny_assets OUT_DIR [--docs N]

writes ``OUT_DIR/tokenizer/{tokenizer.json,tokenizer_config.json}`` (for
``--hf_assets_path``) and ``OUT_DIR/corpus/train.jsonl`` (for
``--dataloader.dataset_path``; torchtitan's ``c4_test`` loader reads a local folder of
``{"text": ...}`` lines). The text is seeded and grammatical enough to be learnable
(the loss falls from ln(vocab)); the same seed gives the same bytes on any machine.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

__all__ = ["make_tiny_assets", "VOCAB_SIZE"]

_SUBJECTS = [
    "the router", "an expert", "the gate", "every token", "the model", "a rank", "the mesh", "the layer",
    "the optimizer", "a batch", "the kernel", "the scheduler", "a shard", "the trainer", "the loss", "a worker",
]
_VERBS = [
    "sends", "takes", "reads", "writes", "sums", "splits", "routes", "scales", "sorts", "keeps", "drops",
    "gathers", "scatters", "counts", "checks", "loads", "saves", "moves", "joins", "trains",
]
_OBJECTS = [
    "the tokens", "its weights", "the gradient", "a slice", "the bias", "the scores", "every expert",
    "the rows", "its state", "the sum", "the logits", "a group", "the counts", "the buffer", "the graph",
]
_ENDS = ["on every step", "in bf16", "over the axis", "before the update", "after the exchange",
         "once", "twice", "for each layer", "in order", "at the end", "without a copy", "in place"]
_NUMBERS = [str(i) for i in range(100)]
_SPECIAL = ["<|unk|>", "<|bos|>", "<|eos|>", "<|pad|>"]
# debugmodel_moe's vocab is 2048; the tokenizer stays well inside it.
VOCAB_SIZE = 2048


def _words() -> list[str]:
    out: list[str] = []
    for group in (_SUBJECTS, _VERBS, _OBJECTS, _ENDS, _NUMBERS):
        for phrase in group:
            for w in phrase.split():
                if w not in out:
                    out.append(w)
    return out + [".", ","]


def _document(rng: random.Random) -> str:
    sents = []
    for _ in range(rng.randint(3, 12)):
        n = rng.choice(_NUMBERS)
        sents.append(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDS)} , {n} .")
    return " ".join(sents)


def make_tiny_assets(out_dir: str | Path, *, docs: int = 4000, seed: int = 0) -> tuple[Path, Path]:
    """Write the tokenizer and the corpus; returns (tokenizer dir, corpus dir)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    out = Path(out_dir)
    tok_dir, corpus_dir = out / "tokenizer", out / "corpus"
    tok_dir.mkdir(parents=True, exist_ok=True)
    corpus_dir.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(_SPECIAL + _words())}
    if len(vocab) > VOCAB_SIZE:
        raise ValueError(f"tiny_assets: expected at most {VOCAB_SIZE} words, got {len(vocab)}")
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(_SPECIAL)
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>", "unk_token": "<|unk|>",
         "add_bos_token": True, "add_eos_token": True, "tokenizer_class": "PreTrainedTokenizerFast"},
        indent=1,
    ))
    rng = random.Random(seed)
    with open(corpus_dir / "train.jsonl", "w") as f:
        for _ in range(docs):
            f.write(json.dumps({"text": _document(rng)}) + "\n")
    return tok_dir, corpus_dir


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--docs", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    tok_dir, corpus_dir = make_tiny_assets(a.out_dir, docs=a.docs, seed=a.seed)
    print(f"tokenizer: {tok_dir}\ncorpus: {corpus_dir}")


if __name__ == "__main__":
    main()

"""Train the bundled starter model: a GPT-2 with the real GPT-2 vocabulary, from scratch on chitchat-dataset.

One command on a GPU (runs on the CPU too, slowly):
    python scripts/train_starter.py --export-dir data/chitchat --out model/starter
It exports the corpus with the project's own exporter (skipped when --export-dir already holds a verified
export), trains with `chatbot train` using the starter settings below (any `chatbot train` flag given after
them overrides them), swaps in the bundled tokenizer files and writes MODEL_CARD.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing the package

from model.training.dataset import ExportError, verify_export  # noqa: E402

log = logging.getLogger(__name__)

# Chosen by measurement (BENCHMARKS.md "Training"): the widest model whose fp16 weights fit 40 MB, with
# dropout, weight decay and a cosine schedule so that many epochs over the 3 M-token corpus do not overfit.
STARTER_FLAGS = [
    "--from-scratch",
    "--n-layer", "8", "--n-embd", "256", "--n-head", "4",
    "--block-size", "256",
    "--dropout", "0.25", "--weight-decay", "0.1",
    "--learning-rate", "1e-3", "--lr-scheduler", "cosine", "--warmup", "0.02",
    "--epochs", "16", "--batch-size", "32", "--eval-batch-size", "128",
    "--seed", "1234",
    "--save-dtype", "float16", "--max-shard-size", "15MB",
    "--torch-compile",
    "--logging-steps", "200",
]  # fmt: skip
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "NOTICE")
REPLACED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "README.md")


def ensure_export(export_dir: Path) -> None:
    """Export chitchat-dataset into export_dir unless a verified export is already there."""
    from model.training.corpus import export_corpus

    try:
        verify_export(export_dir)
        log.info("using the existing export in %s", export_dir)
    except ExportError:
        export_corpus("chitchat", export_dir, progress=True)


def use_bundled_tokenizer(out_dir: Path) -> None:
    """Ship vocab.json + merges.txt (1.5 MB, with their licence NOTICE) instead of a 3.5 MB tokenizer.json."""
    from model.loading import bundled_tokenizer_dir

    for name in REPLACED_FILES:
        (out_dir / name).unlink(missing_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(bundled_tokenizer_dir() / name, out_dir / name)


def sample_replies(out_dir: Path, persona: str, bot_name: str) -> list[tuple[str, str]]:
    """Replies to the evaluation prompts with the serving defaults (seeded), for the card."""
    from dataclasses import replace

    from model.loading import load_model
    from model.training.evaluate import DEFAULT_PROMPTS, EVAL_SAMPLING, answer_prompts

    loaded = load_model(str(out_dir), device="auto", dtype="float32")
    serving = replace(EVAL_SAMPLING, repetition_penalty=1.15, no_repeat_ngram_size=3)
    replies = answer_prompts(loaded.model, loaded.tokenizer, DEFAULT_PROMPTS, persona, bot_name, serving)
    return [(r.prompt, r.reply) for r in replies]


def _cell(text: str) -> str:
    return text.replace("|", "\\|") or "(empty)"


def model_card(card: dict[str, Any], command: str, replies: list[tuple[str, str]]) -> str:
    """MODEL_CARD.md: data and licence, architecture, command, hardware and time, perplexity, samples."""
    arch, data, metrics = card["architecture"], card["data"], card["metrics"]
    shards = sorted(Path(card["settings"]["out"]).glob("*.safetensors"))
    sizes = sum(p.stat().st_size for p in shards)
    sample_rows = [f"| {_cell(prompt)} | {_cell(reply)} |" for prompt, reply in replies]
    return "\n".join([
        "# Starter model",
        "",
        "A small GPT-2 trained from scratch by this project so that the bot works with no model hub at all.",
        "",
        "## Data and licence",
        f"- chitchat-dataset 0.9.0 (MIT licence): {data['counts']['train']} training and "
        f"{data['counts']['val']} validation conversations (10 % by hash of the conversation id), "
        "rendered in the project's dialogue format (persona line, `User:` / `Bot:` lines, end-of-text).",
        f"- Export manifest sha256 `{data['manifest_sha256']}`.",
        "- Tokenizer: OpenAI's GPT-2 BPE (MIT), see NOTICE. The weights are under the project's MIT licence.",
        "",
        "## Architecture",
        f"- GPT-2: {arch['n_layer']} layers × {arch['n_embd']} wide, {arch['n_head']} heads, context "
        f"{arch['n_positions']} tokens, vocabulary {arch['vocab_size']}, {arch['parameters']:,} parameters "
        f"(tied embeddings stored once), fp16 safetensors, {sizes / 1e6:.1f} MB.",
        "",
        "## Training",
        f"- Command: `{command}`",
        f"- Hardware: {card['hardware']['device']}, {card['hardware']['precision']}, "
        f"torch.compile {card['hardware']['torch_compile']}; training {card['time']['train_seconds']} s "
        f"({metrics.get('train_tokens', 0):,} tokens, "
        f"{metrics.get('train_tokens_per_second', 0):,.0f} tokens/s).",
        f"- Software: torch {card['software']['torch']}, transformers {card['software']['transformers']}.",
        f"- Settings: `{json.dumps(card['settings'])}`",
        "",
        "## Held-out perplexity",
        f"- **{metrics.get('val_perplexity_after', float('nan')):.2f}** on the validation conversations "
        f"({metrics.get('val_tokens', 0):,} scored tokens in {data['block_size']}-token packed blocks; "
        "end-of-text is not scored, as in training; fp16 weights evaluated in fp32).",
        "- Per epoch (the Trainer's eval_loss; it divides by one extra token per block, so it reads low): "
        f"{metrics.get('trainer_epoch_val_perplexities')}",
        "- Reproduce (no GPU needed): `chatbot export --corpus chitchat --out data/chitchat` then "
        "`chatbot eval --model starter --data data/chitchat`.",
        "",
        "## Files",
        *[f"- `{p.name}`: {p.stat().st_size / 1e6:.1f} MB" for p in shards],
        "- A safetensors tensor cannot span files, so the 50257-row token embedding (tied with the output "
        "layer) is one shard by itself whatever the shard size.",
        "",
        "## Limits",
        "- Trained on English small talk only: it answers other languages in English and off topic.",
        "",
        "## Sample replies (serving defaults, seed 0)",
        "",
        "| prompt | reply |",
        "|---|---|",
        *sample_rows,
        "",
    ])  # fmt: skip


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--export-dir", type=Path, default=REPO_ROOT / "data" / "chitchat")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "model" / "starter")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Export (if needed), train, ship the tokenizer files, write the model card."""
    from transformers import HfArgumentParser

    from model.training.train import TrainArguments, TrainError, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raw = sys.argv[1:] if argv is None else argv
    options, overrides = parse_args(raw)
    ensure_export(options.export_dir)
    train_argv = ["--data", str(options.export_dir), "--out", str(options.out), *STARTER_FLAGS, *overrides]
    try:
        (args,) = HfArgumentParser(TrainArguments).parse_args_into_dataclasses(args=train_argv)
        out_dir = train(args)
    except TrainError as exc:
        print(f"train_starter: error: {exc}", file=sys.stderr)
        return 2
    card = json.loads((out_dir / "training_card.json").read_text(encoding="utf-8"))
    use_bundled_tokenizer(out_dir)
    replies = sample_replies(out_dir, args.persona, args.bot_name)
    command = "python scripts/train_starter.py " + " ".join(raw)
    (out_dir / "MODEL_CARD.md").write_text(model_card(card, command.strip(), replies), encoding="utf-8")
    print(out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

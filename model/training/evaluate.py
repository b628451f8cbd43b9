"""`chatbot eval`: held-out perplexity, distinct-1/2, reply length, repetition and replies to fixed prompts.

Perplexity is token-weighted over val.jsonl rendered exactly as in training (render_dialogue + end-of-text,
packed blocks, eos masked by the same collator), so it reproduces the training card's figure; with
`--engine ct2` the same blocks are scored by the CTranslate2 CPU engine in `--cpu-compute` (int8 or float32),
to check what int8 costs. Replies come from Hugging Face `generate` directly, one prompt at a time, seeded.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from model.prompt import Turn, render_dialogue
from model.sampling import SamplingParams
from model.training.dataset import (
    DEFAULT_PERSONA,
    ExportError,
    pack_blocks,
    read_conversations,
    verify_export,
)

log = logging.getLogger(__name__)

# A small fixed set: everyday English openers plus two Japanese ones (the bot serves Japanese guilds too).
DEFAULT_PROMPTS: tuple[str, ...] = (
    "hi! how are you?",
    "what music do you like?",
    "what did you do today?",
    "do you have any pets?",
    "what's your favourite food?",
    "any plans for the weekend?",
    "こんにちは、元気ですか？",
    "好きな食べ物は何ですか？",
)
MAX_DEFAULT_BLOCK_TOKENS = 1024
REPETITION_NGRAM = 3


@dataclass(frozen=True)
class PromptReply:
    """One fixed prompt, the model's reply and how long generating it took."""

    prompt: str
    reply: str
    reply_tokens: int
    seconds: float


@dataclass(frozen=True)
class EvalReport:
    """The metrics of one model on one export."""

    model: str
    perplexity: float
    val_tokens: int
    block_size: int
    distinct_1: float
    distinct_2: float
    mean_reply_tokens: float
    repetition_rate: float
    mean_reply_seconds: float
    replies: tuple[PromptReply, ...]
    device: str
    engine: str = "hf"  # what scored the perplexity: "hf" or "ct2 int8" / "ct2 float32"

    def to_json(self) -> dict[str, Any]:
        """A plain dict for json.dump."""
        return asdict(self)


# How the fixed prompts are answered: serving's sampling without the repetition guards, so the metrics
# measure the model itself; seeded per prompt.
EVAL_SAMPLING = SamplingParams(max_new_tokens=40, repetition_penalty=1.0, no_repeat_ngram_size=0, seed=0)


def perplexity(
    model: Any, tokenizer: Any, blocks: Sequence[Sequence[int]], batch_size: int = 8, device: str = "cpu"
) -> tuple[float, int]:
    """Token-weighted perplexity over packed blocks; returns (perplexity, number of scored tokens)."""
    import torch
    from transformers import DataCollatorForLanguageModeling

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # as in training: the collator pads and masks with eos
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(blocks), batch_size):
            batch = collator([list(b) for b in blocks[start : start + batch_size]])
            nll, tokens = _batch_nll(model, batch["input_ids"].to(device), batch["labels"].to(device))
            total_nll, total_tokens = total_nll + nll, total_tokens + tokens
    model.train(was_training)
    if total_tokens == 0:
        raise ValueError("no tokens to score: the validation split is empty")
    return math.exp(total_nll / total_tokens), total_tokens


def _batch_nll(model: Any, input_ids: Any, labels: Any) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of one batch and the number of scored tokens."""
    import torch
    import torch.nn.functional as F

    # Padding only ever follows a block's real tokens, so causal attention never lets it change their
    # logits: an all-ones mask is exact (and tells transformers the eos ids inside are not padding).
    logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits  # (B, T, V)
    # Position t predicts token t+1; labels of -100 (padding and eos) are not scored.
    shifted_logits = logits[:, :-1, :].float().reshape(-1, logits.size(-1))
    shifted_labels = labels[:, 1:].reshape(-1)
    nll = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=-100, reduction="sum")
    return float(nll.item()), int((shifted_labels != -100).sum().item())


def distinct_n(replies: Sequence[Sequence[int]], n: int) -> float:
    """Unique n-grams / all n-grams, pooled over replies (token level, so it works for any language)."""
    grams = [tuple(r[i : i + n]) for r in replies for i in range(len(r) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(replies: Sequence[Sequence[int]], n: int = REPETITION_NGRAM) -> float:
    """Share of n-grams that repeat an earlier n-gram of the same reply (pooled); loops score near 1."""
    repeated = total = 0
    for reply in replies:
        seen: set[tuple[int, ...]] = set()
        for i in range(len(reply) - n + 1):
            gram = tuple(reply[i : i + n])
            repeated += gram in seen
            seen.add(gram)
            total += 1
    return repeated / total if total else 0.0


def generate_reply(
    model: Any, tokenizer: Any, prompt_text: str, params: SamplingParams, stop_ids: frozenset[int]
) -> tuple[str, int]:
    """One reply via HF generate, cut at the end of the bot's line; returns (text, new token count)."""
    import torch

    from model.hf_engine import generation_config
    from model.loading import context_window, set_seed

    set_seed(params.seed or 0)  # per prompt, so a reply does not depend on the prompts before it
    # Prompt + reply must fit the context window: an index past it is an error (a device assert on a GPU).
    params = replace(params, max_new_tokens=min(params.max_new_tokens, context_window(model.config) // 2))
    keep_tokens = context_window(model.config) - params.max_new_tokens
    prompt_ids = tokenizer(prompt_text, return_tensors="pt")["input_ids"][:, -keep_tokens:].to(model.device)
    with torch.inference_mode():
        output = model.generate(
            input_ids=prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            generation_config=generation_config(params, stop_ids, tokenizer.eos_token_id),
        )
    new_ids = output[0, prompt_ids.shape[1] :].tolist()
    text = tokenizer.decode(new_ids, skip_special_tokens=True).split("\n", 1)[0].strip()
    return text, len(new_ids)


def answer_prompts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    persona: str,
    bot_name: str,
    settings: SamplingParams,
) -> tuple[PromptReply, ...]:
    """The model's reply to each prompt, each rendered as a one-turn conversation with an open bot turn."""
    from model.replies import stop_token_ids

    stop_ids = stop_token_ids(tokenizer)
    replies = []
    for prompt in prompts:
        prompt_text = render_dialogue(persona, (Turn("User", prompt),), bot_name, open_bot_turn=True)
        started = time.perf_counter()
        text, count = generate_reply(model, tokenizer, prompt_text, settings, stop_ids)
        replies.append(PromptReply(prompt, text, count, round(time.perf_counter() - started, 3)))
    return tuple(replies)


def training_card(model_dir: Path) -> dict[str, Any]:
    """The training card beside a model's weights, or {} when there is none."""
    path = model_dir / "training_card.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def evaluate(
    model_name: str,
    data_dir: Path,
    *,
    persona: str | None = None,
    bot_name: str | None = None,
    block_size: int = 0,
    batch_size: int = 8,
    device: str = "auto",
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    settings: SamplingParams = EVAL_SAMPLING,
    engine: str = "hf",
    cpu_compute: str = "int8",
) -> EvalReport:
    """Evaluate a model on an export's val.jsonl; persona, bot name and block size default to its card's."""
    from model.loading import load_model

    verify_export(data_dir)
    loaded = load_model(model_name, device=device, dtype="float32")
    card = training_card(Path(str(loaded.source)))
    trained = card.get("settings", {})
    persona = persona or trained.get("persona") or DEFAULT_PERSONA
    bot_name = bot_name or trained.get("bot_name") or "Bot"
    block_size = (
        block_size
        or card.get("data", {}).get("block_size")
        or min(loaded.n_positions, MAX_DEFAULT_BLOCK_TOKENS)
    )
    conversations = read_conversations(data_dir / "val.jsonl")
    blocks = pack_blocks(loaded.tokenizer, conversations, persona, bot_name, block_size, keep_remainder=True)
    if engine == "ct2":
        ppl, tokens = _ct2_perplexity(loaded, blocks, batch_size, cpu_compute)
    else:
        ppl, tokens = perplexity(loaded.model, loaded.tokenizer, blocks, batch_size, str(loaded.device))
    replies = answer_prompts(loaded.model, loaded.tokenizer, prompts, persona, bot_name, settings)
    report = _report(model_name, ppl, tokens, block_size, replies, loaded.tokenizer, str(loaded.device))
    return replace(report, engine="hf" if engine != "ct2" else f"ct2 {cpu_compute}")


def _ct2_perplexity(loaded: Any, blocks: Sequence[Sequence[int]], batch_size: int, compute: str) -> Any:
    from model.ct2.scoring import ct2_perplexity
    from model.serving.engines import EngineOptions, ct2_installed

    if not ct2_installed():
        raise ValueError("--engine ct2 needs the ctranslate2 package: pip install -e '.[cpu]'")
    model = loaded.model.to("cpu")  # CTranslate2 converts from the CPU copy
    cache_dir = EngineOptions().conversions_dir()
    return ct2_perplexity(model, loaded.tokenizer, blocks, cache_dir, compute, batch_size)


def _report(
    model_name: str,
    ppl: float,
    tokens: int,
    block_size: int,
    replies: tuple[PromptReply, ...],
    tokenizer: Any,
    device: str,
) -> EvalReport:
    ids = [tokenizer(r.reply)["input_ids"] for r in replies]
    return EvalReport(
        model=model_name,
        perplexity=round(ppl, 3),
        val_tokens=tokens,
        block_size=block_size,
        distinct_1=round(distinct_n(ids, 1), 4),
        distinct_2=round(distinct_n(ids, 2), 4),
        mean_reply_tokens=round(sum(len(i) for i in ids) / max(len(ids), 1), 2),
        repetition_rate=round(repetition_rate(ids), 4),
        mean_reply_seconds=round(sum(r.seconds for r in replies) / max(len(replies), 1), 3),
        replies=replies,
        device=device,
    )


METRIC_ROWS = (
    ("perplexity", "held-out perplexity"),
    ("engine", "perplexity scored by"),
    ("val_tokens", "scored tokens"),
    ("block_size", "block size"),
    ("distinct_1", "distinct-1"),
    ("distinct_2", "distinct-2"),
    ("mean_reply_tokens", "mean reply length (tokens)"),
    ("repetition_rate", "repetition rate (3-grams)"),
    ("mean_reply_seconds", "mean seconds per reply"),
)


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ") or "(empty)"


def markdown_report(reports: Sequence[EvalReport]) -> str:
    """Metrics and replies of one or more models side by side, as Markdown tables."""
    header = "| metric | " + " | ".join(_cell(r.model) for r in reports) + " |"
    rule = "|---" * (len(reports) + 1) + "|"
    rows = [
        f"| {label} | " + " | ".join(_cell(getattr(r, key)) for r in reports) + " |"
        for key, label in METRIC_ROWS
    ]
    reply_header = "| prompt | " + " | ".join(_cell(r.model) for r in reports) + " |"
    reply_rows = [
        f"| {_cell(reply.prompt)} | " + " | ".join(_cell(r.replies[i].reply) for r in reports) + " |"
        for i, reply in enumerate(reports[0].replies)
    ]
    return "\n".join([header, rule, *rows, "", reply_header, rule, *reply_rows, ""])


@dataclass
class EvalArguments:
    """Every setting of `chatbot eval`."""

    model: str = field(default="", metadata={"help": "Model to evaluate: anything load_model accepts."})
    data: str = field(default="", metadata={"help": "Export directory whose val.jsonl is held out."})
    against: str = field(default="", metadata={"help": "A second model, shown side by side."})
    json_path: str = field(
        default="", metadata={"aliases": ["--json"], "help": "Also write the report(s) as JSON to this path."}
    )
    persona: str = field(default="", metadata={"help": "Persona line (default: the training card's)."})
    bot_name: str = field(default="", metadata={"help": "Bot speaker name (default: the training card's)."})
    block_size: int = field(default=0, metadata={"help": "Tokens per block (default: the training card's)."})
    batch_size: int = field(default=8, metadata={"help": "Blocks per forward pass."})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "Where to run."})
    engine: Literal["hf", "ct2"] = field(
        default="hf",
        metadata={"help": "What scores the perplexity: hf (torch) or ct2 (CTranslate2, on the CPU)."},
    )
    cpu_compute: Literal["int8", "float32"] = field(
        default="int8",
        metadata={"help": "CTranslate2's compute type with --engine ct2 (as BOT_CPU_COMPUTE)."},
    )
    max_new_tokens: int = field(default=40, metadata={"help": "Longest reply to each fixed prompt."})
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature; 0 = greedy."})
    seed: int = field(default=0, metadata={"help": "Seed for the replies."})

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("--model is required")
        if not self.data:
            raise ValueError("--data is required: an export directory")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")


def run_eval(args: EvalArguments) -> list[EvalReport]:
    """Evaluate --model (and --against) as the flags say."""
    settings = replace(
        EVAL_SAMPLING, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed
    )
    names = [args.model, *([args.against] if args.against else [])]
    return [
        evaluate(
            name,
            Path(args.data),
            persona=args.persona or None,
            bot_name=args.bot_name or None,
            block_size=args.block_size,
            batch_size=args.batch_size,
            device=args.device,
            settings=settings,
            engine=args.engine,
            cpu_compute=args.cpu_compute,
        )
        for name in names
    ]


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parse flags, evaluate, print Markdown (and write JSON); exit code 2 on invalid input."""
    from transformers import HfArgumentParser

    from model.loading import ModelLoadError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # HfArgumentParser is typed as taking a NewType upstream
        parser = HfArgumentParser(EvalArguments, prog=prog)  # type: ignore[arg-type]
        (args,) = parser.parse_args_into_dataclasses(args=argv)
        reports = run_eval(args)
    except (ValueError, ExportError, OSError, ModelLoadError) as exc:
        print(f"chatbot eval: error: {exc}", file=sys.stderr)
        return 2
    print(markdown_report(reports))
    if args.json_path:
        payload = {"models": [r.to_json() for r in reports]}
        Path(args.json_path).write_text(
            json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

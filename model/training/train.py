"""`chatbot train`: fine-tune (or train from scratch) a causal LM on an export, with the HF Trainer.

Long because: `chatbot train` keeps its flags (dataclass with help), the Trainer set-up and the card together.

Conversations are rendered in the serving format (model.prompt.render_dialogue) + end-of-text, packed into
blocks and fed through DataCollatorForLanguageModeling(mlm=False). One process or several GPUs:
    python -m model.training.train --data DIR --base MODEL --out DIR
    accelerate launch --multi_gpu --num_processes 2 -m model.training.train --data DIR --base MODEL --out DIR
The output directory loads with plain `from_pretrained` and holds a training card (JSON + README.md).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from model.training.checkpoints import newest_complete_checkpoint
from model.training.dataset import (
    DEFAULT_PERSONA,
    ExportError,
    Manifest,
    manifest_sha256,
    pack_blocks,
    read_conversations,
    verify_export,
)

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
CARD_JSON = "training_card.json"
CARD_README = "README.md"
MAX_DEFAULT_BLOCK_TOKENS = 1024
ARCHITECTURE_KEYS = ("model_type", "n_layer", "n_embd", "n_head", "n_positions", "vocab_size")


class TrainError(ValueError):
    """Invalid training input; the message names the offending flag."""


def _arg(default: Any, help_text: str) -> Any:
    """A dataclass field with argparse help (HfArgumentParser reads `metadata`)."""
    return field(default=default, metadata={"help": help_text})


@dataclass
class TrainArguments:
    """Every setting of `chatbot train` (run_clm.py style: a dataclass with help text)."""

    data: str = _arg("", "Export directory (train.jsonl, val.jsonl, manifest.json) from `chatbot export`.")
    out: str = _arg("", "Output model directory (loads with from_pretrained).")
    base: str = _arg("", "Model to fine-tune: anything load_model accepts (hub id, directory, 'starter').")
    from_scratch: bool = _arg(False, "Train a new GPT-2 (real GPT-2 vocabulary, bundled tokenizer).")
    n_layer: int = _arg(4, "--from-scratch: transformer layers.")
    n_embd: int = _arg(256, "--from-scratch: model width.")
    n_head: int = _arg(4, "--from-scratch: attention heads (must divide --n-embd).")
    n_positions: int = _arg(0, "--from-scratch: context; 0 = the block size (longer never trains).")
    dropout: float | None = _arg(None, "Residual/embedding/attention dropout (default: config's; 0.1 new).")
    persona: str = _arg(DEFAULT_PERSONA, "Persona line that starts each conversation (as in serving).")
    bot_name: str = _arg("Bot", "The bot's speaker name in rendered conversations (as in serving).")
    block_size: int = _arg(0, "Tokens per packed block; 0 = min(model context, 1024).")
    epochs: float = _arg(3.0, "Passes over train.jsonl.")
    max_steps: int = _arg(-1, "Stop after this many optimizer steps (overrides --epochs when > 0).")
    batch_size: int = _arg(8, "Blocks per device per step.")
    eval_batch_size: int = _arg(0, "Blocks per device per evaluation step; 0 = --batch-size.")
    grad_accum: int = _arg(1, "Gradient accumulation steps.")
    learning_rate: float = _arg(5e-5, "Peak learning rate (AdamW).")
    weight_decay: float = _arg(0.0, "AdamW weight decay.")
    warmup: float = _arg(0.0, "Warm-up: steps (>= 1) or a fraction of all steps (< 1).")
    lr_scheduler: str = _arg("linear", "Learning-rate schedule: linear, cosine, constant, ...")
    max_grad_norm: float = _arg(1.0, "Gradient clipping norm.")
    seed: int = _arg(42, "Seed for initialisation, data order and dropout.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = _arg(
        "auto", "auto = bf16/fp16 on a GPU, fp32 on CPU."
    )
    tf32: bool = _arg(True, "Allow TF32 matrix maths on the GPU.")
    fused_adamw: bool = _arg(True, "Fused AdamW (adamw_torch_fused) on the GPU.")
    torch_compile: bool = _arg(False, "torch.compile the model (GPU speed-up after a compile warm-up).")
    resume: bool = _arg(
        False,
        "Resume from the newest complete checkpoint under OUT/checkpoints (incomplete ones are removed).",
    )
    keep_checkpoints: bool = _arg(False, "Keep OUT/checkpoints after success (only needed to resume).")
    save_total_limit: int = _arg(2, "Checkpoints kept while training.")
    save_steps: int = _arg(0, "Checkpoint every N steps; 0 = every epoch.")
    best_checkpoint: bool = _arg(False, "At the end, load the checkpoint with the lowest validation loss.")
    eval_each_epoch: bool = _arg(True, "Evaluate on val.jsonl at the end of every epoch.")
    eval_before: bool = _arg(True, "Also measure validation perplexity before training.")
    logging_steps: int = _arg(50, "Log the training loss every N steps.")
    save_dtype: Literal["float32", "float16", "bfloat16"] = _arg("float32", "Dtype of the saved weights.")
    max_shard_size: str = _arg("2GB", "Largest safetensors shard, e.g. 15MB.")
    device: Literal["auto", "cpu", "cuda"] = _arg("auto", "auto = the GPU when there is one.")
    timing_warmup_steps: int = _arg(10, "Steps left out of the steady tokens/s figure (compile, warm-up).")
    progress: bool = _arg(True, "Show a progress bar.")

    def __post_init__(self) -> None:
        for flag, problem in _argument_problems(self):
            raise TrainError(f"--{flag} {problem}")


def _argument_problems(a: TrainArguments) -> list[tuple[str, str]]:
    """(flag, problem) for each invalid setting, in declaration order."""
    checks = [
        ("data", not a.data, "is required: an export directory"),
        ("out", not a.out, "is required: the output model directory"),
        ("base", not a.base and not a.from_scratch, "is required (or pass --from-scratch)"),
        ("base", bool(a.base) and a.from_scratch, "cannot be combined with --from-scratch"),
        ("n-layer", a.n_layer < 1, f"must be >= 1, got {a.n_layer}"),
        ("n-head", a.n_head < 1 or a.n_embd % max(a.n_head, 1) != 0, f"must divide --n-embd, got {a.n_head}"),
        ("n-positions", a.n_positions < 0, f"must be >= 0, got {a.n_positions}"),
        ("dropout", a.dropout is not None and not 0.0 <= a.dropout < 1.0, f"must be 0–0.99, got {a.dropout}"),
        ("block-size", a.block_size < 0 or a.block_size == 1, f"must be 0 or >= 2, got {a.block_size}"),
        ("epochs", a.epochs <= 0 and a.max_steps <= 0, f"must be > 0 (or set --max-steps), got {a.epochs}"),
        ("batch-size", a.batch_size < 1, f"must be >= 1, got {a.batch_size}"),
        ("grad-accum", a.grad_accum < 1, f"must be >= 1, got {a.grad_accum}"),
        ("learning-rate", not a.learning_rate > 0, f"must be > 0, got {a.learning_rate}"),
        ("warmup", a.warmup < 0, f"must be >= 0, got {a.warmup}"),
        ("bot-name", not a.bot_name.strip() or ":" in a.bot_name, f"must have no ':', got {a.bot_name!r}"),
    ]  # fmt: skip
    return [(flag, problem) for flag, is_bad, problem in checks if is_bad]


@dataclass(frozen=True)
class DataBundle:
    """The packed training and validation blocks of one export."""

    train_blocks: list[list[int]]
    val_blocks: list[list[int]]
    manifest: Manifest
    manifest_sha256: str
    block_size: int


@dataclass(frozen=True)
class TrainingResult:
    """What the Trainer run produced, for the card."""

    metrics: dict[str, Any]
    train_seconds: float
    parameters: int
    world_size: int
    is_main_process: bool


def build_from_scratch(args: TrainArguments) -> tuple[Any, Any]:
    """A fresh GPT-2 with the real GPT-2 vocabulary and the bundled tokenizer (the starter model)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from model.loading import bundled_tokenizer_dir, load_tokenizer

    tokenizer = load_tokenizer(str(bundled_tokenizer_dir()))
    dropout = 0.1 if args.dropout is None else args.dropout
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer),
        # Positions past the training blocks would never be trained, so the context stops there.
        n_positions=args.n_positions or args.block_size or MAX_DEFAULT_BLOCK_TOKENS,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return GPT2LMHeadModel(config), tokenizer


def load_base(args: TrainArguments) -> tuple[Any, Any]:
    """The model to fine-tune (fp32 master weights; the Trainer adds autocast) and its tokenizer."""
    import torch

    from model.loading import ModelLoadError, load_model

    try:
        loaded = load_model(args.base, device="cpu", dtype="float32")
    except ModelLoadError as exc:
        raise TrainError(f"--base {args.base!r}: {exc}") from exc
    if args.dropout is not None:
        # Dropout modules read p when built, so a config change alone would not reach a loaded model.
        for module in loaded.model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = args.dropout
    return loaded.model, loaded.tokenizer


def build_model(args: TrainArguments) -> tuple[Any, Any]:
    """The model and tokenizer to train, with pad = eos (GPT-2 has no pad token)."""
    model, tokenizer = build_from_scratch(args) if args.from_scratch else load_base(args)
    # eos doubles as pad, so the collator masks every eos from the loss. That costs nothing here: a reply
    # ends at the newline that closes the bot's line, which the model does learn.
    tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    return model, tokenizer


def load_data(args: TrainArguments, tokenizer: Any, n_positions: int) -> DataBundle:
    """Verify the export, then pack train.jsonl (full blocks) and val.jsonl (every token) into blocks."""
    data_dir = Path(args.data)
    try:
        manifest = verify_export(data_dir)
    except ExportError as exc:
        raise TrainError(f"--data {args.data}: {exc}") from exc
    block_size = args.block_size or min(n_positions, MAX_DEFAULT_BLOCK_TOKENS)
    if block_size > n_positions:
        raise TrainError(f"--block-size {block_size} exceeds the model's context of {n_positions} tokens")

    def pack(split: str, keep_remainder: bool) -> list[list[int]]:
        conversations = read_conversations(data_dir / f"{split}.jsonl")
        persona, bot_name = args.persona, args.bot_name
        return pack_blocks(
            tokenizer, conversations, persona, bot_name, block_size, keep_remainder=keep_remainder
        )

    train_blocks, val_blocks = pack("train", False), pack("val", True)
    if not train_blocks:
        raise TrainError(f"--data {args.data}: train.jsonl holds less than one block of {block_size} tokens")
    log.info("data: %d train, %d val blocks of %d tokens", len(train_blocks), len(val_blocks), block_size)
    return DataBundle(train_blocks, val_blocks, manifest, manifest_sha256(data_dir), block_size)


def _precision(args: TrainArguments, on_cuda: bool) -> str:
    """The mixed precision used: bf16 where the GPU has it, fp16 on older GPUs, fp32 on the CPU."""
    import torch

    if args.precision != "auto":
        return args.precision
    if not on_cuda:
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _training_arguments(args: TrainArguments, on_cuda: bool, has_val: bool) -> Any:
    """The HF TrainingArguments for our settings (speed options only where they apply)."""
    from transformers import TrainingArguments

    save_strategy = "steps" if args.save_steps else "epoch"
    # load_best_model_at_end needs evaluation on the same schedule as checkpoints.
    eval_strategy = save_strategy if args.best_checkpoint else "epoch" if args.eval_each_epoch else "no"
    precision = _precision(args, on_cuda)
    return TrainingArguments(
        output_dir=str(Path(args.out) / CHECKPOINTS_DIR),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size or args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup,
        lr_scheduler_type=args.lr_scheduler,
        max_grad_norm=args.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        tf32=True if on_cuda and args.tf32 else None,
        optim="adamw_torch_fused" if on_cuda and args.fused_adamw else "adamw_torch",
        torch_compile=args.torch_compile,
        eval_strategy=eval_strategy if has_val else "no",
        eval_steps=args.save_steps or None,
        save_strategy=save_strategy,
        save_steps=args.save_steps or 500,
        save_total_limit=args.save_total_limit,
        load_best_model_at_end=args.best_checkpoint and has_val,
        metric_for_best_model="eval_loss",
        logging_steps=args.logging_steps,
        # The default NaN filter reads the loss back every step: a GPU sync that costs throughput.
        logging_nan_inf_filter=False,
        seed=args.seed,
        data_seed=args.seed,
        use_cpu=not on_cuda,
        report_to="none",
        disable_tqdm=not args.progress,
        dataloader_pin_memory=on_cuda,
        # Pinned memory + non-blocking copies: the host never waits for the GPU to upload a batch.
        accelerator_config={"non_blocking": on_cuda},
    )


def _throughput_callback(warmup_steps: int, tokens_per_step: int, on_cuda: bool) -> Any:
    """A callback timing the steps after `warmup_steps` (compilation and allocator warm-up left out)."""
    import torch
    from transformers import TrainerCallback

    class ThroughputCallback(TrainerCallback):
        def __init__(self) -> None:
            self.window: list[tuple[int, float]] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if state.global_step in (warmup_steps, state.max_steps):
                if on_cuda:
                    torch.cuda.synchronize()  # twice per run only: at the window's start and end
                self.window.append((state.global_step, time.perf_counter()))
            return control

        def tokens_per_second(self) -> float | None:
            if len(self.window) < 2:
                return None
            (first_step, start), (last_step, end) = self.window[0], self.window[-1]
            return round((last_step - first_step) * tokens_per_step / (end - start), 1)

    return ThroughputCallback()


def _measure(model: Any, tokenizer: Any, data: DataBundle, batch_size: int, device: Any) -> tuple[float, int]:
    """Token-weighted validation perplexity (evaluate.perplexity) and the number of scored tokens."""
    from model.training.evaluate import perplexity

    return perplexity(model.to(device), tokenizer, data.val_blocks, batch_size=batch_size, device=str(device))


def save_model(model: Any, tokenizer: Any, args: TrainArguments) -> None:
    """safetensors in save_dtype (tied embeddings stored once), shards of max_shard_size, the tokenizer."""
    import torch

    model.to(dtype=getattr(torch, args.save_dtype)).save_pretrained(
        args.out, max_shard_size=args.max_shard_size
    )
    tokenizer.save_pretrained(args.out)


def _saved_perplexity(
    args: TrainArguments, tokenizer: Any, data: DataBundle, device: Any
) -> tuple[float, int]:
    """Perplexity of the model as saved, reloaded in fp32: what `chatbot eval` reproduces."""
    import torch
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    return _measure(saved, tokenizer, data, args.eval_batch_size or args.batch_size, device)


def _epoch_perplexities(log_history: list[dict[str, Any]]) -> list[float]:
    """Per-epoch perplexity from the Trainer's eval_loss, for the learning curve only: its token count
    counts the first position of each block, so it reads lower than `perplexity` (~1.5 % for the starter)."""
    return [round(math.exp(entry["eval_loss"]), 3) for entry in log_history if "eval_loss" in entry]


def run_training(
    args: TrainArguments,
    model: Any,
    tokenizer: Any,
    data: DataBundle,
    on_cuda: bool,
    callbacks: Sequence[Any] = (),
    resume_from: Path | None = None,
) -> TrainingResult:
    """Run the HF Trainer; the main process saves the model and measures it. Returns the card's numbers."""
    from transformers import DataCollatorForLanguageModeling, Trainer

    training_args = _training_arguments(args, on_cuda, bool(data.val_blocks))
    is_main = training_args.process_index == 0
    eval_batch = args.eval_batch_size or args.batch_size
    metrics: dict[str, Any] = {}
    if args.eval_before and data.val_blocks and is_main:
        before, _ = _measure(model, tokenizer, data, eval_batch, training_args.device)
        metrics["val_perplexity_before"] = before
    tokens_per_step = args.batch_size * args.grad_accum * data.block_size * training_args.world_size
    throughput = _throughput_callback(args.timing_warmup_steps, tokens_per_step, on_cuda)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data.train_blocks,  # a list of token-id lists is a map-style dataset
        eval_dataset=data.val_blocks or None,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
        callbacks=[throughput, *callbacks],
    )
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if not trainer.is_world_process_zero():
        return TrainingResult(metrics, 0.0, 0, training_args.world_size, is_main_process=False)
    final = trainer.accelerator.unwrap_model(trainer.model)
    save_model(final, tokenizer, args)
    metrics.update(
        train_loss=round(output.training_loss, 4),
        train_steps=output.global_step,
        train_tokens=output.global_step * tokens_per_step,
        train_tokens_per_second=round(output.metrics.get("train_samples_per_second", 0.0) * data.block_size),
        steady_tokens_per_second=throughput.tokens_per_second(),
        trainer_epoch_val_perplexities=_epoch_perplexities(trainer.state.log_history),
    )
    if data.val_blocks:
        ppl, tokens = _saved_perplexity(args, tokenizer, data, training_args.device)
        metrics.update(val_perplexity_after=ppl, val_tokens=tokens)
    parameters = sum(p.numel() for p in final.parameters())  # tied weights count once
    seconds = float(output.metrics.get("train_runtime", 0.0))
    return TrainingResult(metrics, seconds, parameters, training_args.world_size, is_main_process=True)


def train(args: TrainArguments, callbacks: Sequence[Any] = ()) -> Path:
    """Train on an export; save a from_pretrained-loadable model and its training card; return its path.

    `callbacks` are extra transformers TrainerCallbacks (e.g. the bot's progress reports)."""
    import torch

    from model.loading import set_seed

    started = time.time()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA device is available")
    on_cuda = args.device != "cpu" and torch.cuda.is_available()
    checkpoints = Path(args.out) / CHECKPOINTS_DIR
    resume_from = newest_complete_checkpoint(checkpoints) if args.resume else None
    if args.resume and resume_from is None:
        raise TrainError(f"--resume: no complete checkpoint under {checkpoints}")
    set_seed(args.seed)
    model, tokenizer = build_model(args)
    data = load_data(args, tokenizer, model.config.n_positions)
    result = run_training(args, model, tokenizer, data, on_cuda, callbacks, resume_from)
    if result.is_main_process:
        if not args.keep_checkpoints:
            shutil.rmtree(checkpoints, ignore_errors=True)
        write_card(Path(args.out), build_card(args, model.config.to_dict(), data, result, started, on_cuda))
        log.info("saved %s (val perplexity %s)", args.out, result.metrics.get("val_perplexity_after"))
    return Path(args.out)


def build_card(
    args: TrainArguments,
    config: dict[str, Any],
    data: DataBundle,
    result: TrainingResult,
    started: float,
    on_cuda: bool,
) -> dict[str, Any]:
    """Everything needed to reproduce and judge a run: base, data hash, settings, metrics, time, hardware."""
    import torch
    import transformers

    from model.loading import describe_device

    architecture = {key: config.get(key) for key in ARCHITECTURE_KEYS}
    return {
        "base": "from-scratch GPT-2" if args.from_scratch else args.base,
        "architecture": {**architecture, "parameters": result.parameters},
        "data": {
            "dir": str(Path(args.data).resolve()),
            "manifest_sha256": data.manifest_sha256,
            "source": data.manifest.source,
            "counts": dict(data.manifest.counts),
            "block_size": data.block_size,
            "train_blocks": len(data.train_blocks),
            "val_blocks": len(data.val_blocks),
        },
        "settings": asdict(args),
        "metrics": result.metrics,
        "time": {
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "train_seconds": round(result.train_seconds, 2),
            "total_seconds": round(time.time() - started, 2),
        },
        "hardware": {
            "device": describe_device(torch.device("cuda" if on_cuda else "cpu")),
            "processes": result.world_size,
            "precision": _precision(args, on_cuda),
            "torch_compile": args.torch_compile,
        },
        "software": {"torch": torch.__version__, "transformers": transformers.__version__},
    }  # fmt: skip


def card_markdown(card: dict[str, Any]) -> str:
    """The training card as readable Markdown (README.md of the model directory)."""
    arch, data, hardware = card["architecture"], card["data"], card["hardware"]
    metric_rows = [f"| {k} | {_format_metric(v)} |" for k, v in card["metrics"].items()]
    return "\n".join([
        "# Training card",
        "",
        f"- Base model: {card['base']}",
        f"- Architecture: {arch['model_type']}, {arch['n_layer']} layers × {arch['n_embd']}, "
        f"{arch['n_head']} heads, "
        f"context {arch['n_positions']}, {arch['parameters']:,} parameters",
        f"- Data: {data['source']} export {data['dir']} (manifest sha256 {data['manifest_sha256']}), "
        f"conversations {data['counts']}, {data['train_blocks']} train / {data['val_blocks']} val blocks of "
        f"{data['block_size']} tokens",
        f"- Hardware: {hardware['device']} × {hardware['processes']}, {hardware['precision']}, "
        f"torch.compile {hardware['torch_compile']}; software {card['software']}",
        f"- Time: started {card['time']['started_at']}, training {card['time']['train_seconds']} s, "
        f"total {card['time']['total_seconds']} s",
        "",
        "| metric | value |",
        "|---|---|",
        *metric_rows,
        "",
        "Settings:",
        "",
        "```json",
        json.dumps(card["settings"], indent=2, ensure_ascii=False),
        "```",
        "",
    ])  # fmt: skip


def _format_metric(value: Any) -> str:
    return f"{value:,.4g}" if isinstance(value, float) else str(value)


def write_card(out_dir: Path, card: dict[str, Any]) -> None:
    """training_card.json + README.md beside the weights."""
    (out_dir / CARD_JSON).write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / CARD_README).write_text(card_markdown(card), encoding="utf-8")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parse flags, train, print where the model went; exit code 2 on invalid input."""
    from transformers import HfArgumentParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # HfArgumentParser is typed as taking a NewType upstream
        parser = HfArgumentParser(TrainArguments, prog=prog)  # type: ignore[arg-type]
        (args,) = parser.parse_args_into_dataclasses(args=argv)
        out_dir = train(args)
    except (TrainError, ExportError) as exc:
        print(f"chatbot train: error: {exc}", file=sys.stderr)
        return 2
    print(out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The embedded zoo's training: a byte-level BPE tokenizer and three tiny reference LMs trained on the embedded corpus.

Pruning comparisons on random weights are noise, and this machine cannot download a model, so the project
trains and commits its own (listed in `suite.model.zoo`). `prunebench zoo train NAME` reproduces any of them
(resumable; bf16 autocast on CPU).
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch

from suite.atomic import replacing_file, write_text
from suite.data.sources import cache_dir, embedded_corpus, token_stream, tokenizer_hash
from suite.model.structures import param_count
from suite.model.zoo import SPECIAL, TOKENIZER_DIR, VOCAB, ZooSpec, model_dir, spec

# tokenizer


def tokenizer():
    """The zoo's tokenizer: trained once on the embedded train split, then loaded from the committed files."""
    from transformers import PreTrainedTokenizerFast

    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        train_tokenizer()
    return PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR)


def train_tokenizer() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = embedded_corpus()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((d.text for d in corpus.documents("train")), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>", model_max_length=1024)
    hf.save_pretrained(TOKENIZER_DIR)
    write_text(TOKENIZER_DIR / "TRAINING.md",
        f"# zoo tokenizer\n\nByte-level BPE, vocabulary {VOCAB}, specials {SPECIAL}, trained with `tokenizers` on the "
        f"embedded corpus train split (hash {corpus.hashes['train']}, {len(corpus.documents('train'))} files of "
        f"Python {platform.python_version()}'s standard library). Command: `prunebench zoo train NAME` trains it "
        "first when these files are missing.\n"
    )


# ---------------------------------------------------------------------------------------------------------------
# training


def _lr(step: int, s: ZooSpec) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_bf16(device: torch.device) -> bool:
    """bf16 autocast pays off only with hardware bf16 matmuls: on an AVX2-only CPU torch emulates them and a
    training step runs ~25x slower than fp32 (measured here: backward 30 s vs 0.8 s for the tiny-llama step)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def train(name: str, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) zoo model `name`, then evaluate it and write the checkpoint, TRAINING.md and record."""
    from tqdm import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM

    from suite.data.tasks import EMBEDDED_TASKS
    from suite.evaluation.evaluate import perplexity, run_tasks

    s = spec(name)
    tok = tokenizer()
    corpus = embedded_corpus()
    stream = token_stream(corpus, "train", tok)
    device = _device()
    torch.manual_seed(s.seed)
    config = AutoConfig.for_model(s.family, **s.config)
    if s.family == "qwen3_moe":
        config.output_router_logits = True  # load-balancing loss during training only
    model = AutoModelForCausalLM.from_config(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=s.weight_decay)
    state_path = cache_dir() / "zoo-train" / name / "state.pt"
    gen = torch.Generator().manual_seed(s.seed)
    step, wall, losses = 0, 0.0, []
    if state_path.is_file():
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step, wall, losses = state["step"], state["wall"], state["losses"]
    bf16 = native_bf16(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    bar = tqdm(total=s.steps, initial=step, desc=f"train {name}", disable=not progress, unit="step")
    model.train()
    while step < s.steps:
        t0 = time.perf_counter()
        starts = torch.randint(0, len(stream) - s.seq_len - 1, (s.batch,), generator=gen)
        batch = torch.stack([stream[i : i + s.seq_len] for i in starts.tolist()]).to(device)
        for group in opt.param_groups:
            group["lr"] = _lr(step, s)
        with autocast:
            loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        wall += time.perf_counter() - t0
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{s.batch * s.seq_len * step / wall:.0f}")
        if step % 200 == 0 or step == s.steps:
            with replacing_file(state_path) as tmp:  # per-process temp name: two trainers never share it
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                            "step": step, "wall": wall, "losses": losses}, tmp)
    bar.close()
    model.eval()
    model.config.output_router_logits = False
    out = model_dir(name)
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    # scores are measured on the committed bf16 weights, loaded back as fp32 (what users get)
    committed = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    scores = {f"{split}_ppl": perplexity(committed, token_stream(corpus, split, tok), s.eval_seq_len)["ppl"]
              for split in ("valid", "test")}
    task_scores, _ = run_tasks(committed, tok, EMBEDDED_TASKS)
    rec = {
        "name": name, "family": s.family, "params": param_count(committed),
        "tokens": s.steps * s.batch * s.seq_len, "steps": s.steps, "wall_seconds": round(wall, 1),
        "device": device.type, "threads": torch.get_num_threads(), "precision": "bf16 autocast" if bf16 else "fp32",
        "final_train_loss": sum(losses[-50:]) / 50,
        "data_hash": corpus.hashes["train"], "tokenizer_hash": tokenizer_hash(tok),
        "python": platform.python_version(), "torch": torch.__version__, "seed": s.seed,
        "recipe": {k: getattr(s, k) for k in ("batch", "seq_len", "lr", "warmup", "weight_decay")},
        "eval_seq_len": s.eval_seq_len, **scores,
    }
    rec["tasks"] = {t: v["acc"] for t, v in task_scores.items()}
    rec["tasks_acc_norm"] = {t: v["acc_norm"] for t, v in task_scores.items()}
    _write_record(out, rec, s)
    return rec


def _write_record(out: Path, rec: dict[str, Any], s: ZooSpec) -> None:
    write_text(out / "record.json", json.dumps(rec, indent=1, sort_keys=True))
    tasks = "".join(f"| {t} | {v:.4f} |\n" for t, v in sorted(rec.get("tasks", {}).items()))
    write_text(out / "TRAINING.md",
        f"# {rec['name']}\n\n{s.notes}. {rec['params']:,} parameters.\n\n"
        f"Command: `prunebench zoo train {rec['name']}` (resumable; state under $PRUNEBENCH_CACHE/zoo-train).\n\n"
        f"| fact | value |\n|---|---|\n"
        f"| training tokens | {rec['tokens']:,} ({rec['steps']} steps x {s.batch} x {s.seq_len}) |\n"
        f"| data | embedded corpus train split, hash {rec['data_hash']} (Python {rec['python']} stdlib) |\n"
        f"| tokenizer | zoo byte-level BPE {VOCAB}, hash {rec['tokenizer_hash']} |\n"
        f"| optimiser | AdamW lr {s.lr} (warm-up {s.warmup}, cosine to 10%), wd {s.weight_decay}, clip 1.0 |\n"
        f"| precision | {rec['precision']} (bf16 autocast only where the hardware has native bf16) |\n"
        f"| wall time | {rec['wall_seconds']:.0f} s on {rec['device']} ({rec['threads']} threads), "
        f"torch {rec['torch']} |\n"
        f"| final train loss (last 50 steps) | {rec['final_train_loss']:.4f} |\n"
        f"| valid perplexity (seq {rec['eval_seq_len']}) | {rec['valid_ppl']:.3f} |\n"
        f"| test perplexity (seq {rec['eval_seq_len']}) | {rec['test_ppl']:.3f} |\n\n"
        + f"Embedded tasks (dense, acc; chance 0.25):\n\n| task | acc |\n|---|---|\n{tasks}"
    )

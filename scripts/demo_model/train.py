"""Train moeinf's demo Mixtral-style MoE from scratch on the three-domain corpus (dev tooling only).

transformers' MixtralForCausalLM is used here as a training framework; the runtime never imports it.
Deterministic (fixed seed, fixed data order, 2 threads). Every --save-every steps the model is written in
hub format (bf16 safetensors + config + tokenizer + generation config) to --out and the full training
state to --state, so an interrupted run still leaves a usable model and can be resumed with --resume.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from pathlib import Path

import torch
from corpus import DOMAINS, read_documents
from tokenizers import Tokenizer
from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def encode_domain(tok: Tokenizer, path: Path, eos_id: int) -> torch.Tensor:
    """All documents of one domain as one token stream, documents separated by eos."""
    ids: list[int] = []
    for enc in tok.encode_batch(read_documents(path)):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.int32)


def make_config(args: argparse.Namespace, vocab_size: int, eos_id: int) -> MixtralConfig:
    return MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.expert_dim,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        router_aux_loss_coef=args.aux_coef,
        output_router_logits=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=None,
    )


def batch(streams: dict[str, torch.Tensor], per_domain: int, seq_len: int, gen: torch.Generator):
    """Domain-balanced batch of random windows: [B, S] token ids."""
    rows = []
    for domain in DOMAINS:
        s = streams[domain]
        starts = torch.randint(0, len(s) - seq_len, (per_domain,), generator=gen)
        rows.extend(s[i : i + seq_len] for i in starts.tolist())
    return torch.stack(rows).long()


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-style load-balancing loss per layer, averaged over layers (perfect balance: top_k).

    transformers' Mixtral loss pools every layer's tokens by expert index, so expert e of layer 0 and
    expert e of layer 5 count together and a single layer can collapse onto a few experts unpunished.
    """
    losses = []
    for logits in router_logits:  # [T, E] per layer
        probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
        chosen = probs.topk(top_k, dim=-1).indices.reshape(-1)  # [T*K]
        ones = torch.ones_like(chosen, dtype=probs.dtype)
        share = (
            torch.zeros(probs.shape[1], device=probs.device).scatter_add_(0, chosen, ones) / probs.shape[0]
        )
        losses.append(probs.shape[1] * (share * probs.mean(0)).sum())  # share: [E], sums to top_k
    return torch.stack(losses).mean()


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Warmup, cosine decay planned over --cosine-horizon steps, linear cooldown over the last steps.

    The cooldown makes a run that stops before the horizon (--steps < --cosine-horizon) still end at a low
    learning rate; --steps can be lowered on --resume as long as the cooldown has not started.
    """
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.cosine_horizon - args.warmup)
    lr = args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))
    cooldown_start = args.steps * (1 - args.cooldown)
    if step > cooldown_start:
        lr *= 1 - 0.9 * (step - cooldown_start) / (args.steps - cooldown_start)
    return lr


@torch.no_grad()
def evaluate(model: MixtralForCausalLM, val: dict[str, torch.Tensor], seq_len: int) -> dict[str, float]:
    """Mean cross-entropy per domain over fixed, evenly spaced held-out windows."""
    model.eval()
    losses = {}
    for domain in DOMAINS:
        s = val[domain]
        starts = torch.linspace(0, len(s) - seq_len - 1, 8).long().tolist()
        x = torch.stack([s[i : i + seq_len] for i in starts]).long().to(model.device)  # [8, S]
        out = model(input_ids=x, labels=x, output_router_logits=False)  # labels shifted inside
        losses[domain] = out.loss.item()
    model.train()
    return losses


def save_hub(
    model: MixtralForCausalLM, out: Path, tokenizer_dir: Path, eos_id: int, max_shard_size: str = "100MB"
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    bf16 = copy.deepcopy(model).to("cpu", torch.bfloat16)
    bf16.config.output_router_logits = False
    bf16.generation_config = GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id)
    bf16.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, out / name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, default=Path("build/demo_model/corpus"))
    p.add_argument("--tokenizer", type=Path, default=Path("build/demo_model/tokenizer"))
    p.add_argument("--out", type=Path, default=Path("build/demo_model/model"))
    p.add_argument("--state", type=Path, default=Path("build/demo_model/train_state.pt"))
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu (the reference) or cuda (not bit-identical to cpu)")
    p.add_argument("--max-shard-size", default="100MB", help="safetensors shard size of the saved model")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--expert-dim", type=int, default=96)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--aux-coef", type=float, default=0.01, help="transformers' (layer-pooled) aux loss")
    # The shipped model used the layer-pooled loss for its first 300 steps (then found to let single
    # layers collapse onto few experts) and the per-layer loss after; the defaults reproduce that.
    p.add_argument(
        "--per-layer-aux-from", type=int, default=300, help="step from which to use the per-layer loss"
    )
    p.add_argument("--per-layer-aux-coef", type=float, default=0.02)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--per-domain", type=int, default=4, help="sequences per domain per step")
    p.add_argument("--steps", type=int, default=450)
    p.add_argument("--cosine-horizon", type=int, default=1800)
    p.add_argument("--cooldown", type=float, default=0.2, help="fraction of --steps spent cooling down")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--max-minutes", type=float, default=0, help="stop (and save) after this; 0: none")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tok = Tokenizer.from_file(str(args.tokenizer / "tokenizer.json"))
    eos_id = tok.token_to_id("<|endoftext|>")
    streams = {d: encode_domain(tok, args.corpus / f"{d}.train.txt", eos_id) for d in DOMAINS}
    val = {d: encode_domain(tok, args.corpus / f"{d}.val.txt", eos_id) for d in DOMAINS}
    print("train tokens:", {d: len(s) for d, s in streams.items()}, flush=True)

    config = make_config(args, tok.get_vocab_size(), eos_id)
    model = MixtralForCausalLM(config).to(args.device)  # initialised on the CPU: same weights anywhere
    n_params = sum(t.numel() for t in model.parameters())
    print(f"parameters: {n_params / 1e6:.2f}M", flush=True)
    decay = [t for n, t in model.named_parameters() if t.dim() >= 2 and "embed" not in n]
    no_decay = [t for n, t in model.named_parameters() if not (t.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(args.seed)
    step = 0
    if args.resume and args.state.exists():
        state = torch.load(args.state, weights_only=False, map_location=args.device)
        model.load_state_dict(state["model"])  # map_location: the state may come from another device
        opt.load_state_dict(state["optim"])
        gen.set_state(state["gen"].cpu())
        step = state["step"]
        print(f"resumed at step {step}", flush=True)

    log = {"args": {k: str(v) for k, v in vars(args).items()}, "params": n_params, "evals": []}
    log_path = args.out.parent / "train_log.json"
    if step and log_path.exists():  # resumed: keep the evaluations of the earlier part
        log["evals"] = [e for e in json.loads(log_path.read_text())["evals"] if e["step"] <= step]
    t0 = time.time()
    model.train()
    while step < args.steps:
        x = batch(streams, args.per_domain, args.seq_len, gen).to(args.device)  # [B, S]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        if step < args.per_layer_aux_from:
            out = model(input_ids=x, labels=x)  # transformers shifts labels; loss includes its pooled aux
            loss, aux, ce = out.loss, out.aux_loss, out.loss - args.aux_coef * out.aux_loss
        else:
            out = model(input_ids=x)
            logits = out.logits[:, :-1].float()  # [B, S-1, V]
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            aux = per_layer_balance_loss(out.router_logits, config.num_experts_per_tok)
            loss = ce + args.per_layer_aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        elapsed = time.time() - t0
        if step % 10 == 0 or step == 1:
            tps = step * x.numel() / elapsed if not args.resume else float("nan")
            print(
                f"step {step:5d}  ce {ce.item():.3f}  aux {aux.item():.3f}  lr {lr_at(step, args):.2e}"
                f"  {elapsed / 60:6.1f} min  {tps:.0f} tok/s",
                flush=True,
            )
        over_time = args.max_minutes and elapsed > args.max_minutes * 60
        if step % args.eval_every == 0 or step == args.steps or over_time:
            losses = evaluate(model, val, args.seq_len)
            log["evals"].append({"step": step, "minutes": elapsed / 60, "val_ce": losses})
            print(f"eval step {step}: " + "  ".join(f"{d} {v:.3f}" for d, v in losses.items()), flush=True)
        if step % args.save_every == 0 or step == args.steps or over_time:
            save_hub(model, args.out, args.tokenizer, eos_id, args.max_shard_size)
            state = {"model": model.state_dict(), "optim": opt.state_dict(), "gen": gen.get_state()}
            torch.save({**state, "step": step}, args.state)
            log["step"] = step
            log_path.write_text(json.dumps(log, indent=1) + "\n")
        if over_time:
            print(f"stopping at step {step}: time limit", flush=True)
            break


if __name__ == "__main__":
    main()

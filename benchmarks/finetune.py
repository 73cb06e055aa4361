"""Fine-tuning speed and memory: LoRA vs full fine-tuning, and griffinlm vs transformers + peft.

1. The width-512, 6-layer Griffin (benchmarks/train.py's MFU model) at T = 1024: tokens/s of one
   optimizer step (`train.step.optimizer_step`, the step `griffinlm finetune` runs: forward,
   masked loss, backward, clipping, AdamW) with LoRA adapters (r = 16, alpha = 32, dropout 0.05,
   every linear layer; `griffinlm finetune`'s defaults) vs every weight trained, interleaved
   round by round; and the optimizer state (AdamW's two moments) of each, in bytes.
2. A tiny RecurrentGemma built with `transformers` and saved locally, loaded by griffinlm
   (`griffinlm.load`, converted on read): the same LoRA adapters (peft, same targets) and the
   same batch, one training step in each (transformers: forward with labels, backward, AdamW),
   interleaved; the ratio of step times.

Prints ratios and absolute figures with the CPU (`torch.backends.cpu.get_cpu_capability()`).
Usage: python benchmarks/finetune.py [--rounds 5] [--batch-size 2] [--seq-len 1024] [--hf-batch-size 4]
                                    [--hf-seq-len 256] [--threads N] [--skip-hf] [--skip-lora] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time

import torch

MODEL_512 = dict(vocab_size=259, width=512, depth=6, num_heads=4, lru_width=512, local_window=512,
                 block_pattern=("recurrent", "recurrent", "attention"))
HF_TINY = dict(num_hidden_layers=3, vocab_size=1024, hidden_size=256, intermediate_size=768,
               num_attention_heads=4, num_key_value_heads=1, attention_window_size=256)


def random_batch(B: int, T: int, vocab: int, seed: int):
    from griffinlm.data import Batch

    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab, (B, T + 1), generator=g)
    seg = torch.arange(T).expand(B, T).clone()
    return Batch(t[:, :-1].contiguous(), t[:, 1:].contiguous(), seg, torch.ones(B, T, dtype=torch.bool), float(B * T))


def optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


def lora_vs_full(rounds: int, B: int, T: int) -> dict:
    from griffinlm import LanguageModel, ModelConfig
    from griffinlm.finetune.lora import LoraSettings, apply_lora
    from griffinlm.parallel import ParallelContext
    from griffinlm.train.optim import make_optimizer
    from griffinlm.train.step import optimizer_step

    torch.manual_seed(0)
    full = LanguageModel(ModelConfig.preset("griffin-tiny", **MODEL_512)).train()
    lora = copy.deepcopy(full)
    apply_lora(lora, LoraSettings())
    lora.train()
    par = ParallelContext(None, torch.device("cpu"))
    runs = {"full": (full, make_optimizer(full, 1e-4, 0.0, (0.9, 0.95), 1e-8), []),
            "lora": (lora, make_optimizer(lora, 1e-4, 0.0, (0.9, 0.95), 1e-8), [])}
    batch = random_batch(B, T, 259, 0)
    for name, (model, opt, _) in runs.items():  # warm-up: the GEMM backends' choice, numba compiles
        optimizer_step(model, opt, [batch], par, lr=1e-4, grad_clip=1.0)
    for r in range(rounds):
        for name, (model, opt, times) in runs.items():
            t = time.perf_counter()
            optimizer_step(model, opt, [batch], par, lr=1e-4, grad_clip=1.0)
            times.append(time.perf_counter() - t)
    ratios = [f / lo for f, lo in zip(runs["full"][2], runs["lora"][2])]
    out = {"tokens_per_step": B * T,
           "full_tokens_per_s": B * T / statistics.median(runs["full"][2]),
           "lora_tokens_per_s": B * T / statistics.median(runs["lora"][2]),
           "lora_over_full_speed": statistics.median(ratios),
           "full_optimizer_bytes": optimizer_bytes(runs["full"][1]),
           "lora_optimizer_bytes": optimizer_bytes(runs["lora"][1]),
           "trainable_lora": sum(p.numel() for p in lora.parameters() if p.requires_grad),
           "trainable_full": sum(p.numel() for p in full.parameters())}
    out["optimizer_memory_ratio"] = out["lora_optimizer_bytes"] / out["full_optimizer_bytes"]
    return out


def versus_transformers(rounds: int, B: int, T: int) -> dict:
    from peft import get_peft_model
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    from griffinlm import load
    from griffinlm.finetune.lora import LoraSettings, apply_lora
    from griffinlm.parallel import ParallelContext
    from griffinlm.train.optim import make_optimizer
    from griffinlm.train.step import optimizer_step

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        RecurrentGemmaForCausalLM(RecurrentGemmaConfig(**HF_TINY)).save_pretrained(tmp)
        hf = RecurrentGemmaForCausalLM.from_pretrained(tmp).train()
        ours, _ = load(tmp)
    settings = LoraSettings()
    peft_config = settings.peft_config(ours)  # the same targets on both
    apply_lora(ours, settings)
    ours.train()
    hf = get_peft_model(hf, peft_config).train()
    hf_opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    our_opt = make_optimizer(ours, 1e-4, 0.0, (0.9, 0.999), 1e-8)
    par = ParallelContext(None, torch.device("cpu"))
    batch = random_batch(B, T, HF_TINY["vocab_size"], 1)
    position_ids = batch.segment_pos

    def hf_step():
        out = hf(input_ids=batch.tokens, position_ids=position_ids, labels=batch.tokens)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in hf.parameters() if p.requires_grad], 1.0)
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    def our_step():
        optimizer_step(ours, our_opt, [batch], par, lr=1e-4, grad_clip=1.0)

    steps = {"transformers+peft": (hf_step, []), "griffinlm": (our_step, [])}
    for fn, _ in steps.values():
        fn()
    for _ in range(rounds):
        for fn, times in steps.values():
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    ratios = [h / o for h, o in zip(steps["transformers+peft"][1], steps["griffinlm"][1])]
    return {"tokens_per_step": B * T, "config": HF_TINY,
            "transformers_step_s": statistics.median(steps["transformers+peft"][1]),
            "griffinlm_step_s": statistics.median(steps["griffinlm"][1]),
            "griffinlm_speedup": statistics.median(ratios)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--hf-batch-size", type=int, default=4)
    p.add_argument("--hf-seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-lora", action="store_true", help="only the transformers comparison")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = f"{platform.processor() or platform.machine()}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}, " \
          f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"machine: {cpu}", flush=True)
    res = {"machine": cpu}
    if not args.skip_lora:
        res["lora_vs_full"] = r = lora_vs_full(args.rounds, args.batch_size, args.seq_len)
        print(f"Griffin width 512, depth 6, B={args.batch_size}, T={args.seq_len}: full {r['full_tokens_per_s']:.0f} "
              f"tokens/s, LoRA {r['lora_tokens_per_s']:.0f} tokens/s -> LoRA {r['lora_over_full_speed']:.2f}x "
              f"(median of per-round ratios); optimizer state {r['lora_optimizer_bytes'] / 2**20:.2f} MiB vs "
              f"{r['full_optimizer_bytes'] / 2**20:.1f} MiB = {100 * r['optimizer_memory_ratio']:.2f}%", flush=True)
    if not args.skip_hf:
        res["versus_transformers"] = v = versus_transformers(args.rounds, args.hf_batch_size, args.hf_seq_len)
        print(f"tiny RecurrentGemma {HF_TINY['hidden_size']}x{HF_TINY['num_hidden_layers']}, B={args.hf_batch_size}, "
              f"T={args.hf_seq_len}, LoRA step: transformers+peft {v['transformers_step_s'] * 1e3:.0f} ms, griffinlm "
              f"{v['griffinlm_step_s'] * 1e3:.0f} ms -> griffinlm {v['griffinlm_speedup']:.2f}x faster", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

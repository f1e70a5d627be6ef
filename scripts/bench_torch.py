r"""The reference side of `scripts/bench.py --compare=torch`: transformers + PEFT (PyTorch) train steps.

  python scripts/bench_torch.py --model=PATH --mode=lora --rank=8 --alpha=16 \
      --targets=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --batch=8 --seq=256 --steps=3

bench.py runs this file as a subprocess with the model, batch, optimizer and LoRA settings of its own
resolved config, so that the peak RSS measured here is that of a process holding only torch and the
model: nothing here imports jax or ftjax (tests/test_bench.py checks it). Times --steps steps after one
warm-up step (AdamW, global-norm clipping, loss over every token) and prints one JSON line:
{"times": [...], "peak_mb": ..., "loss": ...}. The peak-RSS helpers are shared with bench.py.
"""
import gc
import json
import os
import resource
import sys
import time

from absl import flags

FLAGS = flags.FlagValues()  # its own flags: bench.py imports this module beside its absl flags
flags.DEFINE_string('model', None, 'HF directory or .gguf file (the path bench.py resolved).', flag_values=FLAGS)
flags.DEFINE_enum('mode', 'lora', ['full', 'lora', 'dora'], 'What trains: everything, or LoRA / DoRA adapters.',
                  flag_values=FLAGS)
flags.DEFINE_integer('rank', 8, 'LoRA rank.', flag_values=FLAGS)
flags.DEFINE_float('alpha', 16.0, 'LoRA alpha.', flag_values=FLAGS)
flags.DEFINE_float('dropout', 0.0, 'LoRA dropout.', flag_values=FLAGS)
flags.DEFINE_bool('rslora', False, 'Rank-stabilised LoRA scale.', flag_values=FLAGS)
flags.DEFINE_list('targets', 'q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj',
                  'Module names that get adapters (PEFT target_modules).', flag_values=FLAGS)
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16', 'float16'], 'Model dtype.', flag_values=FLAGS)
flags.DEFINE_integer('batch', 8, 'Rows per step.', flag_values=FLAGS)
flags.DEFINE_integer('seq', 256, 'Tokens per row.', flag_values=FLAGS)
flags.DEFINE_integer('steps', 4, 'Timed steps after one warm-up step.', flag_values=FLAGS)
flags.DEFINE_float('learning_rate', 1e-4, 'AdamW learning rate.', flag_values=FLAGS)
flags.DEFINE_float('weight_decay', 0.0, 'AdamW weight decay.', flag_values=FLAGS)
flags.DEFINE_float('clip_norm', 1.0, 'Global-norm gradient clipping; 0 disables.', flag_values=FLAGS)
flags.DEFINE_bool('torch_remat', False, 'Gradient checkpointing (default off: torch at its fastest).',
                  flag_values=FLAGS)


def reset_peak_rss():
    """Start a new peak-RSS window (Linux: VmHWM := current RSS), so that loading the checkpoint and
    compiling do not count; what stays resident (weights, optimizer state) still does."""
    gc.collect()
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def peak_rss_mb():
    """Peak resident memory of this process in MiB since `reset_peak_rss` (or since start)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load_model(path, dtype):
    """transformers' causal LM from a HF directory or a .gguf file (dequantised by transformers)."""
    import transformers
    if path.endswith('.gguf'):
        return transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path) or '.',
                                                                 gguf_file=os.path.basename(path), dtype=dtype)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def bench_torch(f):
    """`f`: the parsed flags. {'times': [s, ...], 'peak_mb': MiB, 'loss': last loss}."""
    import torch
    torch.manual_seed(0)
    model = load_model(f.model, getattr(torch, f.dtype))
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    model.to(dev).train()
    if f.mode in ('lora', 'dora'):
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=f.rank, lora_alpha=f.alpha, target_modules=list(f.targets), lora_dropout=f.dropout,
            use_rslora=f.rslora, use_dora=f.mode == 'dora'))
    if f.torch_remat:
        model.gradient_checkpointing_enable()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=f.learning_rate, weight_decay=f.weight_decay)
    ids = torch.randint(0, model.config.vocab_size, (f.batch, f.seq), device=dev)  # [batch, seq]
    reset_peak_rss()
    if dev == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(f.steps + 1):  # step 0 warms up
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if f.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, f.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == 'cuda':
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if dev == 'cuda' else peak_rss_mb()
    return dict(times=times, peak_mb=peak, peak_kind='device' if dev == 'cuda' else 'rss', loss=float(loss))


def main(argv):
    rest = FLAGS(argv)
    if len(rest) > 1:
        sys.exit(f'bench_torch: unexpected arguments {rest[1:]}; flags are written --name=value.')
    if not FLAGS.model:
        sys.exit('bench_torch: --model=PATH (a HF directory or .gguf file) is required.')
    print(json.dumps(bench_torch(FLAGS)), flush=True)


if __name__ == '__main__':
    main(sys.argv)
